"""Opt-in run-time checks of block tables and lengths, built on ``jax.experimental.checkify``.

The decode op never faults on bad run-time values: a bad length or a needed page id outside the
pool turns the affected rows into NaN (csrc/mla_params.h). That keeps serving safe, but a NaN
found ten layers later says nothing about which sequence or which table entry was wrong. This
module finds it: the checks run on the device, cost a few elementwise ops over the block table, and
report the first fault as a ``checkify.JaxRuntimeError`` naming the sequence and the entry.

Under ``jax.jit`` wrap the jitted function in ``checkify.checkify`` and throw the error it returns::

    from jax.experimental import checkify
    from jax_flashmla.checked import checked_flash_mla_with_kvcache

    decode = checkify.checkify(jax.jit(checked_flash_mla_with_kvcache,
                                       static_argnames=("head_dim_v", "softmax_scale", "causal")))
    err, (out, lse) = decode(q, k_cache, block_table, cache_seqlens, head_dim_v=512,
                             causal=True)
    err.throw()  # raises JaxRuntimeError if a check failed; a no-op otherwise

or put :func:`check_decode_inputs` into your own decode step, once per step rather than per layer
(every layer shares the table), and checkify the whole step. A check that is staged (jit, scan)
without ``checkify.checkify`` around it is refused at trace time by JAX, so the checks cannot be
silently dropped.

What counts as a fault (the entries a serving engine leaves beyond a sequence's pages are *not*):

* ``cache_seqlens[s] < 0``;
* ``cache_seqlens[s] > max_blocks_per_seq * 64``, the table's capacity;
* ``block_table[s, i]`` outside ``[0, num_blocks)`` for a page the sequence needs,
  ``i < ceil(cache_seqlens[s] / 64)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jax_flashmla._constants import PAGE_SIZE
from jax_flashmla.api import flash_mla_with_kvcache

__all__ = ["check_decode_inputs", "checked_flash_mla_with_kvcache"]


def _first(mask: jax.Array) -> jax.Array:
    """Flat index of the first True in ``mask`` (0 when there is none: only read on failure)."""
    return jnp.argmax(mask.reshape(-1))


def check_decode_inputs(block_table: jax.Array, cache_seqlens: jax.Array, num_blocks: int) -> None:
    """Adds checkify checks that every sequence's length and needed pages are valid.

    Args:
      block_table: int32 ``[b, max_blocks_per_seq]``.
      cache_seqlens: int32 ``[b]``.
      num_blocks: rows of the page pool, ``k_cache.shape[0]``.

    Must run under ``checkify.checkify`` (directly or around a jitted function that calls it).
    The error names the first faulty sequence in batch order; lengths are checked before pages.
    """
    block_table = jnp.asarray(block_table)
    lengths = jnp.asarray(cache_seqlens)
    batch, max_pages = block_table.shape
    if batch == 0:
        return
    capacity = max_pages * PAGE_SIZE

    negative = lengths < 0
    seq = _first(negative)
    checkify.check(~jnp.any(negative),
                   "jax_flashmla: sequence {seq} has a negative length: cache_seqlens[{seq}] = "
                   "{length}", seq=seq, length=lengths[seq])

    too_long = lengths > capacity
    seq = _first(too_long)
    checkify.check(~jnp.any(too_long),
                   "jax_flashmla: sequence {seq} is longer than the block table can hold: "
                   "cache_seqlens[{seq}] = {length} > max_blocks_per_seq * 64 = {capacity}",
                   seq=seq, length=lengths[seq], capacity=jnp.int32(capacity))

    # Pages beyond ceil(len / 64) are never read, so whatever they hold is fine. Lengths already
    # reported above are clamped so they do not also produce a page error.
    needed_pages = (jnp.clip(lengths, 0, capacity) + PAGE_SIZE - 1) // PAGE_SIZE
    needed = jnp.arange(max_pages, dtype=jnp.int32)[None, :] < needed_pages[:, None]
    outside_pool = (block_table < 0) | (block_table >= num_blocks)
    bad_entry = needed & outside_pool
    flat = _first(bad_entry)
    seq, page = flat // max_pages, flat % max_pages
    checkify.check(~jnp.any(bad_entry),
                   "jax_flashmla: sequence {seq} (length {length}) needs page {page}, but "
                   "block_table[{seq}, {page}] = {block} is outside the page pool [0, "
                   "{num_blocks})", seq=seq, page=page, length=lengths[seq],
                   block=block_table[seq, page], num_blocks=jnp.int32(num_blocks))


def checked_flash_mla_with_kvcache(q: jax.Array, k_cache: jax.Array, block_table: jax.Array,
                                   cache_seqlens: jax.Array, head_dim_v: int,
                                   tile_scheduler_metadata: jax.Array | None = None,
                                   num_splits: jax.Array | None = None,
                                   softmax_scale: float | None = None, causal: bool = False, *,
                                   implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
    """:func:`jax_flashmla.flash_mla_with_kvcache` preceded by :func:`check_decode_inputs`.

    Same arguments and results; must run under ``checkify.checkify`` (see the module docstring).
    Shape and dtype misuse still raises at trace time, before any check is staged.
    """
    result = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                    tile_scheduler_metadata, num_splits, softmax_scale, causal,
                                    implementation=implementation)
    # After the call, so its trace-time validation has vouched for the shapes checked here.
    check_decode_inputs(block_table, cache_seqlens, jnp.shape(k_cache)[0])
    return result
