"""Stress and edge cases for the CUDA kernels, beyond tests/test_gpu.py (GPU only).

Covers what serving traffic can reach but the basic suite does not: a page pool past 2^31
elements, a 131072-token sequence, a batch of 512, empty batches of every tiling, +inf / -inf /
NaN garbage wherever no valid token lives, run-to-run bitwise determinism with split sequences,
and a hypothesis fuzz over shapes and lengths against the reference.

Inputs are generated on the device (random values in valid token slots, garbage everywhere else),
so even multi-gigabyte pools cost no host memory or transfer. Distinct shapes are few on purpose:
every new shape is a new compilation, and the whole file should run in a few minutes.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jax_flashmla
from mla_cases import FAR_OUT_OF_RANGE, HEAD_DIM, PAGE, Case, assert_close, make_case, oracle
from test_gpu import kernel, poison_device_memory, run  # noqa: F401  (kernel is a fixture)

pytestmark = pytest.mark.gpu

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
GARBAGE = ("nan", "+inf", "-inf", "mixed")


def garbage_fill(key, shape, dtype, garbage):
    """An array of NaN, +inf, -inf, or a random mix of the three."""
    choices = jnp.array([jnp.nan, jnp.inf, -jnp.inf], dtype)
    if garbage == "mixed":
        return choices[jax.random.randint(key, shape, 0, 3)]
    return jnp.full(shape, choices[("nan", "+inf", "-inf").index(garbage)])


@functools.partial(jax.jit, static_argnames=("batch", "seqlen_q", "heads_q", "heads_kv", "dtype",
                                             "garbage"))
def random_inputs(key, valid_tokens, *, batch, seqlen_q, heads_q, heads_kv, dtype, garbage):
    """q, and a pool whose row r holds random values in its first valid_tokens[r] slots only."""
    q_key, pool_key, garbage_key = jax.random.split(key, 3)
    q = jax.random.normal(q_key, (batch, seqlen_q, heads_q, HEAD_DIM), dtype)
    shape = (valid_tokens.shape[0], PAGE, heads_kv, HEAD_DIM)
    valid = jnp.arange(PAGE)[None, :, None, None] < valid_tokens[:, None, None, None]
    pool = jnp.where(valid, jax.random.normal(pool_key, shape, dtype),
                     garbage_fill(garbage_key, shape, dtype, garbage))
    return q, pool


def paged_layout(rng, lengths, num_blocks, table_width):
    """A block table giving each sequence distinct random pool rows, and valid tokens per row.

    Entries a sequence does not need hold what serving engines leave there: ids of other rows,
    negative ids, ids far beyond the pool.
    """
    pages = -(-lengths // PAGE)
    int32 = np.iinfo(np.int32)
    anything = rng.integers(int32.min, int32.max, (len(lengths), table_width), np.int32,
                            endpoint=True)
    in_pool = rng.integers(0, num_blocks, anything.shape, np.int32)
    table = np.where(rng.random(anything.shape) < 0.5, in_pool, anything).astype(np.int32)
    rows = rng.permutation(num_blocks)[:pages.sum()]
    valid_tokens = np.zeros(num_blocks, np.int32)
    start = 0
    for seq, length in enumerate(lengths):
        seq_rows = rows[start:start + pages[seq]]
        start += pages[seq]
        table[seq, :pages[seq]] = seq_rows
        valid_tokens[seq_rows] = np.minimum(PAGE, length - PAGE * np.arange(pages[seq]))
    return table, valid_tokens


def device_case(rng, lengths, *, seqlen_q, heads_q, heads_kv=1, dtype="bfloat16", causal=False,
                garbage="nan", table_width=None, num_blocks=None):
    """A Case whose q and pool live on the device; table and lengths stay NumPy."""
    lengths = np.asarray(lengths, np.int32)
    pages = -(-lengths // PAGE)
    table_width = table_width or int(pages.max(initial=0)) + 1
    num_blocks = num_blocks or int(pages.sum()) + 5
    table, valid_tokens = paged_layout(rng, lengths, num_blocks, table_width)
    q, pool = random_inputs(jax.random.key(int(rng.integers(1 << 31))), valid_tokens,
                            batch=len(lengths), seqlen_q=seqlen_q, heads_q=heads_q,
                            heads_kv=heads_kv, dtype=jnp.dtype(dtype), garbage=garbage)
    return Case(q, pool, table, lengths, causal, HEAD_DIM ** -0.5)


@functools.partial(jax.jit, static_argnames=("causal", "implementation"))
def decode(q, k_cache, block_table, cache_seqlens, *, causal, implementation):
    """One compiled program per shape and flag, reused across examples (run() recompiles)."""
    return jax_flashmla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                               causal=causal, implementation=implementation)


def decode_poisoned(case, implementation):
    poison_device_memory(case.q.size // HEAD_DIM * 512 * 2 * 4 + (1 << 26))
    out, lse = decode(*case.args, causal=case.causal, implementation=implementation)
    return np.asarray(out), np.asarray(lse)


# --- sizes --------------------------------------------------------------------------------------

HUGE_POOL_BLOCKS = 60_000  # x 64 x 576 bf16 = 2.2e9 elements, 4.4 GB


@functools.partial(jax.jit, static_argnames=("num_blocks",))
def nan_pool_with_pages(pages, rows, *, num_blocks):
    """A NaN pool of num_blocks rows with `pages` written at `rows`, built in place on the device."""
    pool = jnp.full((num_blocks, *pages.shape[1:]), jnp.nan, pages.dtype)
    return pool.at[rows].set(pages, unique_indices=True)


def test_page_pool_beyond_2_to_the_31_elements(kernel):
    rng = np.random.default_rng()
    lengths = np.array([3000, 17, 4096 + 200, 0, 1000, 640], np.int32)
    compact = device_case(rng, lengths, seqlen_q=2, heads_q=64, causal=True)
    compact_blocks = compact.k_cache.shape[0]
    # The last sequence's needed page 3 points just past the end of either pool: NaN rows.
    compact.block_table[5, 3] = compact_blocks

    # Same pages at the far end of a huge pool, every element offset past 2^31.
    far_rows = HUGE_POOL_BLOCKS - 1 - rng.permutation(compact_blocks)
    assert far_rows.min() * PAGE * HEAD_DIM >= 2 ** 31
    needed = np.arange(compact.block_table.shape[1])[None, :] < (-(-lengths // PAGE))[:, None]
    in_compact_pool = (compact.block_table >= 0) & (compact.block_table < compact_blocks)
    huge_table = np.where(needed & in_compact_pool,
                          far_rows[np.clip(compact.block_table, 0, compact_blocks - 1)],
                          compact.block_table)
    huge_table[5, 3] = HUGE_POOL_BLOCKS
    huge_pool = nan_pool_with_pages(compact.k_cache, jnp.asarray(far_rows, jnp.int32),
                                    num_blocks=HUGE_POOL_BLOCKS)
    huge = Case(compact.q, huge_pool, huge_table.astype(np.int32), lengths, True,
                compact.softmax_scale)

    expected = run(compact, "reference")
    assert np.isnan(expected[0][5]).all() and not np.isnan(expected[0][:5]).any()
    assert_close(*run(huge, kernel), *expected, ml_dtypes.bfloat16)


def test_one_sequence_of_131072_tokens(kernel):
    rng = np.random.default_rng()
    case = device_case(rng, [131072], seqlen_q=2, heads_q=128, causal=True)
    assert_close(*run(case, kernel), *run(case, "reference"), ml_dtypes.bfloat16)


def test_512_short_sequences_of_varied_length(kernel):
    rng = np.random.default_rng()
    lengths = rng.integers(0, 200, 512)
    lengths[rng.choice(512, 20, replace=False)] = 0
    case = make_case(rng, batch=512, seqlen_q=2, heads_q=32, lengths=lengths, causal=True)
    assert_close(*run(case, kernel), *oracle(case), ml_dtypes.bfloat16)


@pytest.mark.parametrize("batch,seqlen_q,heads_q,heads_kv",
                         [(1, 1, 1, 1), (64, 3, 64, 2), (512, 1, 128, 1)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_all_empty_batch_of_any_tiling(kernel, batch, seqlen_q, heads_q, heads_kv, causal):
    rng = np.random.default_rng()
    case = make_case(rng, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
                     lengths=np.zeros(batch, np.int32), causal=causal)
    assert (case.block_table == FAR_OUT_OF_RANGE).all() and np.isnan(case.k_cache).all()
    out, lse = run(case, kernel)
    assert out.shape == (batch, seqlen_q, heads_q, 512)
    assert (out == 0).all() and np.isposinf(lse).all()


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_outside_valid_tokens_never_reaches_outputs(kernel, garbage):
    # Partial last pages, pages shared by no one, unused table entries pointing at garbage-only
    # rows, and causal masking of real tokens: the float64 oracle reads valid tokens only.
    rng = np.random.default_rng()
    lengths = [1, 63, 64, 65, 0, 700, 2000, 130]
    case = device_case(rng, lengths, seqlen_q=2, heads_q=32, heads_kv=2, causal=True,
                       garbage=garbage, table_width=40)
    out, lse = decode_poisoned(case, kernel)
    host = Case(np.asarray(case.q), np.asarray(case.k_cache), case.block_table,
                case.cache_seqlens, case.causal, case.softmax_scale)
    assert_close(out, lse, *oracle(host), ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_five_runs_are_bitwise_identical_with_split_sequences(kernel, dtype):
    rng = np.random.default_rng()
    case = device_case(rng, [20000, 9000, 130, 0, 4000, 64], seqlen_q=2, heads_q=128,
                       causal=True, dtype=dtype)
    _, num_splits = jax_flashmla.get_mla_metadata(case.cache_seqlens, 2 * 128, 1)
    assert (np.diff(np.asarray(num_splits)) > 1).any(), "no sequence was split"
    first_out, first_lse = decode_poisoned(case, kernel)
    assert np.isfinite(first_out.astype(np.float32)).all()
    for _ in range(4):
        out, lse = decode_poisoned(case, kernel)
        np.testing.assert_array_equal(out.view(np.uint16), first_out.view(np.uint16))
        np.testing.assert_array_equal(lse.view(np.uint32), first_lse.view(np.uint32))


# --- fuzz -----------------------------------------------------------------------------------------

# (batch, s_q, h_q, h_kv): few shapes, each compiled once per dtype and mask, spanning one to
# four 64-row query tiles, one and two KV heads, odd head counts and batch 1..40.
FUZZ_SHAPES = [(1, 1, 1, 1), (1, 4, 128, 2), (3, 2, 16, 1), (7, 3, 10, 2), (12, 1, 126, 2),
               (17, 1, 128, 1), (40, 2, 64, 2), (40, 4, 2, 1)]
FUZZ_MAX_LENGTH = 3000
FUZZ_TABLE_WIDTH = -(-FUZZ_MAX_LENGTH // PAGE) + 2
# Page-boundary lengths are where off-by-ones live; hypothesis mixes them with arbitrary ones.
FUZZ_LENGTHS = st.one_of(st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129, FUZZ_MAX_LENGTH]),
                         st.integers(0, FUZZ_MAX_LENGTH))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(shape=st.sampled_from(FUZZ_SHAPES), dtype=st.sampled_from(list(DTYPES)),
       causal=st.booleans(), seed=st.integers(0, 2 ** 32 - 1), data=st.data())
def test_fuzz_against_the_reference(kernel, shape, dtype, causal, seed, data):
    batch, seqlen_q, heads_q, heads_kv = shape
    lengths = data.draw(st.lists(FUZZ_LENGTHS, min_size=batch, max_size=batch), label="lengths")
    rng = np.random.default_rng(seed)
    # Table width and pool size depend on the shape only, so the compiled programs are reused.
    case = device_case(rng, lengths, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
                       dtype=dtype, causal=causal, garbage="mixed", table_width=FUZZ_TABLE_WIDTH,
                       num_blocks=batch * (FUZZ_TABLE_WIDTH - 2) + 5)
    expected = decode_poisoned(case, "reference")
    assert_close(*decode_poisoned(case, kernel), *expected, DTYPES[dtype])
