"""The paged KV cache around the decode op: a host-side page allocator and a jittable cache write.

``flash_mla_with_kvcache`` reads a page pool through a block table but says nothing about how
pages are handed out or how new tokens get into them. A model needs both, every step:

* :class:`PageAllocator` lives on the host. It owns the free list of a fixed pool of
  ``num_blocks`` pages (64 tokens each), tracks each sequence's pages and length, and builds the
  int32 ``block_table`` / ``cache_seqlens`` arrays of one step. Page bookkeeping is data-dependent
  control flow on tiny integers, so it stays in Python; only the two arrays go to the device.
* :func:`write_kv` runs on the device, inside the jitted step: it scatters the new tokens' 576-wide
  latent rows into their pages. With the pool donated it updates the pool in place, so a step never
  copies the cache.
* :func:`layer_block_table` lets every layer share one pool array (layer ``l`` owning block ids
  ``[l * blocks_per_layer, (l + 1) * blocks_per_layer)``), so a ``lax.scan`` over layers carries a
  single buffer that each layer updates in place.
"""

from __future__ import annotations

import collections
from typing import Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla._constants import HEAD_DIM_QK, PAGE_SIZE

# Block-table entry of a page a sequence does not have: far outside any pool, so the decode op
# never needs it and write_kv drops writes aimed at it.
UNUSED_BLOCK_ID = int(np.iinfo(np.int32).max)


class PageAllocatorError(Exception):
    """Base class of the allocator's errors."""


class PoolExhaustedError(PageAllocatorError):
    """The pool has fewer free pages than a request needs; nothing was allocated."""


class UnknownSequenceError(PageAllocatorError):
    """A sequence id that was never added, or was already freed."""


class DuplicateSequenceError(PageAllocatorError):
    """A sequence id that is already live."""


class SequenceTooLongError(PageAllocatorError):
    """A sequence would need more pages than a block-table row holds."""


class StepTables(NamedTuple):
    """The int32 arrays of one step for :func:`write_kv` and ``flash_mla_with_kvcache``."""

    block_table: np.ndarray    # [b, max_blocks_per_seq]; pages the step needs are allocated
    cache_seqlens: np.ndarray  # [b]; lengths BEFORE the step's new tokens


class PageAllocator:
    """Hands out the pages of a fixed pool of ``num_blocks`` pages (64 tokens each) to sequences.

    Sequences are identified by any hashable id. Typical step::

        tables = allocator.append_tokens(seq_ids, num_new_tokens=1)
        hidden, pool = step(pool, tables.block_table, tables.cache_seqlens, ...)

    where the step writes the new rows with ``write_kv(pool, block_table, cache_seqlens, rows)``
    and attends with lengths ``cache_seqlens + num_new_tokens``.

    Every table has ``max_blocks_per_seq`` columns whatever the batch holds, so the jitted step
    keeps one shape. A ``None`` in ``seq_ids`` is a padding row (length 0, no pages), which keeps
    the batch size fixed as sequences come and go; ``write_kv`` writes nothing for it, and its
    attention output is meaningless (NaN: it attends over pages it does not have), so ignore it.
    """

    def __init__(self, num_blocks: int, max_blocks_per_seq: int):
        for name, value in (("num_blocks", num_blocks), ("max_blocks_per_seq", max_blocks_per_seq)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_blocks >= UNUSED_BLOCK_ID:
            raise ValueError(f"num_blocks must be below {UNUSED_BLOCK_ID} (int32 block ids), "
                             f"got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self.max_blocks_per_seq = int(max_blocks_per_seq)
        # A stack popped from the end: a fresh pool hands out block 0 first, and the most recently
        # freed page is the next one reused.
        self._free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self._pages: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # --- queries ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def max_tokens_per_seq(self) -> int:
        return self.max_blocks_per_seq * PAGE_SIZE

    @property
    def sequence_ids(self) -> list[Hashable]:
        """Live sequences, in the order they were added."""
        return list(self._lengths)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._lengths

    def length(self, seq_id: Hashable) -> int:
        """Tokens the sequence holds."""
        self._check_live(seq_id)
        return self._lengths[seq_id]

    def pages(self, seq_id: Hashable) -> list[int]:
        """The sequence's block ids, in token order."""
        self._check_live(seq_id)
        return list(self._pages[seq_id])

    # --- changes ------------------------------------------------------------------------------

    def add(self, seq_id: Hashable, num_tokens: int = 0) -> None:
        """Starts a sequence, with room for ``num_tokens`` tokens (it then holds that many)."""
        if seq_id is None:
            raise ValueError("seq_id must not be None: None marks padding rows in step tables")
        if seq_id in self._lengths:
            raise DuplicateSequenceError(f"sequence {seq_id!r} is already live; free it first")
        self._check_count("num_tokens", num_tokens)
        self._check_fits({seq_id: num_tokens}, {seq_id: 0})
        self._pages[seq_id] = []
        self._lengths[seq_id] = 0
        self._grow(seq_id, num_tokens)

    def extend(self, seq_id: Hashable, num_tokens: int) -> int:
        """Adds ``num_tokens`` tokens to the sequence, allocating pages as needed.

        Returns the length before the extension: the position of the first new token, which is
        what :func:`write_kv` takes as ``cache_seqlens``. On error nothing changes.
        """
        self._check_live(seq_id)
        self._check_count("num_tokens", num_tokens)
        self._check_fits({seq_id: num_tokens}, self._lengths)
        return self._grow(seq_id, num_tokens)

    def free(self, seq_id: Hashable) -> None:
        """Ends the sequence and returns its pages to the pool."""
        self._check_live(seq_id)
        # Reversed so that the sequence's first page is the next one handed out.
        self._free_blocks.extend(reversed(self._pages.pop(seq_id)))
        del self._lengths[seq_id]

    def append_tokens(self, seq_ids: Sequence[Hashable | None], num_new_tokens: int = 1
                      ) -> StepTables:
        """Extends every listed sequence by ``num_new_tokens`` and returns the step's tables.

        All or nothing: if any sequence is unknown, listed twice, too long, or the pool cannot
        hold every new page, it raises and allocates nothing. ``cache_seqlens`` are the lengths
        before the new tokens (``write_kv``'s convention); attend with
        ``cache_seqlens + num_new_tokens``.
        """
        self._check_count("num_new_tokens", num_new_tokens)
        live = [seq_id for seq_id in seq_ids if seq_id is not None]
        for seq_id in live:
            self._check_live(seq_id)
        repeated = sorted(repr(s) for s, count in collections.Counter(live).items() if count > 1)
        if repeated:
            raise DuplicateSequenceError(f"seq_ids lists sequences {', '.join(repeated)} more "
                                         "than once; each row of a step must be its own sequence")
        self._check_fits({seq_id: num_new_tokens for seq_id in live}, self._lengths)
        lengths_before = self.step_tables(seq_ids).cache_seqlens
        for seq_id in live:
            self._grow(seq_id, num_new_tokens)
        return StepTables(self.step_tables(seq_ids).block_table, lengths_before)

    def step_tables(self, seq_ids: Sequence[Hashable | None]) -> StepTables:
        """The step's ``block_table int32[b, max_blocks_per_seq]`` and ``cache_seqlens int32[b]``.

        Describes the sequences as they are now; allocates nothing. Row ``i`` describes
        ``seq_ids[i]`` (``None``: a padding row of length 0). Entries past a sequence's pages
        hold :data:`UNUSED_BLOCK_ID`.
        """
        block_table = np.full((len(seq_ids), self.max_blocks_per_seq), UNUSED_BLOCK_ID, np.int32)
        cache_seqlens = np.zeros((len(seq_ids),), np.int32)
        for row, seq_id in enumerate(seq_ids):
            if seq_id is None:
                continue
            self._check_live(seq_id)
            pages = self._pages[seq_id]
            block_table[row, :len(pages)] = pages
            cache_seqlens[row] = self._lengths[seq_id]
        return StepTables(block_table, cache_seqlens)

    # --- internals ----------------------------------------------------------------------------

    def _check_live(self, seq_id: Hashable) -> None:
        if seq_id not in self._lengths:
            raise UnknownSequenceError(f"sequence {seq_id!r} is not live (never added, or "
                                       f"freed); live sequences: {self.sequence_ids}")

    @staticmethod
    def _check_count(name: str, value: int) -> None:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def _check_fits(self, new_tokens: dict, lengths: dict) -> None:
        """Raises unless every sequence can grow by its count at once; changes nothing."""
        needed = 0
        for seq_id, count in new_tokens.items():
            total = lengths.get(seq_id, 0) + count
            if total > self.max_tokens_per_seq:
                raise SequenceTooLongError(
                    f"sequence {seq_id!r} would hold {total} tokens; a block-table row holds at "
                    f"most {self.max_tokens_per_seq} (max_blocks_per_seq={self.max_blocks_per_seq}"
                    f" pages of {PAGE_SIZE})")
            needed += _pages_for(total) - len(self._pages.get(seq_id, ()))
        if needed > len(self._free_blocks):
            raise PoolExhaustedError(
                f"the request needs {needed} free pages, the pool has {len(self._free_blocks)} "
                f"of {self.num_blocks}; free finished sequences or make the pool larger")

    def _grow(self, seq_id: Hashable, num_tokens: int) -> int:
        before = self._lengths[seq_id]
        pages = self._pages[seq_id]
        for _ in range(_pages_for(before + num_tokens) - len(pages)):
            pages.append(self._free_blocks.pop())
        self._lengths[seq_id] = before + num_tokens
        return before


def _pages_for(num_tokens: int) -> int:
    return -(-num_tokens // PAGE_SIZE)


def write_kv(k_cache: jax.Array, block_table: jax.Array, cache_seqlens: jax.Array,
             new_kv: jax.Array) -> jax.Array:
    """Writes each sequence's new latent rows into its pages; returns the updated pool.

    Args:
      k_cache: ``[num_blocks, 64, h_kv, 576]``, the page pool.
      block_table: int32 ``[b, max_blocks_per_seq]``, as for ``flash_mla_with_kvcache``; the pages
        the new tokens land on must already be allocated (:meth:`PageAllocator.append_tokens`).
      cache_seqlens: int32 ``[b]``: each sequence's length BEFORE these tokens, i.e. the position
        of its first new token (not the length the decode op then attends over, which is
        ``cache_seqlens + s_new``).
      new_kv: ``[b, s_new, h_kv, 576]`` in k_cache's dtype: row ``j`` of sequence ``i`` goes to
        position ``cache_seqlens[i] + j``.

    Rows whose position lies outside ``[0, 64 * max_blocks_per_seq)``, or whose page id lies
    outside the pool (such as :data:`UNUSED_BLOCK_ID`), are dropped. So a padding row writes
    nothing, and a left-padded batch of prompts can pass ``cache_seqlens = lengths - s_new``
    (negative for the shorter prompts) to write only its real tokens.

    It is one scatter: under ``jax.jit(..., donate_argnums=...)`` with the pool donated, XLA
    updates the pool in place. Works under vmap, sharded jit (a replicated pool takes
    batch-sharded writes) and inside ``shard_map`` with per-device pools and local block ids.
    """
    _check_write_args(k_cache, block_table, cache_seqlens, new_kv)
    num_blocks = k_cache.shape[0]
    max_blocks = block_table.shape[1]
    batch, s_new = new_kv.shape[:2]

    positions = cache_seqlens[:, None] + jnp.arange(s_new, dtype=jnp.int32)[None, :]  # [b, s_new]
    page_index = positions // PAGE_SIZE
    in_table = (positions >= 0) & (page_index < max_blocks)
    block_ids = jnp.take_along_axis(block_table, jnp.where(in_table, page_index, 0), axis=1)
    writable = in_table & (block_ids >= 0) & (block_ids < num_blocks)
    # num_blocks is out of bounds for the scatter, and mode="drop" skips such rows. (jnp indexing
    # would wrap a negative id instead, hence the explicit mask.)
    block_ids = jnp.where(writable, block_ids, num_blocks)
    slots = positions % PAGE_SIZE
    return k_cache.at[block_ids, slots].set(new_kv, mode="drop")


def _check_write_args(k_cache, block_table, cache_seqlens, new_kv) -> None:
    if k_cache.ndim != 4 or k_cache.shape[1] != PAGE_SIZE or k_cache.shape[3] != HEAD_DIM_QK:
        raise ValueError(f"k_cache must have shape (num_blocks, {PAGE_SIZE}, num_heads_k, "
                         f"{HEAD_DIM_QK}), got {tuple(k_cache.shape)}")
    heads_k = k_cache.shape[2]
    if new_kv.ndim != 4 or new_kv.shape[2:] != (heads_k, HEAD_DIM_QK):
        raise ValueError(f"new_kv must have shape (batch, s_new, {heads_k}, {HEAD_DIM_QK}) to "
                         f"match k_cache, got {tuple(new_kv.shape)}")
    if new_kv.dtype != k_cache.dtype:
        raise TypeError(f"new_kv must have k_cache's dtype {k_cache.dtype}, got {new_kv.dtype}")
    batch = new_kv.shape[0]
    if block_table.dtype != jnp.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.ndim != 2 or block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape ({batch}, max_blocks_per_seq >= 1) to "
                         f"match new_kv's batch, got {tuple(block_table.shape)}")
    if cache_seqlens.dtype != jnp.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},) to match new_kv's batch, "
                         f"got {tuple(cache_seqlens.shape)}")


def layer_block_table(block_table: jax.Array, layer, blocks_per_layer: int) -> jax.Array:
    """Block ids of ``layer`` in a pool that holds every layer's pages back to back.

    A model can keep one pool ``[num_layers * blocks_per_layer, 64, h_kv, 576]`` and one allocator
    of ``blocks_per_layer`` pages (all layers use the same page layout). Layer ``l``'s pages are
    rows ``l * blocks_per_layer + id``. ``layer`` may be traced (the index of a ``lax.scan``).
    Ids outside ``[0, blocks_per_layer)``, such as :data:`UNUSED_BLOCK_ID`, stay as they are, so
    they stay out of range instead of overflowing or landing in another layer's pages.
    """
    block_table = jnp.asarray(block_table)
    valid = (block_table >= 0) & (block_table < blocks_per_layer)
    offset = jnp.asarray(layer, jnp.int32) * jnp.int32(blocks_per_layer)
    return jnp.where(valid, block_table + offset, block_table)
