"""Sharded decode on 8 virtual CPU devices: jit over a Mesh (custom_partitioning) and shard_map.

The page pool is the big array; these tests check that no program gathers or reshuffles it and that
every sharded layout gives the single-device answer.
"""

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla
from mla_cases import assert_close, make_case, oracle, random_lengths, stack_per_device

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


@pytest.fixture(scope="module")
def mesh():
    devices = np.array(jax.devices("cpu")[:8])
    assert devices.size == 8, "conftest asks for 8 CPU devices"
    return Mesh(devices.reshape(4, 2), ("data", "model"))


def sharded_decode(mesh, case, q_spec, causal):
    def fn(q, k, table, lengths):
        metadata, splits = jax_flashmla.get_mla_metadata(
            lengths, q.shape[1] * q.shape[2] // k.shape[2], k.shape[2])
        return jax_flashmla.flash_mla_with_kvcache(q, k, table, lengths, 512, metadata, splits,
                                                   causal=causal)

    batch_axis = q_spec[0]
    in_shardings = (NamedSharding(mesh, q_spec), NamedSharding(mesh, P()),
                    NamedSharding(mesh, P(batch_axis)), NamedSharding(mesh, P(batch_axis)))
    jitted = jax.jit(fn, in_shardings=in_shardings)
    args = [jax.device_put(a, s) for a, s in zip(case.args, in_shardings)]
    compiled = jitted.lower(*args).compile()
    return compiled(*args), compiled.as_text()


@pytest.mark.parametrize("q_spec", [
    P("data", None, None, None),
    P(None, None, "model", None),
    P("data", None, "model", None),
    P(("data", "model"), None, None, None),
], ids=["batch", "heads", "batch+heads", "batch-over-both-axes"])
def test_sharded_jit_matches_oracle_without_collectives(mesh, q_spec):
    rng = np.random.default_rng(20)
    batch = 8
    case = make_case(rng, batch=batch, seqlen_q=2, heads_q=4, causal=True,
                     lengths=random_lengths(rng, batch, 150))
    (out, lse), hlo = sharded_decode(mesh, case, q_spec, causal=True)
    assert_close(out, lse, *oracle(case), ml_dtypes.bfloat16)
    found = [name for name in COLLECTIVES if name in hlo]
    assert not found, f"sharded decode runs collectives {found}"
    expected_out_spec = q_spec
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, expected_out_spec), out.ndim)


def test_grouped_kv_heads_keep_heads_whole(mesh):
    # With h_kv > 1 the op keeps the head dimension whole (the pool's KV heads are not split);
    # the batch still runs sharded.
    rng = np.random.default_rng(21)
    case = make_case(rng, batch=4, seqlen_q=1, heads_q=4, heads_kv=2,
                     lengths=random_lengths(rng, 4, 100))
    (out, lse), hlo = sharded_decode(mesh, case, P("data", None, "model", None), causal=False)
    assert_close(out, lse, *oracle(case), ml_dtypes.bfloat16)
    pool_shape = ",".join(map(str, case.k_cache.shape))
    moved = [line for line in hlo.splitlines()
             if any(name in line for name in COLLECTIVES) and pool_shape in line]
    assert not moved, f"the page pool is moved between devices: {moved}"


def test_shard_map_with_per_device_pools_and_local_block_ids(mesh):
    # Data-parallel attention: each device owns a pool and the sequences whose pages live in it.
    rng = np.random.default_rng(22)
    shards, batch_per_shard = 4, 2
    cases = [make_case(rng, batch=batch_per_shard, seqlen_q=1, heads_q=4, spare_blocks=2,
                       lengths=random_lengths(rng, batch_per_shard, 120)) for _ in range(shards)]
    q, pool, table, lengths = stack_per_device(cases)

    data_mesh = Mesh(np.array(jax.devices("cpu")[:shards]), ("data",))

    def local(q, pool, table, lengths):
        metadata, splits = jax_flashmla.get_mla_metadata(lengths, 4, 1)
        return jax_flashmla.flash_mla_with_kvcache(q, pool, table, lengths, 512, metadata, splits)

    fn = jax.jit(jax.shard_map(local, mesh=data_mesh, in_specs=(P("data"),) * 4,
                               out_specs=(P("data"), P("data"))))
    out, lse = fn(q, pool, table, lengths)
    hlo = fn.lower(q, pool, table, lengths).compile().as_text()
    assert not [name for name in COLLECTIVES if name in hlo]
    for i, c in enumerate(cases):
        rows = slice(i * batch_per_shard, (i + 1) * batch_per_shard)
        assert_close(out[rows], lse[rows], *oracle(c), ml_dtypes.bfloat16)
