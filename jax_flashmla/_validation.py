"""Shape rules of both operations, shared by the public API and the primitives' abstract evaluation.

Everything that shapes and dtypes decide is checked here, at trace time, with an error that names
the argument, what was expected and what came. Values known only at run time (block ids, lengths)
are the kernels' business: see csrc/mla_params.h for what they do with bad ones.
"""

from __future__ import annotations

import math

import numpy as np

from jax_flashmla._constants import (HEAD_DIM_QK, HEAD_DIM_V, MAX_BATCH, MAX_SEQLEN_K, PAGE_SIZE,
                                     SCHEDULER_FIELDS)

IMPLEMENTATIONS = ("auto", "reference", "portable", "hopper")


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _is_half(dtype) -> bool:
    return _dtype_name(dtype) in ("bfloat16", "float16")


def check_int32_vector(name: str, shape, dtype, length: int | None = None) -> None:
    if _dtype_name(dtype) != "int32":
        raise TypeError(f"{name} must be int32, got {_dtype_name(dtype)}")
    if len(shape) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(shape)}")
    if length is not None and shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(shape)}")


def check_batch(name: str, batch: int) -> None:
    if batch > MAX_BATCH:
        raise ValueError(f"{name}: batch size must be at most {MAX_BATCH}, got {batch}")


def check_metadata_args(seqlens_shape, seqlens_dtype, num_q_tokens_per_head_k: int,
                        num_heads_k: int) -> None:
    check_int32_vector("cache_seqlens", seqlens_shape, seqlens_dtype)
    check_batch("cache_seqlens", seqlens_shape[0])
    if not isinstance(num_q_tokens_per_head_k, (int, np.integer)) or num_q_tokens_per_head_k < 1:
        raise ValueError("num_q_tokens_per_head_k must be a positive int (s_q * h_q // h_kv), "
                         f"got {num_q_tokens_per_head_k!r}")
    if not isinstance(num_heads_k, (int, np.integer)) or num_heads_k < 1:
        raise ValueError(f"num_heads_k must be a positive int, got {num_heads_k!r}")


def default_num_sm_parts(num_sms: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """Partitions so that partitions x query tiles x KV heads fill the SMs once."""
    tiles = math.ceil(num_q_tokens_per_head_k / 64)
    return max(num_sms // num_heads_k // tiles, 1)


def check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits,
                      softmax_scale, causal, implementation) -> None:
    """Every trace-time rule of flash_mla_with_kvcache. Arguments need .shape and .dtype only."""
    if len(q.shape) != 4:
        raise ValueError("q must have shape (batch, seqlen_q, num_heads_q, 576), "
                         f"got {tuple(q.shape)}")
    if not _is_half(q.dtype):
        raise TypeError(f"q must be bfloat16 or float16, got {_dtype_name(q.dtype)}")
    batch, seqlen_q, heads_q, head_dim = q.shape
    if head_dim != HEAD_DIM_QK:
        raise ValueError(f"q's last dimension (head dim) must be {HEAD_DIM_QK}, got {head_dim}")
    if seqlen_q < 1 or heads_q < 1:
        raise ValueError(f"q must have seqlen_q >= 1 and num_heads_q >= 1, got {tuple(q.shape)}")
    check_batch("q", batch)

    if len(k_cache.shape) != 4:
        raise ValueError("k_cache must have shape (num_blocks, 64, num_heads_k, 576), "
                         f"got {tuple(k_cache.shape)}")
    if _dtype_name(k_cache.dtype) != _dtype_name(q.dtype):
        raise TypeError(f"k_cache must have q's dtype {_dtype_name(q.dtype)}, "
                        f"got {_dtype_name(k_cache.dtype)}")
    num_blocks, page_size, heads_k, k_dim = k_cache.shape
    if page_size != PAGE_SIZE:
        raise ValueError(f"k_cache's page size (dimension 1) must be {PAGE_SIZE}, got {page_size}")
    if k_dim != HEAD_DIM_QK:
        raise ValueError(f"k_cache's last dimension must be {HEAD_DIM_QK}, got {k_dim}")
    if num_blocks < 1:
        raise ValueError(f"k_cache must hold at least one block, got {tuple(k_cache.shape)}")
    if heads_k < 1 or heads_q % heads_k:
        raise ValueError(f"num_heads_q ({heads_q}) must be a multiple of k_cache's num_heads_k "
                         f"({heads_k})")

    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v!r}")

    if _dtype_name(block_table.dtype) != "int32":
        raise TypeError(f"block_table must be int32, got {_dtype_name(block_table.dtype)}")
    if len(block_table.shape) != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape ({batch}, max_blocks_per_seq), "
                         f"got {tuple(block_table.shape)}")
    if block_table.shape[1] < 1 or block_table.shape[1] * PAGE_SIZE > MAX_SEQLEN_K:
        raise ValueError("block_table's max_blocks_per_seq must be in "
                         f"[1, {MAX_SEQLEN_K // PAGE_SIZE}], got {block_table.shape[1]}")
    check_int32_vector("cache_seqlens", cache_seqlens.shape, cache_seqlens.dtype, batch)

    if metadata is not None:
        if _dtype_name(metadata.dtype) != "int32":
            raise TypeError(f"tile_scheduler_metadata must be int32, "
                            f"got {_dtype_name(metadata.dtype)}")
        if len(metadata.shape) != 2 or metadata.shape[1] != SCHEDULER_FIELDS or metadata.shape[0] < 1:
            raise ValueError("tile_scheduler_metadata must have shape (num_sm_parts, "
                             f"{SCHEDULER_FIELDS}), got {tuple(metadata.shape)}")
    if num_splits is not None:
        if _dtype_name(num_splits.dtype) != "int32":
            raise TypeError(f"num_splits must be int32, got {_dtype_name(num_splits.dtype)}")
        if tuple(num_splits.shape) != (batch + 1,):
            raise ValueError(f"num_splits must have shape ({batch + 1},) (batch + 1; was the "
                             f"metadata made for another batch?), got {tuple(num_splits.shape)}")

    if not isinstance(softmax_scale, (float, int, np.floating, np.integer)) or isinstance(
            softmax_scale, bool) or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
