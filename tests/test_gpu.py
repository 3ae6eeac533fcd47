"""The CUDA kernels against the reference, on a real GPU (skipped elsewhere: see conftest.py).

Every kernel family runs the same cases: the portable sm_80+ kernel everywhere, the Hopper kernel
on compute capability 9.0. Outputs land in device memory that was just filled with NaN, so any
element a kernel forgets to write shows up as a NaN mismatch.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla._constants import SCHEDULER_FIELDS
from jax_flashmla._extension import SCHEDULE_VARIABLE, hopper_schedule
from jax_flashmla._reference import tile_scheduler_reference
from mla_cases import assert_close, make_case, oracle, random_lengths

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}


def kernels():
    names = ["portable"]
    if jax_flashmla.hopper_kernel_available():
        names.append("hopper")
    return names


@pytest.fixture(params=["portable", "hopper"])
def kernel(request):
    if request.param not in kernels():
        pytest.skip("this build has no Hopper kernel")
    device = jax.devices()[0]
    if request.param == "hopper" and getattr(device, "compute_capability", "9.0") != "9.0":
        pytest.skip("the Hopper kernel needs compute capability 9.0")
    return request.param


def poison_device_memory(nbytes):
    """Fills, then frees, device memory so the next outputs likely start as NaN, not stale data."""
    filler = jnp.full((max(nbytes // 4, 1),), jnp.nan, jnp.float32)
    filler.block_until_ready()
    del filler


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal", "implementation"))
def _decode(q, k_cache, block_table, cache_seqlens, *schedule, softmax_scale, causal,
            implementation):
    return jax_flashmla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                               *schedule, softmax_scale=softmax_scale,
                                               causal=causal, implementation=implementation)


def run(case, implementation, *schedule):
    """Decodes `case` into freshly poisoned memory; one compiled program per shape and flags."""
    out_bytes = case.q.size // 576 * 512 * 2 * 4
    poison_device_memory(out_bytes + (1 << 26))
    out, lse = _decode(*case.args, *schedule, softmax_scale=case.softmax_scale,
                       causal=case.causal, implementation=implementation)
    return np.asarray(out), np.asarray(lse)


SMALL = [
    # batch, s_q, h_q, h_kv, mean length
    (1, 1, 1, 1, 20),
    (2, 1, 3, 1, 140),
    (6, 2, 9, 1, 140),
    (2, 4, 16, 1, 300),
    (6, 1, 63, 1, 500),
    (2, 2, 64, 2, 140),
    (6, 1, 128, 1, 1000),
    (2, 2, 126, 2, 700),
    (1, 3, 8, 8, 200),
    (64, 1, 16, 1, 20),
]


@pytest.mark.parametrize("batch,seqlen_q,heads_q,heads_kv,mean", SMALL, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel_matches_float64_oracle(kernel, batch, seqlen_q, heads_q, heads_kv, mean, causal,
                                       dtype):
    rng = np.random.default_rng()
    case = make_case(rng, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
                     lengths=random_lengths(rng, batch, mean), dtype=DTYPES[dtype], causal=causal)
    assert_close(*run(case, kernel), *oracle(case), DTYPES[dtype])


LARGE = [
    # batch, s_q, h_q, mean length, fixed lengths
    (128, 1, 128, 4096, False),
    (128, 2, 128, 4096, False),
    (128, 2, 16, 8192, False),
    (64, 1, 64, 8192, True),
    (8, 1, 128, 16384, False),
    (1, 1, 128, 16384, True),
    (1, 2, 16, 16384, True),
]


@pytest.mark.parametrize("batch,seqlen_q,heads_q,mean,fixed", LARGE, ids=str)
def test_kernel_matches_reference_at_serving_sizes(kernel, batch, seqlen_q, heads_q, mean, fixed):
    rng = np.random.default_rng()
    case = make_case(rng, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, causal=True,
                     lengths=random_lengths(rng, batch, mean, fixed=fixed, allow_zero=not fixed))
    expected = run(case, "reference")
    assert_close(*run(case, kernel), *expected, ml_dtypes.bfloat16)


def test_cuda_scheduler_matches_its_reference_bit_for_bit():
    rng = np.random.default_rng()
    cpu = jax.devices("cpu")[0]
    for batch, parts in [(1, 132), (7, 3), (128, 66), (128, 33), (513, 132), (40, 1)]:
        lengths = random_lengths(rng, batch, int(rng.integers(1, 9000)))
        lengths[: batch // 5] = rng.integers(0, 70, batch // 5)
        metadata, splits = jax_flashmla.get_mla_metadata(lengths, 64, 1, num_sm_parts=parts)
        with jax.default_device(cpu):
            want = jax.jit(tile_scheduler_reference, static_argnums=1)(lengths, parts)
        np.testing.assert_array_equal(np.asarray(metadata), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(splits), np.asarray(want[1]))


def test_hopper_and_portable_kernels_agree():
    if len(kernels()) < 2 or jax.devices()[0].compute_capability != "9.0":
        pytest.skip("needs both kernel families")
    rng = np.random.default_rng()
    case = make_case(rng, batch=32, seqlen_q=2, heads_q=64, causal=True,
                     lengths=random_lengths(rng, 32, 3000))
    assert_close(*run(case, "hopper"), *run(case, "portable"), ml_dtypes.bfloat16)


@pytest.mark.parametrize("seqlen_q,heads_q", [(2, 128), (1, 64)], ids=["seesaw", "split"])
def test_repeated_runs_are_bitwise_identical(kernel, monkeypatch, seqlen_q, heads_q):
    monkeypatch.delenv(SCHEDULE_VARIABLE, raising=False)
    rng = np.random.default_rng()
    case = make_case(rng, batch=16, seqlen_q=seqlen_q, heads_q=heads_q, causal=True,
                     lengths=random_lengths(rng, 16, 5000))
    first = run(case, kernel)
    for _ in range(3):
        again = run(case, kernel)
        np.testing.assert_array_equal(first[0].view(np.uint16), again[0].view(np.uint16))
        np.testing.assert_array_equal(first[1].view(np.uint32), again[1].view(np.uint32))


def hand_made_schedule(lengths, partitions, num_sm_parts):
    """Scheduler metadata for the given partitions, (begin_seq, begin_token, end_seq, end_token
    or None for the sequence's length) in order and covering every token, followed by empty
    ones up to num_sm_parts; and the matching num_splits (mla_params.h's contract)."""
    batch = len(lengths)
    metadata = np.zeros((num_sm_parts, SCHEDULER_FIELDS), np.int32)
    metadata[:, 0] = batch  # begin_seq past the batch: no work
    pieces = np.zeros(batch, np.int32)
    for index, (begin_seq, begin_token, end_seq, end_token) in enumerate(partitions):
        end_token = lengths[end_seq] if end_token is None else end_token
        metadata[index, :5] = begin_seq, begin_token, end_seq, end_token, pieces[begin_seq]
        pieces[begin_seq:end_seq + 1] += 1
    return jnp.asarray(metadata), jnp.asarray(np.concatenate([[0], np.cumsum(pieces)]),
                                              jnp.int32)


@pytest.mark.parametrize("partitions,bad_page", [
    ([(0, 0, 2, None)], None),
    ([(0, 0, 1, 2048), (1, 2048, 2, None)], None),
    ([(0, 0, 1, 2048), (1, 2048, 2, None)], (1, 20)),
], ids=["one-busy-partition", "split", "split-bad-page"])
@pytest.mark.parametrize("seqlen_q,causal", [(1, False), (2, True)], ids=["s_q1", "s_q2-causal"])
def test_a_schedule_from_elsewhere_with_idle_partitions(kernel, monkeypatch, partitions, bad_page,
                                                        seqlen_q, causal):
    # Metadata is an input: any schedule that keeps mla_params.h's contract must decode right,
    # here one or two busy partitions (several sequences each, one of them split across both,
    # with a bad block id in its first piece or not) and six that have no work.
    monkeypatch.setenv(SCHEDULE_VARIABLE, "split")
    rng = np.random.default_rng()
    lengths = [300, 2900, 6000]
    case = make_case(rng, batch=3, seqlen_q=seqlen_q, heads_q=16, causal=causal, lengths=lengths)
    if bad_page is not None:
        case.block_table[bad_page] = -5
    out, lse = run(case, kernel, *hand_made_schedule(lengths, partitions, num_sm_parts=8))
    want_out, want_lse = oracle(case)
    assert np.isfinite(want_out[2]).all()
    assert np.isnan(want_out[1]).all() == (bad_page is not None)
    assert_close(out, lse, want_out, want_lse, ml_dtypes.bfloat16)


def test_metadata_reused_by_every_layer_in_a_scan(kernel):
    rng = np.random.default_rng()
    case = make_case(rng, batch=8, seqlen_q=1, heads_q=32, lengths=random_lengths(rng, 8, 2000))
    layers = 3
    pools = jnp.stack([jnp.asarray(case.k_cache) * (i + 1) for i in range(layers)])

    @jax.jit
    def step(q, pools, table, lengths):
        metadata, splits = jax_flashmla.get_mla_metadata(lengths, 32, 1)

        def layer(_, pool):
            return None, jax_flashmla.flash_mla_with_kvcache(
                q, pool, table, lengths, 512, metadata, splits, implementation=kernel)

        return jax.lax.scan(layer, None, pools)[1]

    outs, lses = step(case.q, pools, case.block_table, case.cache_seqlens)
    for i in range(layers):
        case.k_cache = np.asarray(pools[i])
        # Layer i's values are (i + 1) times larger, and so are its rounding errors.
        assert_close(outs[i], lses[i], *run(case, "reference"), ml_dtypes.bfloat16,
                     value_scale=i + 1)


def test_faulty_lengths_and_block_ids_give_nan_rows_and_stay_in_bounds(kernel):
    rng = np.random.default_rng()
    case = make_case(rng, batch=6, seqlen_q=2, heads_q=16, causal=True,
                     lengths=[300, 300, 300, 300, 0, 5000])
    capacity = case.block_table.shape[1] * 64
    case.cache_seqlens[1] = -1
    case.cache_seqlens[2] = capacity + 64
    case.block_table[3, 2] = -7
    case.block_table[5, 10] = case.k_cache.shape[0] + 3
    assert_close(*run(case, kernel), *oracle(case), ml_dtypes.bfloat16)


def test_faulty_block_ids_and_lengths_with_several_query_tiles_give_nan_rows(kernel, monkeypatch):
    # Two 64-row query tiles per KV head: the Hopper kernel's seesaw schedule, which takes pages
    # in pairs and loads them in groups re-armed by either warpgroup. The bad entries fall on a
    # pair's first page, its second, both (three bad pages in a row hold a whole pair and a mixed
    # one, wherever the partitions begin), a sequence's first page, and a last page only the
    # second query token sees (its first row stays finite). Sequence 2 has no fault: its rows must
    # come out right after the faulty ones' pages went through the same stages.
    monkeypatch.delenv(SCHEDULE_VARIABLE, raising=False)
    rng = np.random.default_rng()
    batch, seqlen_q, heads_q, num_sm_parts = 6, 2, 64, 8
    case = make_case(rng, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, causal=True,
                     lengths=[900, 1300, 1000, 700, 513, 300])
    num_pages = case.k_cache.shape[0]
    capacity = case.block_table.shape[1] * 64
    case.block_table[0, 2] = -7
    case.block_table[1, 6:9] = [num_pages, -1, num_pages + 5]
    case.block_table[3, [0, 10]] = [-2, 1 << 20]
    case.block_table[4, 8] = -3  # holds token 512 alone, past the first query token's limit
    case.cache_seqlens[5] = capacity + 64
    rows_per_kv = seqlen_q * heads_q
    if kernel == "hopper":  # the situation under test (None in a build without that kernel)
        assert hopper_schedule(batch, rows_per_kv, case.block_table.shape[1], num_pages,
                               num_sm_parts) == "seesaw"
    metadata, splits = jax_flashmla.get_mla_metadata(case.cache_seqlens, rows_per_kv, 1,
                                                     num_sm_parts=num_sm_parts)
    out, lse = run(case, kernel, metadata, splits)
    want_out, want_lse = oracle(case)
    assert np.isfinite(want_out[2]).all() and np.isfinite(want_out[4, 0]).all()
    assert np.isnan(want_out[4, 1]).all()
    assert_close(out, lse, want_out, want_lse, ml_dtypes.bfloat16)


def test_a_sequence_after_a_length_past_the_table_reads_its_own_queries(kernel):
    # A length far past the block table's capacity makes the scheduler start partitions deep
    # inside that sequence, where the kernel has no page to read; the partition's next sequence
    # must still load its own queries, not decode with the previous sequence's.
    rng = np.random.default_rng()
    case = make_case(rng, batch=3, seqlen_q=2, heads_q=16, causal=True, lengths=[300, 300, 900])
    capacity = case.block_table.shape[1] * 64
    case.cache_seqlens[0] = -1
    case.cache_seqlens[1] = 1 << 20
    metadata, splits = jax_flashmla.get_mla_metadata(case.cache_seqlens, 32, 1, num_sm_parts=5)
    begin_seq, begin_token, end_seq = np.asarray(metadata)[-1, :3]
    assert (begin_seq, end_seq) == (1, 2) and begin_token > capacity  # the situation under test
    assert_close(*run(case, kernel, metadata, splits), *oracle(case), ml_dtypes.bfloat16)


def test_all_empty_batch(kernel):
    rng = np.random.default_rng()
    case = make_case(rng, batch=5, seqlen_q=1, heads_q=64, lengths=[0] * 5)
    out, lse = run(case, kernel)
    assert (out == 0).all() and np.isposinf(lse).all()


def test_one_long_sequence_split_across_every_sm(kernel):
    rng = np.random.default_rng()
    case = make_case(rng, batch=1, seqlen_q=1, heads_q=16, lengths=[65536 + 17])
    assert_close(*run(case, kernel), *run(case, "reference"), ml_dtypes.bfloat16)


def test_a_row_in_more_pieces_than_one_combine_pass_takes(kernel):
    # The small-batch combine merges up to 256 pieces of a row per pass; 512 partitions cut this
    # sequence into more, so its rows take two passes (the running maximum carried across).
    rng = np.random.default_rng()
    case = make_case(rng, batch=1, seqlen_q=1, heads_q=16, lengths=[65536 + 17])
    metadata, num_splits = jax_flashmla.get_mla_metadata(case.args[3], 16, 1, num_sm_parts=512)
    assert int(num_splits[1]) > 256
    assert_close(*run(case, kernel, metadata, num_splits), *run(case, "reference"),
                 ml_dtypes.bfloat16)
