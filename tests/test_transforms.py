"""The op under JAX's transformations: jit, vmap, scan, export, and its CUDA lowering."""

import re

import jax
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla._extension import DECODE_TARGET, METADATA_TARGET
from mla_cases import assert_close, make_case, oracle, random_lengths


def decode(q, k, table, lengths, *schedule, causal=False):
    return jax_flashmla.flash_mla_with_kvcache(q, k, table, lengths, 512, *schedule, causal=causal)


def test_metadata_reused_across_layers_in_scan_matches_per_layer_calls():
    rng = np.random.default_rng(10)
    case = make_case(rng, batch=3, seqlen_q=2, heads_q=8, lengths=random_lengths(rng, 3, 100),
                     causal=True)
    layers = 3
    pools = np.stack([case.k_cache] * layers)
    pools[1] = make_case(rng, batch=3, seqlen_q=2, heads_q=8, lengths=case.cache_seqlens).k_cache
    # Same table layout for every layer; layer 1 has other values in the same slots.
    pools[1] = np.where(np.isnan(case.k_cache.astype(np.float32)), case.k_cache,
                        rng.standard_normal(case.k_cache.shape).astype(case.k_cache.dtype))

    @jax.jit
    def step(q, pools, table, lengths):
        metadata, splits = jax_flashmla.get_mla_metadata(lengths, 2 * 8, 1)

        def layer(carry, pool):
            out, lse = decode(q, pool, table, lengths, metadata, splits, causal=True)
            return carry, (out, lse)

        return jax.lax.scan(layer, 0, pools)[1]

    outs, lses = step(case.q, pools, case.block_table, case.cache_seqlens)
    for i in range(layers):
        case.k_cache = pools[i]
        assert_close(outs[i], lses[i], *oracle(case), ml_dtypes.bfloat16)


def test_vmap_over_batches_with_a_shared_pool():
    rng = np.random.default_rng(11)
    cases = [make_case(rng, batch=2, seqlen_q=1, heads_q=4, lengths=random_lengths(rng, 2, 90))
             for _ in range(3)]
    # One pool holds every instance's pages: instance i's table points into its own rows.
    pool = np.concatenate([c.k_cache for c in cases])
    offsets = np.cumsum([0] + [c.k_cache.shape[0] for c in cases[:-1]])
    width = max(c.block_table.shape[1] for c in cases)
    tables = np.full((3, 2, width), 1 << 30, np.int32)
    for i, c in enumerate(cases):
        valid = c.block_table < c.k_cache.shape[0]
        tables[i, :, :c.block_table.shape[1]] = np.where(valid, c.block_table + offsets[i], 1 << 30)
    q = np.stack([c.q for c in cases])
    lengths = np.stack([c.cache_seqlens for c in cases])
    outs, lses = jax.jit(jax.vmap(lambda q, t, l: decode(q, pool, t, l)))(q, tables, lengths)
    for i, c in enumerate(cases):
        assert_close(outs[i], lses[i], *oracle(c), ml_dtypes.bfloat16)


def test_vmap_over_per_instance_pools_keeps_block_ids_local():
    rng = np.random.default_rng(12)
    lengths = random_lengths(rng, 2, 120)
    cases = [make_case(rng, batch=2, seqlen_q=2, heads_q=4, lengths=lengths, causal=True)
             for _ in range(2)]
    pools = np.stack([c.k_cache for c in cases])
    tables = np.stack([c.block_table for c in cases])
    q = np.stack([c.q for c in cases])

    def one(q, pool, table, lengths):
        metadata, splits = jax_flashmla.get_mla_metadata(lengths, 8, 1)
        return decode(q, pool, table, lengths, metadata, splits, causal=True)

    outs, lses = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)))(q, pools, tables, lengths)
    for i, c in enumerate(cases):
        assert_close(outs[i], lses[i], *oracle(c), ml_dtypes.bfloat16)


def test_nested_vmap_matches_unmapped_calls():
    rng = np.random.default_rng(13)
    case = make_case(rng, batch=2, seqlen_q=1, heads_q=2, lengths=[70, 5])
    q = np.stack([np.stack([case.q, case.q[::-1]])] * 2)
    outs, _ = jax.vmap(jax.vmap(lambda q: decode(q, case.k_cache, case.block_table,
                                                 case.cache_seqlens)))(q)
    single, _ = decode(case.q[::-1], case.k_cache, case.block_table, case.cache_seqlens)
    np.testing.assert_array_equal(np.asarray(outs[1, 1]), np.asarray(single))


def test_export_round_trip_runs_and_matches():
    rng = np.random.default_rng(14)
    case = make_case(rng, batch=2, seqlen_q=1, heads_q=4, lengths=[100, 7])
    fn = jax.jit(lambda *a: decode(*a))
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in case.args]
    exported = jax.export.export(fn)(*specs)
    restored = jax.export.deserialize(exported.serialize())
    out, lse = restored.call(*case.args)
    expected = fn(*case.args)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(expected[1]))


needs_extension = pytest.mark.skipif(not jax_flashmla.cuda_extension_available(),
                                     reason="the CUDA extension was not built")


@needs_extension
def test_cuda_lowering_emits_our_versioned_custom_calls():
    rng = np.random.default_rng(15)
    case = make_case(rng, batch=2, seqlen_q=2, heads_q=4, lengths=[100, 7])
    lowered = jax.jit(lambda *a: decode(*a)).trace(*case.args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert set(re.findall(r"jax_flashmla_mla_\w+_v\d+", text)) == {DECODE_TARGET, METADATA_TARGET}
    # Typed FFI attributes, not an opaque legacy backend_config string.
    assert "mhlo.backend_config = {causal = false, kernel = 0 : i64" in text


@needs_extension
def test_multi_platform_export_keeps_the_cuda_kernel_and_runs_on_cpu():
    rng = np.random.default_rng(16)
    case = make_case(rng, batch=2, seqlen_q=1, heads_q=4, lengths=[100, 7])
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in case.args]
    checks = [jax.export.DisabledSafetyCheck.custom_call(name)
              for name in (DECODE_TARGET, METADATA_TARGET)]
    exported = jax.export.export(jax.jit(lambda *a: decode(*a)), platforms=("cpu", "cuda"),
                                 disabled_checks=checks)(*specs)
    assert DECODE_TARGET in exported.mlir_module()
    out, lse = jax.export.deserialize(exported.serialize()).call(*case.args)
    assert_close(out, lse, *oracle(case), ml_dtypes.bfloat16)


def test_reference_implementation_never_emits_a_custom_call():
    rng = np.random.default_rng(17)
    case = make_case(rng, batch=1, seqlen_q=1, heads_q=4, lengths=[100])
    text = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(
        *a, 512, implementation="reference")).trace(*case.args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert DECODE_TARGET not in text


