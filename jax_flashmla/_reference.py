"""Pure-JAX implementations of both operations: the semantics every kernel must match.

They are what the primitives lower to on CPU (and any platform without our CUDA kernels), the
baseline the benchmark compares against (gather the pages, einsum, softmax), and what the GPU
tests compare the kernels with. Nothing here depends on the compiled extension.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_flashmla._constants import FIXED_OVERHEAD_PAGES, MAX_SEQLEN_K, PAGE_SIZE, SCHEDULER_FIELDS


def mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v: int,
                         softmax_scale: float, causal: bool):
    """Paged MLA decode by gathering every page of the table and attending in float32.

    Returns ``(out, lse)`` with ``out[b, s_q, h_q, head_dim_v]`` in q's dtype and
    ``lse[b, h_q, s_q]`` float32 (natural log). Run-time faults follow the kernels' contract:
    a length below 0 or above the table's capacity gives NaN rows; a needed page whose block id
    lies outside the pool gives NaN for the rows that see it; a row that sees no key gives
    ``out = 0, lse = +inf``. Whatever the pool holds outside the valid tokens never matters.
    """
    b, s_q, h_q, d = q.shape
    num_pages, page_size, h_kv, _ = k_cache.shape
    max_pages = block_table.shape[1]
    heads_per_kv = h_q // h_kv
    capacity = max_pages * page_size

    lengths = cache_seqlens.astype(jnp.int32)
    malformed = (lengths < 0) | (lengths > capacity)
    clamped = jnp.clip(lengths, 0, capacity)

    token = jnp.arange(capacity, dtype=jnp.int32)
    page_of_token = token // page_size
    present = token[None, :] < clamped[:, None]                                    # [b, T]
    bad_page = (block_table < 0) | (block_table >= num_pages)                      # [b, P]
    bad_token = bad_page[:, page_of_token] & present                               # [b, T]

    pages = k_cache[jnp.where(bad_page, 0, block_table)]                           # [b, P, 64, g, d]
    keys = pages.reshape(b, capacity, h_kv, d)
    # Tokens past the length or on a bad page get zero keys and values (page 0 stands in for a
    # bad page and may hold anything); a bad page's tokens then score NaN below.
    usable = present & ~bad_token
    keys = jnp.where(usable[:, :, None, None], keys, jnp.zeros((), keys.dtype))
    values = keys[..., :head_dim_v]

    queries = q.reshape(b, s_q, h_kv, heads_per_kv, d)
    scores = jnp.einsum("btgkd,bsgd->bgkts", queries, keys,
                        preferred_element_type=jnp.float32,
                        precision=lax.Precision.HIGHEST) * jnp.float32(softmax_scale)
    # NaN scores on a bad page's tokens, before the visibility mask: exactly the rows that see
    # such a token turn NaN, the others give it probability 0 against its zero value. (On the
    # scores rather than as NaN keys, so that keys and values stay one gathered array: a separate
    # copy of the values is one more pass over the whole gathered cache.)
    scores = jnp.where(bad_token[:, None, None, None, :], jnp.nan, scores)

    query_token = jnp.arange(s_q, dtype=jnp.int32)
    last_visible = clamped[:, None] - 1                                             # [b, 1]
    if causal:
        last_visible = clamped[:, None] - s_q + query_token[None, :]                # [b, s_q]
    last_visible = jnp.broadcast_to(last_visible, (b, s_q))
    visible = token[None, None, :] <= last_visible[:, :, None]                      # [b, s_q, T]
    visible &= present[:, None, :]
    scores = jnp.where(visible[:, None, None, :, :], scores, -jnp.inf)

    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(row_max == -jnp.inf, 0.0, row_max)  # keeps NaN: it must propagate
    probs = jnp.exp(scores - row_max)
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    weighted = jnp.einsum("bgkts,bsgv->bgktv", probs, values.astype(jnp.float32),
                          precision=lax.Precision.HIGHEST)
    empty = row_sum == 0.0
    out = jnp.where(empty, 0.0, weighted / jnp.where(empty, 1.0, row_sum))
    lse = jnp.where(empty, jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))[..., 0]

    out = jnp.where(malformed[:, None, None, None, None], jnp.nan, out)
    lse = jnp.where(malformed[:, None, None, None], jnp.nan, lse)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, s_q, h_q, head_dim_v).astype(q.dtype)
    lse = lse.reshape(b, h_q, s_q)
    return out, lse


def tile_scheduler_reference(cache_seqlens, num_sm_parts: int):
    """The tile scheduler of csrc/tile_scheduler.cu, step for step, as a JAX while loop.

    Each sequence costs ``ceil(len / 64) + FIXED_OVERHEAD_PAGES`` pages; partitions take about
    ``ceil(total / num_sm_parts) + FIXED_OVERHEAD_PAGES`` each, whole sequences while they fit,
    else a page-aligned prefix of the current one; the last partition takes all that is left, so
    every sequence is covered. Returns ``(metadata int32[num_sm_parts, 8], num_splits int32[b+1])``
    with the layout documented in csrc/mla_params.h.
    """
    batch = cache_seqlens.shape[0]
    lengths = jnp.clip(cache_seqlens.astype(jnp.int32), 0, MAX_SEQLEN_K)
    pages = (lengths + PAGE_SIZE - 1) // PAGE_SIZE
    total = jnp.sum(pages + FIXED_OVERHEAD_PAGES)
    payload = (total + num_sm_parts - 1) // num_sm_parts + FIXED_OVERHEAD_PAGES

    # Every loop value derives from the lengths, so the carry has one type even where the lengths
    # vary across devices (inside shard_map).
    zero = jnp.zeros_like(total)
    previous_length = jnp.concatenate([lengths[:1], lengths[:-1]])

    # One step either ends a sequence (FITS) or ends a partition (the other three): at most
    # batch + parts steps. The four outcomes mirror the branches of the CUDA loop.
    ALL_PLACED, FITS, SPLIT, STOP_BEFORE = 0, 1, 2, 3

    def step(state):
        part, seq, page, split, remaining, begin, metadata, pieces = state
        current = jnp.minimum(seq, batch - 1)
        rest = pages[current] - page
        take = remaining - FIXED_OVERHEAD_PAGES
        fits = (rest + FIXED_OVERHEAD_PAGES <= remaining) | (part == num_sm_parts - 1)
        outcome = jnp.where(seq >= batch, ALL_PLACED,
                            jnp.where(fits, FITS, jnp.where(take > 0, SPLIT, STOP_BEFORE)))

        def pick(all_placed, fits_, split_, stop_before):
            return jnp.select([outcome == ALL_PLACED, outcome == FITS, outcome == SPLIT],
                              [all_placed, fits_, split_], stop_before)

        # Partitions begun after the last sequence get begin_seq == batch: no work. Stopping before
        # a sequence with nothing taken leaves begin_seq > end_seq: no work either.
        end_seq = pick(batch - 1, seq, seq, seq - 1)
        end_token = pick(lengths[batch - 1], lengths[current], (page + take) * PAGE_SIZE,
                         previous_length[current])
        row = jnp.concatenate([begin[:2], jnp.stack([end_seq, end_token]), begin[2:],
                               jnp.zeros((3,), jnp.int32) + zero])
        metadata = metadata.at[part].set(row)
        pieces = pieces.at[current].set(jnp.where(outcome == FITS, split + 1, pieces[current]))

        next_page = pick(zero, zero, page + take, page)
        next_split = pick(zero, zero, split + 1, split)
        next_begin = jnp.where(outcome == ALL_PLACED,
                               jnp.stack([zero + batch, zero, zero]),
                               jnp.stack([seq, next_page * PAGE_SIZE, next_split]))
        return (part + (outcome != FITS), seq + (outcome == FITS), next_page, next_split,
                jnp.where(outcome == FITS, remaining - (rest + FIXED_OVERHEAD_PAGES), payload),
                jnp.where(outcome == FITS, begin, next_begin), metadata, pieces)

    init = (zero, zero, zero, zero, payload, jnp.stack([zero, zero, zero]),
            jnp.zeros((num_sm_parts, SCHEDULER_FIELDS), jnp.int32) + zero,
            jnp.zeros((batch,), jnp.int32) + zero)
    state = lax.while_loop(lambda state: state[0] < num_sm_parts, step, init)
    metadata, pieces = state[6], state[7]
    num_splits = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(pieces, dtype=jnp.int32)])
    return metadata, num_splits
