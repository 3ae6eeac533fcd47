"""The tile scheduler's contract (csrc/mla_params.h), checked on its pure-JAX twin.

The GPU suite checks that the CUDA scheduler gives bit-identical metadata, so these properties hold
for both.
"""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax_flashmla
from jax_flashmla._constants import FIXED_OVERHEAD_PAGES, PAGE_SIZE


def pieces(metadata, num_splits, lengths):
    """Expands metadata into {seq: [(lo, hi, slot), ...]} following the documented layout."""
    batch = len(lengths)
    found = {seq: [] for seq in range(batch)}
    for begin_seq, begin_token, end_seq, end_token, begin_split, *reserved in metadata:
        assert reserved == [0, 0, 0]
        if begin_seq >= batch or begin_seq > end_seq:
            continue
        for seq in range(begin_seq, end_seq + 1):
            lo = begin_token if seq == begin_seq else 0
            hi = end_token if seq == end_seq else max(int(lengths[seq]), 0)
            slot = num_splits[seq] + (begin_split if seq == begin_seq else 0)
            found[seq].append((lo, hi, slot))
    return found


def check_schedule(lengths, num_sm_parts):
    lengths = np.asarray(lengths, np.int32)
    metadata, num_splits = jax_flashmla.get_mla_metadata(lengths, 64, 1, num_sm_parts=num_sm_parts)
    metadata, num_splits = np.asarray(metadata), np.asarray(num_splits)
    assert metadata.shape == (num_sm_parts, 8) and num_splits.shape == (len(lengths) + 1,)
    assert num_splits[0] == 0
    slots = []
    for seq, found in pieces(metadata, num_splits, lengths).items():
        length = max(int(lengths[seq]), 0)
        assert len(found) == num_splits[seq + 1] - num_splits[seq], f"seq {seq}: {found}"
        # Pieces tile [0, length) in order, page-aligned, each non-empty unless length == 0.
        position = 0
        for lo, hi, slot in found:
            assert lo == position and lo % PAGE_SIZE == 0 and (hi > lo or length == 0)
            position = hi
            slots.append(slot)
        assert position == length, f"seq {seq} covered up to {position} of {length}"
        assert [s for *_, s in found] == list(range(num_splits[seq], num_splits[seq + 1]))
    assert len(set(slots)) == len(slots) and max(slots) < len(lengths) + num_sm_parts
    return metadata, num_splits


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 5000), min_size=1, max_size=40),
       num_sm_parts=st.integers(1, 40))
def test_schedule_covers_every_token_exactly_once(lengths, num_sm_parts):
    check_schedule(lengths, num_sm_parts)


def test_schedule_balances_equal_sequences():
    lengths = [4096] * 8
    metadata, _ = check_schedule(lengths, 16)
    total = sum(-(-n // PAGE_SIZE) + FIXED_OVERHEAD_PAGES for n in lengths)
    loads = []
    for seq_pieces in pieces(metadata, np.asarray(check_schedule(lengths, 16)[1]),
                             lengths).values():
        loads.extend(-(-(hi - lo) // PAGE_SIZE) for lo, hi, _ in seq_pieces)
    assert max(loads) <= total // 16 + FIXED_OVERHEAD_PAGES


def test_negative_lengths_are_scheduled_as_empty():
    check_schedule([-3, 100, -1], 4)


def test_all_empty_batch_is_covered():
    check_schedule([0] * 10, 3)


def test_more_partitions_than_work_leaves_the_rest_empty():
    metadata, _ = check_schedule([1], 10)
    assert all(row[0] >= 1 for row in metadata[1:])


def test_default_partition_count_follows_the_sm_count():
    metadata, _ = jax_flashmla.get_mla_metadata(np.array([5], np.int32), 128, 1)
    assert metadata.shape == (132 // 2, 8)  # 128 rows = two 64-row tiles on a 132-SM GPU
    metadata, _ = jax_flashmla.get_mla_metadata(np.array([5], np.int32), 16, 2)
    assert metadata.shape == (132 // 2, 8)


def test_metadata_is_jittable_and_vmappable():
    lengths = np.array([[10, 300, 0], [64, 65, 4000]], np.int32)
    mapped = jax.vmap(lambda l: jax_flashmla.get_mla_metadata(l, 64, 1, num_sm_parts=5))(lengths)
    for i in range(2):
        single = jax.jit(lambda l: jax_flashmla.get_mla_metadata(l, 64, 1, num_sm_parts=5))(
            lengths[i])
        np.testing.assert_array_equal(mapped[0][i], single[0])
        np.testing.assert_array_equal(mapped[1][i], single[1])


@pytest.mark.parametrize("bad,error", [
    (dict(cache_seqlens=np.zeros((2, 2), np.int32)), "cache_seqlens must be 1-D"),
    (dict(cache_seqlens=np.zeros(3, np.int64)), "cache_seqlens must be int32"),
    (dict(num_q_tokens_per_head_k=0), "num_q_tokens_per_head_k must be a positive int"),
    (dict(num_heads_k=0), "num_heads_k must be a positive int"),
    (dict(num_sm_parts=0), "num_sm_parts must be a positive int"),
])
def test_metadata_rejects_bad_arguments(bad, error):
    args = dict(cache_seqlens=np.zeros(3, np.int32), num_q_tokens_per_head_k=64, num_heads_k=1)
    args.update(bad)
    num_sm_parts = args.pop("num_sm_parts", None)
    with pytest.raises((ValueError, TypeError), match=error):
        jax_flashmla.get_mla_metadata(**args, num_sm_parts=num_sm_parts)
