"""Sharded decode on several real GPUs of one host (skipped with fewer than two GPUs).

The same layouts as test_sharding.py, on GPUs and through our CUDA kernels: batch- and
head-sharded jit over a Mesh, and shard_map with per-device pools. Results must match a
single-GPU run, and no program may move the page pool between devices.
"""

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla
from mla_cases import assert_close, make_case, random_lengths, stack_per_device

pytestmark = pytest.mark.multigpu

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


def gpus():
    try:
        return [device for device in jax.devices() if device.platform == "gpu"]
    except RuntimeError:
        return []


def decode(q, k, table, lengths):
    metadata, splits = jax_flashmla.get_mla_metadata(
        lengths, q.shape[1] * q.shape[2] // k.shape[2], k.shape[2])
    return jax_flashmla.flash_mla_with_kvcache(q, k, table, lengths, 512, metadata, splits,
                                               causal=True)


def single_gpu(case):
    return jax.jit(decode)(*jax.device_put(case.args, gpus()[0]))


def meshes():
    count = len(gpus())
    shapes = [(count, 1), (1, count)] + ([(2, count // 2)] if count >= 4 else [])
    return [pytest.param(shape, id=f"{shape[0]}x{shape[1]}") for shape in shapes]


@pytest.mark.parametrize("mesh_shape", meshes() if len(gpus()) >= 2 else [(1, 1)])
def test_jit_over_a_gpu_mesh_matches_one_gpu_without_moving_the_pool(mesh_shape):
    mesh = Mesh(np.array(gpus()[:mesh_shape[0] * mesh_shape[1]]).reshape(mesh_shape),
                ("data", "model"))
    rng = np.random.default_rng()
    batch = 16
    case = make_case(rng, batch=batch, seqlen_q=2, heads_q=32, causal=True,
                     lengths=random_lengths(rng, batch, 3000))
    specs = (P("data", None, "model", None), P(), P("data"), P("data"))
    shardings = [NamedSharding(mesh, spec) for spec in specs]
    args = [jax.device_put(a, s) for a, s in zip(case.args, shardings)]
    jitted = jax.jit(decode, in_shardings=shardings)
    out, lse = jitted(*args)
    assert_close(out, lse, *single_gpu(case), ml_dtypes.bfloat16)
    hlo = jitted.lower(*args).compile().as_text()
    found = [name for name in COLLECTIVES if name in hlo]
    assert not found, f"sharded decode runs collectives {found}"
    assert out.sharding.is_equivalent_to(shardings[0], out.ndim)


def test_shard_map_with_per_gpu_pools_matches_one_gpu():
    devices = gpus()
    shards = len(devices)
    rng = np.random.default_rng()
    per_shard = 8
    cases = [make_case(rng, batch=per_shard, seqlen_q=1, heads_q=128, spare_blocks=2,
                       lengths=random_lengths(rng, per_shard, 2000)) for _ in range(shards)]
    mesh = Mesh(np.array(devices), ("data",))
    fn = jax.jit(jax.shard_map(decode, mesh=mesh, in_specs=(P("data"),) * 4,
                               out_specs=(P("data"), P("data"))))
    args = stack_per_device(cases)
    out, lse = fn(*args)
    assert not [name for name in COLLECTIVES if name in fn.lower(*args).compile().as_text()]
    for i, c in enumerate(cases):
        rows = slice(i * per_shard, (i + 1) * per_shard)
        assert_close(out[rows], lse[rows], *single_gpu(c), ml_dtypes.bfloat16)
