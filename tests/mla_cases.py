"""Random paged-decode problems and a float64 NumPy oracle, shared by the CPU and GPU suites.

Cases look like serving traffic: variable lengths (some zero), a randomly permuted page pool,
unused block-table entries pointing far outside the pool, and NaN in every pool slot that holds
no valid token, so any read of garbage shows up in the result.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import ml_dtypes

PAGE = 64
HEAD_DIM = 576
HEAD_DIM_V = 512
FAR_OUT_OF_RANGE = 1 << 30


@dataclasses.dataclass
class Case:
    q: np.ndarray              # [b, s_q, h_q, 576] (bf16 / fp16)
    k_cache: np.ndarray        # [num_blocks, 64, h_kv, 576]
    block_table: np.ndarray    # int32 [b, max_blocks]
    cache_seqlens: np.ndarray  # int32 [b]
    causal: bool
    softmax_scale: float

    @property
    def args(self):
        return self.q, self.k_cache, self.block_table, self.cache_seqlens


def random_lengths(rng, batch, mean, *, allow_zero=True, fixed=False):
    if fixed:
        return np.full(batch, mean, np.int32)
    lengths = rng.normal(mean, mean / 2, batch).round()
    lengths = np.clip(lengths, 0, 2 * mean).astype(np.int32)
    if allow_zero and batch > 1:
        lengths[rng.integers(batch)] = 0
    return lengths


def make_case(rng, *, batch, seqlen_q, heads_q, heads_kv=1, lengths, dtype=ml_dtypes.bfloat16,
              causal=False, spare_blocks=3, extra_table_columns=1, softmax_scale=None):
    lengths = np.asarray(lengths, np.int32)
    pages_per_seq = (lengths + PAGE - 1) // PAGE
    max_blocks = max(int(pages_per_seq.max(initial=0)) + extra_table_columns, 1)
    num_blocks = int(pages_per_seq.sum()) + spare_blocks
    pool_rows = rng.permutation(num_blocks)

    k_cache = np.full((num_blocks, PAGE, heads_kv, HEAD_DIM), np.nan, np.float32)
    block_table = np.full((batch, max_blocks), FAR_OUT_OF_RANGE, np.int32)
    next_row = 0
    for seq, length in enumerate(lengths):
        for page in range(pages_per_seq[seq]):
            row = pool_rows[next_row]
            next_row += 1
            block_table[seq, page] = row
            valid = min(PAGE, length - page * PAGE)
            k_cache[row, :valid] = rng.standard_normal((valid, heads_kv, HEAD_DIM))
    q = rng.standard_normal((batch, seqlen_q, heads_q, HEAD_DIM)).astype(dtype)
    scale = HEAD_DIM ** -0.5 if softmax_scale is None else softmax_scale
    return Case(q, k_cache.astype(dtype), block_table, lengths, causal, scale)


def stack_per_device(cases):
    """Lays out one case per device for data-parallel decode with per-device page pools.

    Returns global (q, pool, block_table, cache_seqlens): shard i of each on its first axis holds
    case i, the pools padded to one size with NaN and the block ids left local to each pool.
    """
    shards, batch = len(cases), cases[0].q.shape[0]
    blocks = max(c.k_cache.shape[0] for c in cases)
    width = max(c.block_table.shape[1] for c in cases)
    pools = np.full((shards, blocks) + cases[0].k_cache.shape[1:], np.nan, cases[0].k_cache.dtype)
    tables = np.full((shards, batch, width), FAR_OUT_OF_RANGE, np.int32)
    for i, c in enumerate(cases):
        pools[i, :c.k_cache.shape[0]] = c.k_cache
        tables[i, :, :c.block_table.shape[1]] = c.block_table
    return (np.concatenate([c.q for c in cases]), pools.reshape((-1,) + pools.shape[2:]),
            tables.reshape(shards * batch, width), np.concatenate([c.cache_seqlens for c in cases]))


def oracle(case: Case):
    """float64 paged MLA decode, one sequence at a time, straight from the definition."""
    q = case.q.astype(np.float64)
    batch, seqlen_q, heads_q, _ = q.shape
    num_blocks, _, heads_kv, _ = case.k_cache.shape
    heads_per_kv = heads_q // heads_kv
    capacity = case.block_table.shape[1] * PAGE
    out = np.zeros((batch, seqlen_q, heads_q, HEAD_DIM_V))
    lse = np.full((batch, heads_q, seqlen_q), np.inf)
    for seq in range(batch):
        length = int(case.cache_seqlens[seq])
        if length < 0 or length > capacity:
            out[seq], lse[seq] = np.nan, np.nan
            continue
        keys = np.empty((length, heads_kv, HEAD_DIM))
        for token in range(length):
            block = case.block_table[seq, token // PAGE]
            keys[token] = (case.k_cache[block, token % PAGE].astype(np.float64)
                           if 0 <= block < num_blocks else np.nan)
        for t in range(seqlen_q):
            visible = length - seqlen_q + t + 1 if case.causal else length
            if visible <= 0:
                continue
            for head in range(heads_q):
                k = keys[:visible, head // heads_per_kv]
                scores = k @ q[seq, t, head] * case.softmax_scale
                peak = scores.max()
                weights = np.exp(scores - peak)
                total = weights.sum()
                out[seq, t, head] = weights @ k[:, :HEAD_DIM_V] / total
                lse[seq, head, t] = peak + np.log(total)
    return out, lse


def tolerances(dtype):
    """(atol, rtol) for out after casting to its dtype.

    Fast kernels round the softmax probabilities P to the input dtype before P·V (the tensor
    cores take 16-bit operands), so each term p_i·v_i carries a relative error up to one half-ulp
    (2^-9 for bf16, 2^-11 for fp16), on top of rounding the output itself. An element is a
    weighted mean of values of magnitude ~1, so its absolute error is bounded by about one ulp of
    the values: atol = 2^-8 (bf16) or 2^-10 (fp16). The cosine-similarity check in assert_close
    stays far tighter than that on the whole output.
    """
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return 2.0 ** -8, 2 / 128
    return 2.0 ** -10, 2 / 1024


def assert_close(out, lse, expected_out, expected_lse, dtype, value_scale=1.0):
    """FlashMLA's test criteria: elementwise tolerance, cosine similarity, exact inf/NaN positions.

    value_scale: the magnitude of the cached values relative to the ~1 that `tolerances` assumes
    (a cache multiplied by 3 has outputs, and output errors, 3 times larger).
    """
    out = np.asarray(out).astype(np.float64)
    lse = np.asarray(lse).astype(np.float64)
    expected_out = np.asarray(expected_out).astype(dtype).astype(np.float64)
    for name, got, want in (("out", out, expected_out), ("lse", lse, expected_lse)):
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN positions")
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want),
                                      err_msg=f"{name}: +inf positions")
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want),
                                      err_msg=f"{name}: -inf positions")
    finite = np.isfinite(expected_out)
    atol, rtol = tolerances(dtype)
    atol *= value_scale
    np.testing.assert_allclose(out[finite], expected_out[finite], atol=atol, rtol=rtol,
                               err_msg="out")
    if finite.any():
        a, b = out[finite], expected_out[finite]
        denominator = np.linalg.norm(a) * np.linalg.norm(b)
        if denominator > 0:
            assert a @ b / denominator >= 1 - 5e-6, f"out cosine similarity {a @ b / denominator}"
    finite_lse = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite_lse], expected_lse[finite_lse], atol=1e-4, rtol=1e-5,
                               err_msg="lse")
