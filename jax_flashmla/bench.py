"""Decode benchmark: our kernels against the pure-XLA reference, in the same process.

    python -m jax_flashmla.bench                 # GPU: the standard table; CPU: a small demo
    python -m jax_flashmla.bench --table standard --markdown docs/benchmarks.md
    python -m jax_flashmla.bench --batch 1 8 --seqlen 32768 --heads 128 --fixed

The standard table is DeepSeek's published decode benchmark (b = 128, h_kv = 1, bf16, causal,
lengths ~ normal(s_k, s_k / 2) clipped to [s_q, 2 s_k], pool rows permuted). Times are device
time per decode call (main kernel + combine, metadata precomputed): N calls run back to back
inside one jitted program, and the difference between 2N and N calls, over N, cancels the
dispatch cost. Outputs are checked against the reference before anything is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla
from jax_flashmla._constants import HEAD_DIM_QK, HEAD_DIM_V, PAGE_SIZE


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seqlen_k: int
    heads_q: int
    seqlen_q: int
    fixed: bool = False


@dataclasses.dataclass
class Problem:
    q: jax.Array
    k_cache: jax.Array
    block_table: jax.Array
    cache_seqlens: jax.Array
    total_tokens: int


def standard_shapes() -> list[Shape]:
    return [Shape(128, seqlen_k, heads, seqlen_q)
            for seqlen_k in (4096, 8192) for heads in (16, 32, 64, 128) for seqlen_q in (1, 2)]


def make_problem(shape: Shape, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    if shape.fixed:
        lengths = np.full(shape.batch, shape.seqlen_k, np.int32)
    else:
        lengths = rng.normal(shape.seqlen_k, shape.seqlen_k / 2, shape.batch)
        lengths = np.clip(lengths, shape.seqlen_q, 2 * shape.seqlen_k).astype(np.int32)
    pages = (lengths + PAGE_SIZE - 1) // PAGE_SIZE
    max_pages = int(pages.max())
    num_blocks = int(pages.sum())
    rows = rng.permutation(num_blocks).astype(np.int32)
    table = np.zeros((shape.batch, max_pages), np.int32)
    start = 0
    for seq, count in enumerate(pages):
        table[seq, :count] = rows[start:start + count]
        start += count
    key = jax.random.key(seed)
    k_key, q_key = jax.random.split(key)
    k_cache = jax.random.normal(k_key, (num_blocks, PAGE_SIZE, 1, HEAD_DIM_QK), jnp.bfloat16)
    q = jax.random.normal(q_key, (shape.batch, shape.seqlen_q, shape.heads_q, HEAD_DIM_QK),
                          jnp.bfloat16)
    return Problem(q, k_cache, jnp.asarray(table), jnp.asarray(lengths), int(lengths.sum()))


def _chained_calls(op, calls: int):
    """A jitted program running `op` `calls` times back to back.

    `op(lengths, *rest)` returns arrays. Each call's lengths depend on the previous call's outputs
    through an integer zero, so XLA can neither merge the identical calls (CSE) nor drop them.
    """

    @jax.jit
    def program(lengths, *rest):
        for _ in range(calls):
            outputs = op(lengths, *rest)
            zero = sum(jnp.ravel(value)[0].astype(jnp.float32) for value in outputs) * 0
            lengths = lengths + zero.astype(jnp.int32)
        return lengths

    return program


def device_time_per_call(op, args, calls: int, repeats: int = 5) -> float:
    """Seconds per call of `op(*args)`: (t(2N) - t(N)) / N, median over repeats."""
    short, long = _chained_calls(op, calls), _chained_calls(op, 2 * calls)
    short(*args).block_until_ready()
    long(*args).block_until_ready()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        short(*args).block_until_ready()
        middle = time.perf_counter()
        long(*args).block_until_ready()
        end = time.perf_counter()
        samples.append(((end - middle) - (middle - start)) / calls)
    return max(statistics.median(samples), 1e-9)


def _decode_fn(implementation: str):
    def decode(lengths, q, k_cache, table, metadata, splits):
        return jax_flashmla.flash_mla_with_kvcache(q, k_cache, table, lengths, HEAD_DIM_V,
                                                   metadata, splits, causal=True,
                                                   implementation=implementation)
    return decode


def bytes_moved(shape: Shape, total_tokens: int) -> int:
    return (total_tokens * HEAD_DIM_QK
            + shape.batch * shape.seqlen_q * shape.heads_q * (HEAD_DIM_QK + HEAD_DIM_V)) * 2


def flops(shape: Shape, total_tokens: int) -> int:
    return shape.seqlen_q * total_tokens * shape.heads_q * (HEAD_DIM_QK + HEAD_DIM_V) * 2


def max_abs_error(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    finite = np.isfinite(b)
    if not np.array_equal(finite, np.isfinite(a)):
        return math.inf
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))


def measure(shape: Shape, implementations: list[str], with_reference: bool, seed: int = 0):
    problem = make_problem(shape, seed)
    metadata, splits = jax.jit(jax_flashmla.get_mla_metadata, static_argnums=(1, 2))(
        problem.cache_seqlens, shape.seqlen_q * shape.heads_q, 1)
    args = (problem.cache_seqlens, problem.q, problem.k_cache, problem.block_table, metadata,
            splits)
    row = {"batch": shape.batch, "seqlen_k": shape.seqlen_k, "heads_q": shape.heads_q,
           "seqlen_q": shape.seqlen_q, "fixed": shape.fixed, "total_tokens": problem.total_tokens}
    reference_out = None
    if with_reference:
        reference_out = jax.jit(_decode_fn("reference"))(*args)
        row["xla_ms"] = device_time_per_call(_decode_fn("reference"), args, 3) * 1e3
    for name in implementations:
        out = jax.jit(_decode_fn(name))(*args)
        if reference_out is not None:
            row[f"{name}_max_abs_err_out"] = max_abs_error(out[0], reference_out[0])
            row[f"{name}_max_abs_err_lse"] = max_abs_error(out[1], reference_out[1])
        rough = device_time_per_call(_decode_fn(name), args, 2, repeats=1)
        calls = int(min(max(20e-3 / rough, 5), 400))
        seconds = device_time_per_call(_decode_fn(name), args, calls)
        row[f"{name}_ms"] = seconds * 1e3
        row[f"{name}_gbps"] = bytes_moved(shape, problem.total_tokens) / seconds / 1e9
        row[f"{name}_tflops"] = flops(shape, problem.total_tokens) / seconds / 1e12
        if "xla_ms" in row:
            row[f"{name}_speedup"] = row["xla_ms"] / row[f"{name}_ms"]
    return row


def metadata_time_us(batch: int = 128) -> float:
    lengths = jnp.asarray(np.random.default_rng(0).integers(1, 8192, batch), jnp.int32)
    schedule = lambda lengths: jax_flashmla.get_mla_metadata(lengths, 128, 1)  # noqa: E731
    return device_time_per_call(schedule, (lengths,), 50) * 1e6


def format_table(rows, implementations) -> str:
    header = ["b", "s_k", "h_q", "s_q"]
    for name in implementations:
        header += [f"{name} ms", "GB/s", "TFLOPS"]
    if any("xla_ms" in row for row in rows):
        header += ["XLA ref ms"] + [f"{name} ÷ XLA" for name in implementations]
        header += [f"{name} max|Δout|" for name in implementations]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['batch']}{' fixed' if row['fixed'] else ''}", str(row["seqlen_k"]),
                 str(row["heads_q"]), str(row["seqlen_q"])]
        for name in implementations:
            cells += [f"{row[f'{name}_ms']:.4f}", f"{row[f'{name}_gbps']:.0f}",
                      f"{row[f'{name}_tflops']:.0f}"]
        if "xla_ms" in row:
            cells += [f"{row['xla_ms']:.3f}"]
            cells += [f"{row[f'{name}_speedup']:.1f}×" for name in implementations]
            cells += [f"{row[f'{name}_max_abs_err_out']:.2e}" for name in implementations]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_device() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} ({device.platform})"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=("standard", "demo", "custom"), default=None,
                        help="standard: PERF table (GPU default); demo: a small CPU-sized run "
                             "(CPU default); custom: the shapes given by the flags below")
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[1024])
    parser.add_argument("--heads", type=int, nargs="+", default=[16])
    parser.add_argument("--seqlen-q", type=int, nargs="+", default=[1])
    parser.add_argument("--fixed", action="store_true", help="every sequence has --seqlen tokens")
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="implementations to time (default: portable and hopper on GPU)")
    parser.add_argument("--no-reference", action="store_true", help="skip the XLA reference")
    parser.add_argument("--markdown", help="append the table, card, date and commit to this file")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    args = parser.parse_args(argv)

    on_gpu = jax.devices()[0].platform == "gpu"
    table = args.table or ("standard" if on_gpu else "demo")
    if table == "standard":
        shapes = standard_shapes()
    elif table == "demo":
        shapes = [Shape(4, 512, 16, 1), Shape(4, 512, 16, 2)]
    else:
        shapes = [Shape(b, s, h, q, args.fixed) for b in args.batch for s in args.seqlen
                  for h in args.heads for q in args.seqlen_q]
    if args.kernels:
        implementations = args.kernels
    elif on_gpu and jax_flashmla.cuda_extension_available():
        implementations = ["portable"] + (["hopper"] if jax_flashmla.hopper_kernel_available()
                                          and jax.devices()[0].compute_capability == "9.0"
                                          else [])
    else:
        implementations = ["reference"]
    with_reference = not args.no_reference and implementations != ["reference"]

    print(f"device: {describe_device()}; implementations: {', '.join(implementations)}",
          flush=True)
    rows = []
    for index, shape in enumerate(shapes, 1):
        row = measure(shape, implementations, with_reference)
        rows.append(row)
        print(f"[{index}/{len(shapes)}] {shape}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    text = format_table(rows, implementations)
    if on_gpu:
        text += f"\n\nmetadata kernel alone (b = 128): {metadata_time_us():.1f} µs"
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": describe_device(), "rows": rows}, handle, indent=1)
    if args.markdown:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.markdown, "a") as handle:
            handle.write(f"\n### {table} table — {describe_device()}, {stamp}, commit "
                         f"{git_commit()}, jax {jax.__version__}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
