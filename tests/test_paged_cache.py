"""The paged cache's host allocator and device-side write: bookkeeping, errors, exact writes,
no copies.

write_kv runs every layer of every decode step, so besides writing the right rows it must update
the pool in place (a pool-sized copy per layer would cost as much as the attention itself) and
must not gather the pool when the writes are sharded.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_flashmla import flash_mla_with_kvcache, get_mla_metadata
from jax_flashmla.paged_cache import (UNUSED_BLOCK_ID, DuplicateSequenceError, PageAllocator,
                                      PageAllocatorError, PoolExhaustedError,
                                      SequenceTooLongError, UnknownSequenceError,
                                      layer_block_table, write_kv)

PAGE = 64
DIM = 576


# --- allocator ------------------------------------------------------------------------------------

def test_allocator_hands_out_pages_as_sequences_grow_and_takes_them_back():
    allocator = PageAllocator(num_blocks=6, max_blocks_per_seq=3)
    allocator.add("a")
    allocator.add("b", num_tokens=65)
    assert allocator.length("b") == 65 and len(allocator.pages("b")) == 2
    assert allocator.extend("a", 64) == 0           # fills exactly one page
    assert len(allocator.pages("a")) == 1
    assert allocator.extend("a", 1) == 64           # the 65th token opens a second page
    assert len(allocator.pages("a")) == 2
    assert allocator.num_free_blocks == 2
    pages_of_b = allocator.pages("b")
    allocator.free("b")
    assert "b" not in allocator and allocator.num_free_blocks == 4
    allocator.add("c", num_tokens=1)
    assert allocator.pages("c") == pages_of_b[:1]   # freed pages are reused first
    every_page = allocator.pages("a") + allocator.pages("c")
    assert len(set(every_page)) == len(every_page)  # no page is shared


def test_step_tables_pad_with_an_out_of_range_sentinel():
    allocator = PageAllocator(num_blocks=8, max_blocks_per_seq=4)
    allocator.add(7, num_tokens=130)
    allocator.add(3, num_tokens=0)
    tables = allocator.step_tables([3, None, 7])
    assert tables.block_table.dtype == np.int32 and tables.cache_seqlens.dtype == np.int32
    assert tables.block_table.shape == (3, 4)
    np.testing.assert_array_equal(tables.cache_seqlens, [0, 0, 130])
    np.testing.assert_array_equal(tables.block_table[0], [UNUSED_BLOCK_ID] * 4)
    np.testing.assert_array_equal(tables.block_table[1], [UNUSED_BLOCK_ID] * 4)
    np.testing.assert_array_equal(tables.block_table[2, :3], allocator.pages(7))
    assert tables.block_table[2, 3] == UNUSED_BLOCK_ID


def test_append_tokens_returns_lengths_before_and_a_table_covering_the_new_tokens():
    allocator = PageAllocator(num_blocks=8, max_blocks_per_seq=4)
    allocator.add("x", num_tokens=63)
    allocator.add("y", num_tokens=10)
    tables = allocator.append_tokens(["x", None, "y"], num_new_tokens=2)
    np.testing.assert_array_equal(tables.cache_seqlens, [63, 0, 10])
    assert allocator.length("x") == 65 and allocator.length("y") == 12
    np.testing.assert_array_equal(tables.block_table[0, :2], allocator.pages("x"))


def test_allocator_errors_name_the_problem_and_change_nothing():
    allocator = PageAllocator(num_blocks=3, max_blocks_per_seq=2)
    allocator.add("a", num_tokens=64)
    allocator.add("b", num_tokens=64)
    with pytest.raises(DuplicateSequenceError, match="'a' is already live"):
        allocator.add("a")
    with pytest.raises(UnknownSequenceError, match="'zz' is not live"):
        allocator.extend("zz", 1)
    with pytest.raises(UnknownSequenceError):
        allocator.step_tables(["a", "zz"])
    with pytest.raises(SequenceTooLongError, match="at most 128"):
        allocator.extend("a", 65)
    # Two new pages are needed, one is free: all or nothing.
    with pytest.raises(PoolExhaustedError, match="needs 2 free pages, the pool has 1"):
        allocator.append_tokens(["a", "b"], num_new_tokens=1)
    assert allocator.length("a") == 64 and allocator.length("b") == 64
    assert allocator.num_free_blocks == 1
    with pytest.raises(DuplicateSequenceError, match="more than once"):
        allocator.append_tokens(["a", "a"])
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0, got -1"):
        allocator.extend("a", -1)
    with pytest.raises(ValueError, match="None marks padding"):
        allocator.add(None)
    with pytest.raises(ValueError, match="num_blocks must be a positive int, got 0"):
        PageAllocator(num_blocks=0, max_blocks_per_seq=1)
    allocator.free("a")
    with pytest.raises(UnknownSequenceError):
        allocator.free("a")
    assert issubclass(PoolExhaustedError, PageAllocatorError)


# --- write_kv -------------------------------------------------------------------------------------

def numpy_write(pool, block_table, cache_seqlens, new_kv):
    """The definition, one row at a time."""
    pool = pool.copy()
    num_blocks = pool.shape[0]
    for seq, start in enumerate(cache_seqlens):
        for j in range(new_kv.shape[1]):
            position = int(start) + j
            page = position // PAGE
            if position < 0 or page >= block_table.shape[1]:
                continue
            block = block_table[seq, page]
            if 0 <= block < num_blocks:
                pool[block, position % PAGE] = new_kv[seq, j]
    return pool


def random_step(rng, allocator, seq_ids, s_new, heads_k=1, dtype=ml_dtypes.bfloat16):
    tables = allocator.append_tokens(seq_ids, s_new)
    new_kv = rng.standard_normal((len(seq_ids), s_new, heads_k, DIM)).astype(dtype)
    return tables, new_kv


@pytest.mark.parametrize("s_new", [1, 3, 70])
def test_write_kv_matches_numpy_across_page_boundaries(s_new):
    rng = np.random.default_rng(s_new)
    allocator = PageAllocator(num_blocks=24, max_blocks_per_seq=5)
    # Lengths just before, at and after page boundaries, and an empty sequence.
    for seq, length in enumerate([0, 63, 64, 127, 190]):
        allocator.add(seq, num_tokens=length)
    seq_ids = [0, 1, None, 2, 3, 4]
    pool = rng.standard_normal((24, PAGE, 2, DIM)).astype(ml_dtypes.bfloat16)
    tables, new_kv = random_step(rng, allocator, seq_ids, s_new, heads_k=2)
    got = jax.jit(write_kv)(pool, *tables, new_kv)
    want = numpy_write(pool, *tables, new_kv)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


def test_write_kv_drops_rows_outside_the_table_or_the_pool():
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((4, PAGE, 1, DIM)).astype(np.float16)
    block_table = np.array([[0, 1], [2, -5], [UNUSED_BLOCK_ID, 3]], np.int32)
    # Row 0 starts left of position 0 (a left-padded prompt), row 1 runs into a negative id,
    # row 2's first page is unused and its writes run past the table's capacity.
    cache_seqlens = np.array([-2, 62, 126], np.int32)
    new_kv = rng.standard_normal((3, 4, 1, DIM)).astype(np.float16)
    got = jax.jit(write_kv)(pool, block_table, cache_seqlens, new_kv)
    np.testing.assert_array_equal(np.asarray(got), numpy_write(pool, block_table, cache_seqlens,
                                                               new_kv))
    np.testing.assert_array_equal(np.asarray(got)[0, :2], new_kv[0, 2:])


def test_write_kv_rejects_mismatched_arguments():
    pool = jnp.zeros((4, PAGE, 1, DIM), jnp.bfloat16)
    table = jnp.zeros((2, 3), jnp.int32)
    lengths = jnp.zeros((2,), jnp.int32)
    rows = jnp.zeros((2, 1, 1, DIM), jnp.bfloat16)
    with pytest.raises(TypeError, match="new_kv must have k_cache's dtype bfloat16, got float16"):
        write_kv(pool, table, lengths, rows.astype(jnp.float16))
    with pytest.raises(ValueError, match=r"new_kv must have shape \(batch, s_new, 1, 576\)"):
        write_kv(pool, table, lengths, jnp.zeros((2, 1, 2, DIM), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(2,\).*got \(3,\)"):
        write_kv(pool, table, jnp.zeros((3,), jnp.int32), rows)
    with pytest.raises(TypeError, match="block_table must be int32, got int16"):
        write_kv(pool, table.astype(jnp.int16), lengths, rows)
    with pytest.raises(ValueError, match=r"k_cache must have shape \(num_blocks, 64"):
        write_kv(jnp.zeros((4, 32, 1, DIM), jnp.bfloat16), table, lengths, rows)


def test_write_kv_under_vmap_writes_each_pool_separately():
    rng = np.random.default_rng(2)
    pools = rng.standard_normal((3, 4, PAGE, 1, DIM)).astype(np.float16)
    tables = np.tile(np.array([[0, 1], [3, 2]], np.int32), (3, 1, 1))
    lengths = np.array([[0, 63], [5, 100], [62, 1]], np.int32)
    rows = rng.standard_normal((3, 2, 2, 1, DIM)).astype(np.float16)
    got = jax.jit(jax.vmap(write_kv))(pools, tables, lengths, rows)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(got[i]),
                                      numpy_write(pools[i], tables[i], lengths[i], rows[i]))


def pool_sized_copies(hlo_text, pool_shape):
    """Instructions that produce a new pool-sized array from another: copies and conversions."""
    dims = ",".join(map(str, pool_shape))
    pattern = re.compile(rf"= \w+\[{dims}\]\S* (copy|convert)\(")
    return [line.strip() for line in hlo_text.splitlines() if pattern.search(line)]


def donated_write(dtype):
    pool = jnp.zeros((64, PAGE, 1, DIM), dtype)
    table = jnp.arange(8 * 4, dtype=jnp.int32).reshape(8, 4)
    lengths = jnp.arange(8, dtype=jnp.int32) * 29
    rows = jnp.ones((8, 2, 1, DIM), dtype)
    compiled = jax.jit(write_kv, donate_argnums=0).lower(pool, table, lengths, rows).compile()
    return pool, compiled


# XLA:CPU has no bfloat16 scatter: it converts the pool to float32 and back around it (see the
# gpu-marked twin). float16 scatters natively there, so it shows the op itself is in place.
@pytest.mark.parametrize("dtype", [
    jnp.float16,
    pytest.param(jnp.bfloat16, marks=pytest.mark.gpu),
])
def test_donated_write_updates_the_pool_in_place(dtype):
    pool, compiled = donated_write(dtype)
    hlo = compiled.as_text()
    assert re.search(r"input_output_alias=\{ \{\}: \(0, \{\}", hlo), "the pool is not aliased"
    copies = pool_sized_copies(hlo, pool.shape)
    assert not copies, f"the donated pool is copied: {copies}"
    memory = compiled.memory_analysis()
    if memory is not None:
        assert memory.temp_size_in_bytes < pool.nbytes, (
            f"{memory.temp_size_in_bytes} bytes of temporaries for a {pool.nbytes}-byte pool")


@pytest.fixture(scope="module")
def data_mesh():
    return Mesh(np.array(jax.devices("cpu")[:4]), ("data",))


def test_batch_sharded_writes_into_a_replicated_pool(data_mesh):
    rng = np.random.default_rng(3)
    allocator = PageAllocator(num_blocks=16, max_blocks_per_seq=3)
    for seq, length in enumerate([5, 64, 0, 100, 127, 1, 60, 30]):
        allocator.add(seq, num_tokens=length)
    pool = rng.standard_normal((16, PAGE, 1, DIM)).astype(ml_dtypes.bfloat16)
    tables, new_kv = random_step(rng, allocator, list(range(8)), s_new=2)
    replicated, by_batch = NamedSharding(data_mesh, P()), NamedSharding(data_mesh, P("data"))
    write = jax.jit(write_kv, in_shardings=(replicated, by_batch, by_batch, by_batch),
                    out_shardings=replicated, donate_argnums=0)
    args = (jax.device_put(pool, replicated), *tables, new_kv)
    hlo = write.lower(*args).compile().as_text()
    got = write(*args)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  numpy_write(pool, *tables, new_kv).view(np.uint16))
    # Only the new rows and their indices travel between devices, never the pool.
    pool_dims = ",".join(map(str, pool.shape))
    moved = [line for line in hlo.splitlines()
             if re.search(r"all-gather|all-reduce|all-to-all|collective-permute", line)
             and pool_dims in line]
    assert not moved, f"the pool is moved between devices: {moved}"


def test_shard_map_writes_and_decodes_per_device_pools_with_local_block_ids(data_mesh):
    # Data-parallel serving: each device has its own allocator and pool; block ids are local.
    rng = np.random.default_rng(4)
    devices, batch_per_device, blocks_per_device = 4, 2, 6
    allocators = [PageAllocator(blocks_per_device, max_blocks_per_seq=3) for _ in range(devices)]
    local_tables, local_rows = [], []
    for allocator in allocators:
        for seq in range(batch_per_device):
            allocator.add(seq, num_tokens=int(rng.integers(0, 120)))
        tables, rows = random_step(rng, allocator, list(range(batch_per_device)), s_new=3)
        local_tables.append(tables)
        local_rows.append(rows)
    pools = rng.standard_normal((devices, blocks_per_device, PAGE, 1, DIM)).astype(
        ml_dtypes.bfloat16)
    block_table = np.concatenate([t.block_table for t in local_tables])
    cache_seqlens = np.concatenate([t.cache_seqlens for t in local_tables])
    new_kv = np.concatenate(local_rows)
    q = rng.standard_normal((devices * batch_per_device, 1, 4, DIM)).astype(ml_dtypes.bfloat16)

    def local_step(pool, block_table, cache_seqlens, new_kv, q):
        pool = write_kv(pool, block_table, cache_seqlens, new_kv)
        lengths = cache_seqlens + new_kv.shape[1]
        metadata, num_splits = get_mla_metadata(lengths, 4, 1)
        out, _ = flash_mla_with_kvcache(q, pool, block_table, lengths, 512, metadata, num_splits)
        return pool, out

    step = jax.jit(jax.shard_map(local_step, mesh=data_mesh, in_specs=(P("data"),) * 5,
                                 out_specs=(P("data"), P("data"))), donate_argnums=0)
    pool, out = step(pools.reshape(devices * blocks_per_device, PAGE, 1, DIM), block_table,
                     cache_seqlens, new_kv, q)
    pool = np.asarray(pool).reshape(pools.shape)
    for device in range(devices):
        rows = slice(device * batch_per_device, (device + 1) * batch_per_device)
        want = numpy_write(pools[device], block_table[rows], cache_seqlens[rows], new_kv[rows])
        np.testing.assert_array_equal(pool[device].view(np.uint16), want.view(np.uint16))
        # The decode sees the rows just written: the last token of each sequence is itself.
        want_out, _ = flash_mla_with_kvcache(q[rows], want, block_table[rows],
                                             cache_seqlens[rows] + 3, 512,
                                             implementation="reference")
        np.testing.assert_allclose(np.asarray(out[rows], np.float32),
                                   np.asarray(want_out, np.float32), atol=2e-2, rtol=2e-2)


def test_layer_block_table_offsets_valid_ids_only():
    table = jnp.array([[0, 5, UNUSED_BLOCK_ID, -1]], jnp.int32)
    got = jax.jit(layer_block_table, static_argnums=2)(table, 2, 6)
    np.testing.assert_array_equal(got, [[12, 17, UNUSED_BLOCK_ID, -1]])
