"""Decode throughput of the standard workload over 1, 2, 4, ... GPUs of one host.

Two ways to spread one decode step, both as `jax.shard_map` programs (no collectives):

* data parallel: the batch is split across devices, each device owns a page pool holding only
  its sequences' pages (block ids local to that pool);
* tensor parallel: the query heads are split across devices (h_q = 128 -> 128 / n per device),
  each device holds the whole pool (as MLA serving does: one latent KV head shared by all heads).

Per device count and mode it times N back-to-back decode calls inside one program on every device
at once (2N minus N, over N; the slowest device decides) and reports time per step, aggregate
GB/s and TFLOPS, and the scaling efficiency t(1) / (n · t(n)).

    python tools/scaling.py [--devices 1 2 4] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla
from jax_flashmla.bench import Shape, bytes_moved, flops, git_commit, seconds_per_call

PAGE = 64
HEAD_DIM = 576


def lengths_for(shape: Shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.normal(shape.seqlen_k, shape.seqlen_k / 2, shape.batch)
    return np.clip(lengths, shape.seqlen_q, 2 * shape.seqlen_k).astype(np.int32)


def local_pools(lengths: np.ndarray, shards: int, seed: int = 0):
    """Per-shard pools (stacked) and tables with block ids local to each shard's pool."""
    rng = np.random.default_rng(seed + 1)
    pages = (lengths + PAGE - 1) // PAGE
    per_shard = np.split(np.arange(len(lengths)), shards)
    blocks = max(int(pages[rows].sum()) for rows in per_shard)
    width = int(pages.max())
    table = np.full((len(lengths), width), 1 << 30, np.int32)
    for rows in per_shard:
        order = rng.permutation(int(pages[rows].sum())).astype(np.int32)
        start = 0
        for seq in rows:
            table[seq, :pages[seq]] = order[start:start + pages[seq]]
            start += pages[seq]
    pool = jax.random.normal(jax.random.key(seed), (shards * blocks, PAGE, 1, HEAD_DIM),
                             jnp.bfloat16)
    return pool, table


def timed_program(local_decode, mesh, in_specs, calls: int):
    """shard_map'ed program running `calls` decodes per device, chained through the lengths."""

    def chain(q, pool, table, lengths):
        metadata, splits = jax_flashmla.get_mla_metadata(
            lengths, q.shape[1] * q.shape[2], 1)
        for _ in range(calls):
            out, lse = local_decode(q, pool, table, lengths, metadata, splits)
            zero = (out[0, 0, 0, 0].astype(jnp.float32) + lse[0, 0, 0]) * 0
            lengths = lengths + zero.astype(jnp.int32)
        return lengths

    return jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=in_specs, out_specs=in_specs[3]))


def seconds_per_step(local_decode, mesh, in_specs, args, calls: int = 20, repeats: int = 5):
    return seconds_per_call(timed_program(local_decode, mesh, in_specs, calls),
                            timed_program(local_decode, mesh, in_specs, 2 * calls), args, calls,
                            repeats)


def decode(q, pool, table, lengths, metadata, splits):
    return jax_flashmla.flash_mla_with_kvcache(q, pool, table, lengths, 512, metadata, splits,
                                               causal=True)


def run(shape: Shape, devices: int, mode: str) -> float:
    mesh = Mesh(np.array(jax.devices()[:devices]), ("x",))
    lengths = lengths_for(shape)
    q = jax.random.normal(jax.random.key(7), (shape.batch, shape.seqlen_q, shape.heads_q, HEAD_DIM),
                          jnp.bfloat16)
    if mode == "data":
        pool, table = local_pools(lengths, devices)
        in_specs = (P("x"), P("x"), P("x"), P("x"))
    else:
        pool, table = local_pools(lengths, 1)
        in_specs = (P(None, None, "x", None), P(), P(), P())
    args = [jax.device_put(value, NamedSharding(mesh, spec))
            for value, spec in zip((q, pool, table, lengths), in_specs)]
    return seconds_per_step(decode, mesh, in_specs, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    available = len(jax.devices())
    parser.add_argument("--devices", type=int, nargs="+",
                        default=[n for n in (1, 2, 4, 8) if n <= available])
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()

    shapes = [Shape(128, 8192, heads, seqlen_q) for heads, seqlen_q in ((16, 1), (128, 1), (128, 2))]
    lines = ["| mode | h_q | s_q | GPUs | ms / step | aggregate GB/s | aggregate TFLOPS | "
             "scaling efficiency |", "|---|---|---|---|---|---|---|---|"]
    for mode in ("data", "heads"):
        for shape in shapes:
            total = int(lengths_for(shape).sum())
            base = None
            for devices in args.devices:
                seconds = run(shape, devices, mode)
                base = base or seconds
                line = (f"| {mode} | {shape.heads_q} | {shape.seqlen_q} | {devices} | "
                        f"{seconds * 1e3:.3f} | {bytes_moved(shape, total) / seconds / 1e9:.0f} | "
                        f"{flops(shape, total) / seconds / 1e12:.0f} | "
                        f"{base / (devices * seconds):.0%} |")
                print(line, flush=True)
                lines.append(line)
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        device = jax.devices()[0].device_kind
        with open(args.markdown, "a") as handle:
            handle.write(f"\n### Scaling, standard workload (b = 128, s_k = 8192) — {available} × "
                         f"{device}, {stamp}, commit {git_commit()}\n\n{table}\n")


if __name__ == "__main__":
    main()
