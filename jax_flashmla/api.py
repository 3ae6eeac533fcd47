"""The public API, FlashMLA's two calls with FlashMLA's semantics, so PyTorch code ports line by line.

    metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    for layer in layers:                                   # one schedule serves every layer
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                          metadata, num_splits, causal=True)

Both are jittable and work under vmap and sharded jit; see README.md for the semantics.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from jax_flashmla._constants import DEFAULT_NUM_SMS, HEAD_DIM_QK, SCHEDULER_FIELDS
from jax_flashmla._decode_op import mla_decode_p
from jax_flashmla._metadata_op import mla_metadata_p
from jax_flashmla._validation import (check_decode_args, check_metadata_args,
                                      default_num_sm_parts)


def _as_array(value):
    """jnp.asarray that keeps a wrong integer width visible: with x64 off, jnp would silently
    narrow an int64 NumPy array to int32, hiding a dtype the shape rules should reject."""
    array = jnp.asarray(value)
    original = getattr(value, "dtype", None)
    if original is not None and original != array.dtype:
        return jax.ShapeDtypeStruct(array.shape, original), array
    return array, array


def default_num_sms() -> int:
    """SMs of the default device when it is a GPU; an H100's count (132) otherwise."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        count = getattr(device, "core_count", None)
        if count:
            return int(count)
    return DEFAULT_NUM_SMS


def get_mla_metadata(cache_seqlens: jax.Array, num_q_tokens_per_head_k: int, num_heads_k: int, *,
                     num_sm_parts: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Splits one decode step's work into balanced partitions, one per SM.

    Args:
      cache_seqlens: int32[b], tokens in each sequence's cache.
      num_q_tokens_per_head_k: query rows per KV head, ``s_q * h_q // h_kv``.
      num_heads_k: KV heads, ``h_kv``.
      num_sm_parts: partitions; by default ``num_SMs // h_kv // ceil(rows / 64)`` for the default
        device (132 SMs when it is not a GPU). Give it explicitly to compile ahead of time for
        another GPU.

    Returns:
      ``(tile_scheduler_metadata int32[num_sm_parts, 8], num_splits int32[b + 1])``. Compute it
      once per decode step (on the device, no host round trip) and pass it to every layer's
      :func:`flash_mla_with_kvcache`.
    """
    declared, cache_seqlens = _as_array(cache_seqlens)
    check_metadata_args(declared.shape, declared.dtype, num_q_tokens_per_head_k,
                        num_heads_k)
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(default_num_sms(), num_q_tokens_per_head_k,
                                            num_heads_k)
    elif not isinstance(num_sm_parts, int) or num_sm_parts < 1:
        raise ValueError(f"num_sm_parts must be a positive int, got {num_sm_parts!r}")
    if cache_seqlens.shape[0] == 0:
        return (jnp.zeros((num_sm_parts, SCHEDULER_FIELDS), jnp.int32),
                jnp.zeros((1,), jnp.int32))
    metadata, num_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=num_sm_parts)
    return metadata, num_splits


def flash_mla_with_kvcache(q: jax.Array, k_cache: jax.Array, block_table: jax.Array,
                           cache_seqlens: jax.Array, head_dim_v: int,
                           tile_scheduler_metadata: jax.Array | None = None,
                           num_splits: jax.Array | None = None,
                           softmax_scale: float | None = None, causal: bool = False, *,
                           implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Multi-head latent attention over a paged KV cache (decode).

    Args:
      q: ``[b, s_q, h_q, 576]`` bfloat16 or float16; ``s_q`` query tokens per sequence.
      k_cache: ``[num_blocks, 64, h_kv, 576]``, q's dtype: the page pool. V is the first
        ``head_dim_v`` columns of the same rows.
      block_table: int32 ``[b, max_blocks_per_seq]``: page i of sequence s is pool row
        ``block_table[s, i]``.
      cache_seqlens: int32 ``[b]``: tokens in each sequence.
      head_dim_v: 512.
      tile_scheduler_metadata, num_splits: from :func:`get_mla_metadata` for these
        ``cache_seqlens``; computed here when omitted.
      softmax_scale: defaults to ``576 ** -0.5``.
      causal: bottom-right aligned causal mask among the ``s_q`` query tokens.
      implementation: ``"auto"`` (our CUDA kernels on NVIDIA GPUs, the best one for the card;
        the pure-JAX reference elsewhere), ``"reference"`` (the pure-JAX path everywhere),
        ``"portable"`` / ``"hopper"`` (force a kernel family on GPUs).

    Returns:
      ``out [b, s_q, h_q, head_dim_v]`` in q's dtype and ``lse [b, h_q, s_q]`` float32 (natural
      log). A row that sees no key gives ``out = 0`` and ``lse = +inf``.
    """
    declared = [_as_array(value) for value in (q, k_cache, block_table, cache_seqlens,
                                               tile_scheduler_metadata, num_splits)
                if value is not None]
    if softmax_scale is None:
        softmax_scale = HEAD_DIM_QK ** -0.5
    if (tile_scheduler_metadata is None) != (num_splits is None):
        raise ValueError("pass tile_scheduler_metadata and num_splits together, or neither")
    given = [spec for spec, _ in declared] + [None, None]
    check_decode_args(*given[:4], head_dim_v, *given[4:6], softmax_scale, causal, implementation)
    q, k_cache, block_table, cache_seqlens, *schedule = [array for _, array in declared]
    if schedule:
        tile_scheduler_metadata, num_splits = schedule
    batch, seqlen_q, heads_q, _ = q.shape
    if batch == 0:
        return (jnp.zeros((0, seqlen_q, heads_q, head_dim_v), q.dtype),
                jnp.zeros((0, heads_q, seqlen_q), jnp.float32))
    if tile_scheduler_metadata is None:
        heads_k = k_cache.shape[2]
        tile_scheduler_metadata, num_splits = get_mla_metadata(
            cache_seqlens, seqlen_q * heads_q // heads_k, heads_k)
    out, lse = mla_decode_p.bind(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                                 num_splits, head_dim_v=int(head_dim_v),
                                 softmax_scale=float(softmax_scale), causal=bool(causal),
                                 implementation=implementation)
    return out, lse


