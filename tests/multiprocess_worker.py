"""One process of the two-process decode test (tests/test_multiprocess.py).

Each process owns 2 CPU devices; together they form a 4-device mesh over the batch. The sequences
are built from the same seed in both processes; each process feeds its half of the batch and
checks the shards it holds against a single-process run of the whole batch.
"""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_flashmla  # noqa: E402
from mla_cases import assert_close, make_case, oracle, random_lengths  # noqa: E402


def main(coordinator: str, process_id: int) -> None:
    jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    rng = np.random.default_rng(123)
    batch = 8
    case = make_case(rng, batch=batch, seqlen_q=2, heads_q=8, causal=True,
                     lengths=random_lengths(rng, batch, 200))

    def decode(q, k, table, lengths):
        metadata, splits = jax_flashmla.get_mla_metadata(lengths, 16, 1)
        return jax_flashmla.flash_mla_with_kvcache(q, k, table, lengths, 512, metadata, splits,
                                                   causal=True)

    single_device = jax.local_devices()[0]
    expected = jax.jit(decode)(*jax.device_put(case.args, single_device))

    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.devices.size == 4, mesh
    by_batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    half = slice(process_id * batch // 2, (process_id + 1) * batch // 2)  # this process's rows

    def global_array(value, sharding, local_rows):
        return jax.make_array_from_process_local_data(sharding, value[local_rows], value.shape)

    args = (global_array(case.q, by_batch, half), global_array(case.k_cache, replicated, slice(None)),
            global_array(case.block_table, by_batch, half),
            global_array(case.cache_seqlens, by_batch, half))
    out, lse = jax.jit(decode, out_shardings=(by_batch, by_batch))(*args)
    # Each process's shards equal the single-process result bit for bit...
    for got, want in ((out, expected[0]), (lse, expected[1])):
        assert len(got.addressable_shards) == 2
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])
    # ...and that result is right.
    assert_close(*expected, *oracle(case), ml_dtypes.bfloat16)
    jax.distributed.shutdown()
    print(f"process {process_id}: ok")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
