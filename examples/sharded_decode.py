"""The DeepSeek-style MLA model of deepseek_mla_decode.py, sharded over a device mesh two ways.

* Data parallel, per-device page pools (``jax.shard_map``): each device owns a pool, a
  :class:`~jax_flashmla.paged_cache.PageAllocator` and a slice of the batch; its block tables hold
  block ids local to its own pool, and nothing but the batch's outputs crosses devices. This is
  how MLA serving keeps the cache: the latent has no head axis to split, so data parallelism is
  what divides the cache.
* Tensor parallel heads (``jax.jit`` over a ``("data", "model")`` mesh): the per-head weights
  (W_UQ, W_UK, W_UV, W_O) are split over "model", the batch over "data", and the pool is
  replicated. With one KV head the decode op runs per shard on its own heads and batch rows;
  XLA adds the all-reduce after W_O.

Both runs replay the single-device model's greedy tokens and must reproduce its hidden states,
and neither may move the page pool between devices.

    python examples/sharded_decode.py        # 8 virtual CPU devices on CPU; every GPU on GPUs
"""

from __future__ import annotations

import argparse
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_flashmla.paged_cache import (PageAllocator, PageAllocatorError, StepTables,
                                      UnknownSequenceError)

import deepseek_mla_decode as single

COLLECTIVES = re.compile(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter")


class PerDeviceAllocators:
    """One :class:`PageAllocator` per data-parallel shard, behind the single allocator's interface.

    Rows ``[d * rows_per_shard, (d + 1) * rows_per_shard)`` of every step belong to shard ``d``;
    a new sequence goes to the first shard with a free row. Tables hold each shard's local block
    ids, concatenated along the batch in shard order, which is how ``shard_map`` splits them.
    A step's allocation is all or nothing per shard, not across shards.
    """

    def __init__(self, num_shards: int, rows_per_shard: int, blocks_per_shard: int,
                 max_blocks_per_seq: int):
        self.shards = [PageAllocator(blocks_per_shard, max_blocks_per_seq)
                       for _ in range(num_shards)]
        self.rows_per_shard = rows_per_shard
        self._shard_of: dict = {}

    @property
    def num_free_blocks(self) -> int:
        return sum(shard.num_free_blocks for shard in self.shards)

    def add(self, seq_id, num_tokens: int = 0) -> None:
        shard = next((index for index, allocator in enumerate(self.shards)
                      if len(allocator.sequence_ids) < self.rows_per_shard), None)
        if shard is None:
            raise PageAllocatorError(f"every shard already holds {self.rows_per_shard} sequences; "
                                     f"cannot add {seq_id!r}")
        self.shards[shard].add(seq_id, num_tokens)
        self._shard_of[seq_id] = shard

    def free(self, seq_id) -> None:
        if seq_id not in self._shard_of:
            raise UnknownSequenceError(f"sequence {seq_id!r} is not live")
        self.shards[self._shard_of.pop(seq_id)].free(seq_id)

    def step_tables(self, seq_ids) -> StepTables:
        return self._per_shard(seq_ids, lambda allocator, ids: allocator.step_tables(ids))

    def append_tokens(self, seq_ids, num_new_tokens: int = 1) -> StepTables:
        return self._per_shard(seq_ids, lambda allocator, ids: allocator.append_tokens(
            ids, num_new_tokens))

    def _per_shard(self, seq_ids, build) -> StepTables:
        expected_rows = len(self.shards) * self.rows_per_shard
        if len(seq_ids) != expected_rows:
            raise ValueError(f"seq_ids must list {expected_rows} rows ({len(self.shards)} shards "
                             f"x {self.rows_per_shard}), got {len(seq_ids)}")
        parts = []
        for shard, allocator in enumerate(self.shards):
            rows = list(seq_ids[shard * self.rows_per_shard:(shard + 1) * self.rows_per_shard])
            misplaced = [s for s in rows if s is not None and self._shard_of.get(s) != shard]
            if misplaced:
                raise ValueError(f"rows of shard {shard} list sequences {misplaced} that live on "
                                 f"shards {[self._shard_of.get(s) for s in misplaced]}")
            parts.append(build(allocator, rows))
        return StepTables(np.concatenate([part.block_table for part in parts]),
                          np.concatenate([part.cache_seqlens for part in parts]))


def data_parallel_run(params, config, prompts, num_decode_steps, forced_tokens, devices):
    """Per-device pools under shard_map; returns (last hidden states, compiled decode-step HLO)."""
    num_shards = len(devices)
    if len(prompts) % num_shards:
        raise ValueError(f"the batch ({len(prompts)} prompts) must split evenly over "
                         f"{num_shards} devices")
    rows_per_shard = len(prompts) // num_shards
    max_blocks = single.blocks_needed([len(p) for p in prompts], num_decode_steps)
    blocks_per_shard = rows_per_shard * max_blocks
    mesh = Mesh(np.array(devices), ("data",))

    # Each shard runs the single-device step on its own pool, rows and local block ids.
    local_step = functools.partial(single.paged_step, config=config,
                                   blocks_per_layer=blocks_per_shard)
    replicated_params = jax.tree.map(lambda _: P(), params)
    step = jax.shard_map(local_step, mesh=mesh,
                         in_specs=(replicated_params, P("data"), P("data"), P("data"),
                                   P("data")),
                         out_specs=(P("data"), P("data")))
    model = single.Model(params, step)
    # The global pool stacks the shards' pools; shard d's rows are its own [layers * blocks] pool.
    pool = jax.device_put(single.new_pool(config, num_shards * blocks_per_shard),
                          NamedSharding(mesh, P("data")))
    allocators = PerDeviceAllocators(num_shards, rows_per_shard, blocks_per_shard, max_blocks)
    hlo = decode_step_hlo(model, pool, len(prompts), max_blocks)
    hidden, _, _ = single.generate(model, pool, allocators, prompts, num_decode_steps,
                                   forced_tokens=forced_tokens)
    assert allocators.num_free_blocks == num_shards * blocks_per_shard
    return hidden, hlo


def tensor_parallel_mesh(devices, num_heads: int, batch: int) -> Mesh:
    """As many devices on "model" as split the heads evenly, the rest on "data"."""
    model = math.gcd(len(devices), num_heads)
    data = len(devices) // model
    if batch % data:
        raise ValueError(f"the batch ({batch}) must split evenly over the {data}-way data axis")
    return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def head_sharded_specs(params: single.Params) -> single.Params:
    """Per-head weights split on their head axis (after the leading layer axis); the rest whole."""
    heads_at_2 = P(None, None, "model", None)  # w_uq [layers, q_lora, heads, d]
    heads_at_1 = P(None, "model", None, None)  # w_uk, w_uv, w_o [layers, heads, ...]
    layers = single.LayerWeights(attn_norm=P(), w_dq=P(), q_norm=P(), w_uq=heads_at_2,
                                 w_dkv=P(), kv_norm=P(), w_uk=heads_at_1, w_uv=heads_at_1,
                                 w_o=heads_at_1)
    return single.Params(embed=P(), layers=layers, final_norm=P())


def tensor_parallel_run(params, config, prompts, num_decode_steps, forced_tokens, devices):
    """Heads over "model", batch over "data", pool replicated, under jit."""
    mesh = tensor_parallel_mesh(devices, config.num_heads, len(prompts))
    max_blocks = single.blocks_needed([len(p) for p in prompts], num_decode_steps)
    blocks_per_layer = len(prompts) * max_blocks
    param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                                   head_sharded_specs(params))
    replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = functools.partial(single.paged_step, config=config, blocks_per_layer=blocks_per_layer)
    model = single.Model(jax.device_put(params, param_shardings), step,
                         in_shardings=(param_shardings, replicated, by_batch, by_batch, by_batch),
                         out_shardings=(by_batch, replicated))
    pool = jax.device_put(single.new_pool(config, blocks_per_layer), replicated)
    allocator = PageAllocator(blocks_per_layer, max_blocks)
    hlo = decode_step_hlo(model, pool, len(prompts), max_blocks)
    hidden, _, _ = single.generate(model, pool, allocator, prompts, num_decode_steps,
                                   forced_tokens=forced_tokens)
    return hidden, hlo


def decode_step_hlo(model, pool, batch, max_blocks) -> str:
    """Compiled text of one decode step (s = 1), to check what crosses devices."""
    table = jax.ShapeDtypeStruct((batch, max_blocks), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    pool_spec = jax.ShapeDtypeStruct(pool.shape, pool.dtype, sharding=pool.sharding)
    return model.lower(pool_spec, table, lengths, tokens).compile().as_text()


def pool_collectives(hlo: str) -> list[str]:
    """Collectives on arrays of pages ``[..., 64, 1, 576]``: the pool or any part of it."""
    page_shape = f",{single.PAGE_SIZE},1,{single.LATENT_DIM + single.ROPE_DIM}]"
    return [line.strip() for line in hlo.splitlines()
            if COLLECTIVES.search(line) and page_shape in line]


def main(config=None, num_layers=None, prompt_lengths=(5, 64, 70, 1, 130, 20, 63, 2),
         num_decode_steps: int = 4, seed: int = 0, max_relative_error: float = 0.02) -> dict:
    """Runs both sharded layouts on every device and checks them against the single-device model.

    Returns the relative errors; raises AssertionError when out of tolerance or when the page pool
    is moved between devices.
    """
    config = single.resolve_config(config, num_layers)
    devices = jax.devices()
    prompts = single.random_prompts(seed, config, prompt_lengths)
    params = single.init_params(jax.random.key(seed), config)
    want, tokens = single.run_paged(params, config, prompts, num_decode_steps)

    result = {"devices": len(devices)}
    for name, run in (("data_parallel", data_parallel_run),
                      ("tensor_parallel", tensor_parallel_run)):
        hidden, hlo = run(params, config, prompts, num_decode_steps, tokens, devices)
        error = single.relative_error(hidden, want)
        result[name] = error
        print(f"{name}: relative error vs single device {error:.2e} on {len(devices)} "
              f"{devices[0].platform} devices")
        moved = pool_collectives(hlo)
        assert not moved, f"{name}: the page pool crosses devices: {moved[:3]}"
        assert error < max_relative_error, f"{name}: relative error {error}"
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(single.CONFIGS),
                        help="default: tiny on CPU, deepseek-v3 elsewhere")
    parser.add_argument("--layers", type=int, help="default: the config's (4 for deepseek-v3)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps after the prefill")
    args = parser.parse_args()
    # Eight virtual devices when this runs on CPU; it only affects the CPU backend, and must be
    # set before JAX first touches a device.
    jax.config.update("jax_num_cpu_devices", 8)
    main(args.config, args.layers, num_decode_steps=args.steps)
