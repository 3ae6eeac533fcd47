"""The pure-JAX path (what CPU users run, and the GPU kernels' yardstick) against the float64 oracle."""


import jax
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla
from mla_cases import assert_close, make_case, oracle, random_lengths

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}


def run(case, **kwargs):
    fn = jax.jit(lambda q, k, t, l: jax_flashmla.flash_mla_with_kvcache(
        q, k, t, l, 512, softmax_scale=case.softmax_scale, causal=case.causal, **kwargs))
    return fn(*case.args)


MATRIX = [
    # batch, s_q, h_q, h_kv, mean length
    (1, 1, 1, 1, 20),
    (2, 1, 3, 1, 140),
    (6, 2, 9, 1, 20),
    (2, 4, 16, 1, 140),
    (6, 1, 63, 1, 300),
    (2, 2, 64, 2, 140),
    (1, 3, 8, 8, 200),
    (2, 1, 126, 2, 70),
]


@pytest.mark.parametrize("batch,seqlen_q,heads_q,heads_kv,mean",
                         MATRIX, ids=lambda v: str(v))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_reference_matches_float64_oracle(batch, seqlen_q, heads_q, heads_kv, mean, causal, dtype):
    rng = np.random.default_rng(hash((batch, seqlen_q, heads_q, heads_kv, mean, causal)) % 2**32)
    case = make_case(rng, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
                     lengths=random_lengths(rng, batch, mean), dtype=DTYPES[dtype], causal=causal)
    out, lse = run(case)
    assert_close(out, lse, *oracle(case), DTYPES[dtype])


def test_empty_sequence_gives_zero_output_and_infinite_lse():
    rng = np.random.default_rng(1)
    case = make_case(rng, batch=3, seqlen_q=1, heads_q=4, lengths=[0, 50, 0])
    out, lse = run(case)
    assert np.all(np.asarray(out)[[0, 2]] == 0)
    assert np.all(np.isposinf(np.asarray(lse)[[0, 2]]))
    assert np.all(np.isfinite(np.asarray(lse)[1]))


def test_causal_rows_that_see_no_key_are_empty():
    # s_q = 4 queries over 2 keys: query tokens 0 and 1 see nothing, 2 sees key 0, 3 sees both.
    rng = np.random.default_rng(2)
    case = make_case(rng, batch=1, seqlen_q=4, heads_q=2, lengths=[2], causal=True)
    out, lse = run(case)
    lse = np.asarray(lse)
    assert np.all(np.isposinf(lse[0, :, :2])) and np.all(np.isfinite(lse[0, :, 2:]))
    assert np.all(np.asarray(out)[0, :2] == 0)
    assert_close(out, lse, *oracle(case), ml_dtypes.bfloat16)


def test_nan_in_unused_slots_never_reaches_outputs():
    rng = np.random.default_rng(3)
    case = make_case(rng, batch=4, seqlen_q=2, heads_q=8, lengths=[2, 63, 65, 130], causal=True)
    out, lse = run(case)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert np.isfinite(np.asarray(lse)).all()


def test_malformed_lengths_and_block_ids_give_nan_rows_only():
    rng = np.random.default_rng(4)
    case = make_case(rng, batch=4, seqlen_q=1, heads_q=4, lengths=[70, 70, 70, 70])
    capacity = case.block_table.shape[1] * 64
    case.cache_seqlens[1] = -5                # negative length
    case.cache_seqlens[2] = capacity + 1      # beyond the table
    case.block_table[3, 1] = case.k_cache.shape[0]  # a needed page outside the pool
    out, lse = run(case)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.isfinite(out[0]).all() and np.isfinite(lse[0]).all()
    for seq in (1, 2, 3):
        assert np.isnan(out[seq]).all() and np.isnan(lse[seq]).all()
    assert_close(out, lse, *oracle(case), ml_dtypes.bfloat16)


def test_a_bad_page_gives_nan_only_to_the_rows_that_see_it():
    # Causal, s_q 2: the first query token sees tokens 0..63 of a 65-token sequence, the second
    # also token 64, the only one on page 1.
    rng = np.random.default_rng(6)
    case = make_case(rng, batch=2, seqlen_q=2, heads_q=4, lengths=[65, 65], causal=True)
    case.block_table[1, 1] = -1
    out, lse = run(case)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.isfinite(out[:, 0]).all() and np.isfinite(lse[:, :, 0]).all()
    assert np.isfinite(out[0]).all() and np.isnan(out[1, 1]).all() and np.isnan(lse[1, :, 1]).all()
    assert_close(out, lse, *oracle(case), ml_dtypes.bfloat16)


def test_custom_softmax_scale_is_applied():
    rng = np.random.default_rng(5)
    case = make_case(rng, batch=2, seqlen_q=1, heads_q=4, lengths=[100, 30], softmax_scale=0.3)
    assert_close(*run(case), *oracle(case), ml_dtypes.bfloat16)


def test_permuted_block_table_matches_identity_layout():
    rng = np.random.default_rng(6)
    case = make_case(rng, batch=2, seqlen_q=1, heads_q=4, lengths=[200, 130])
    out, lse = run(case)
    # Re-lay the same tokens out contiguously: the answer must not change.
    pages = [case.k_cache[row] for row in case.block_table[:, :4].reshape(-1)
             if 0 <= row < case.k_cache.shape[0]]
    contiguous = np.stack(pages)
    table = np.full_like(case.block_table, 1 << 30)
    table[0, :4], table[1, :3] = np.arange(4), np.arange(4, 7)
    out2, lse2 = jax_flashmla.flash_mla_with_kvcache(case.q, contiguous, table, case.cache_seqlens,
                                                     512)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse2))


def test_zero_batch_returns_empty_outputs():
    q = np.zeros((0, 1, 4, 576), ml_dtypes.bfloat16)
    k = np.zeros((1, 64, 1, 576), ml_dtypes.bfloat16)
    out, lse = jax_flashmla.flash_mla_with_kvcache(q, k, np.zeros((0, 1), np.int32),
                                                   np.zeros((0,), np.int32), 512)
    assert out.shape == (0, 1, 4, 512) and lse.shape == (0, 4, 1)


