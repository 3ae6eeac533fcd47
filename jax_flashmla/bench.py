"""Decode benchmark: our kernels against the pure-XLA reference, in the same process.

    python -m jax_flashmla.bench                 # GPU: the standard table; CPU: a small demo
    python -m jax_flashmla.bench --table standard small-batch long --markdown docs/benchmarks.md
    python -m jax_flashmla.bench --table custom --batch 1 8 --seqlen 32768 --heads 128 --fixed
    python -m jax_flashmla.bench --csv rows.csv --json rows.json --plot rows.png

The standard table is DeepSeek's published decode benchmark (b = 128, h_kv = 1, bf16, causal,
lengths ~ normal(s_k, s_k / 2) clipped to [s_q, 2 s_k], pool rows permuted). Times are device
time per decode call (main kernel + combine, metadata precomputed): N calls run back to back
inside one jitted program, and the difference between 2N and N calls, over N, cancels the
dispatch cost. Problems whose page pool would fit in L2 are replicated with fresh data and the
calls rotate over the copies, so every call streams its cache from HBM. Outputs are checked
against the reference before anything is timed.

The chained time includes what chains the calls: a tiny XLA fusion per call that makes the next
call's lengths depend on this call's outputs (a few µs, which matters on small problems only).
On a GPU our kernels' rows also get a "kernel ms" column read from a profiler trace of the same
chain: per call, from the start of the main kernel to the end of the combine, median over the
calls. That is the time a caller's stream spends in one decode call (what CUDA events around the
call would give), without the chaining.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla
from jax_flashmla._constants import HEAD_DIM_QK, HEAD_DIM_V, PAGE_SIZE
from jax_flashmla._extension import hopper_schedule


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seqlen_k: int
    heads_q: int
    seqlen_q: int
    fixed: bool = False


@dataclasses.dataclass
class Problem:
    cache_seqlens: jax.Array
    copies: list  # [(q, k_cache, block_table)], same lengths and layout, different data
    total_tokens: int


L2_BYTES = 50 * 2**20        # H100: 50 MB; pools below 4x this are replicated
MAX_COPIES = 16

TABLES = {
    # DeepSeek's published decode benchmark (PERF.md).
    "standard": [Shape(128, seqlen_k, heads, seqlen_q) for seqlen_k in (4096, 8192)
                 for heads in (16, 32, 64, 128) for seqlen_q in (1, 2)],
    # Latency-bound serving: few sequences, long contexts, fixed lengths.
    "small-batch": [Shape(batch, seqlen_k, heads, 1, fixed=True)
                    for batch, seqlen_k in ((1, 4096), (1, 32768), (1, 65536), (8, 4096),
                                            (8, 32768), (8, 65536), (32, 32768))
                    for heads in (16, 128)],
    # Long contexts at full batch.
    "long": [Shape(128, seqlen_k, 128, seqlen_q) for seqlen_k in (16384, 32768)
             for seqlen_q in (1, 2)],
    # Small enough for a CPU.
    "demo": [Shape(4, 512, 16, 1), Shape(4, 512, 16, 2)],
}


def make_problem(shape: Shape, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    if shape.fixed:
        lengths = np.full(shape.batch, shape.seqlen_k, np.int32)
    else:
        lengths = rng.normal(shape.seqlen_k, shape.seqlen_k / 2, shape.batch)
        lengths = np.clip(lengths, shape.seqlen_q, 2 * shape.seqlen_k).astype(np.int32)
    pages = (lengths + PAGE_SIZE - 1) // PAGE_SIZE
    num_blocks = int(pages.sum())
    pool_bytes = num_blocks * PAGE_SIZE * HEAD_DIM_QK * 2
    num_copies = int(min(max(math.ceil(4 * L2_BYTES / pool_bytes), 1), MAX_COPIES))
    copies = []
    for copy in range(num_copies):
        rows = rng.permutation(num_blocks).astype(np.int32)
        table = np.zeros((shape.batch, int(pages.max())), np.int32)
        start = 0
        for seq, count in enumerate(pages):
            table[seq, :count] = rows[start:start + count]
            start += count
        k_key, q_key = jax.random.split(jax.random.key(seed * MAX_COPIES + copy))
        k_cache = jax.random.normal(k_key, (num_blocks, PAGE_SIZE, 1, HEAD_DIM_QK), jnp.bfloat16)
        q = jax.random.normal(q_key, (shape.batch, shape.seqlen_q, shape.heads_q, HEAD_DIM_QK),
                              jnp.bfloat16)
        copies.append((q, k_cache, jnp.asarray(table)))
    return Problem(jnp.asarray(lengths), copies, int(lengths.sum()))


def _chained_calls(op, calls: int):
    """A jitted program running `op` `calls` times back to back, rotating over `rotating`.

    `op(lengths, *shared, *rotating[i])` returns arrays. Each call's lengths depend on the previous
    call's outputs through an integer zero, so XLA can neither merge identical calls (CSE) nor
    drop them.
    """

    @jax.jit
    def program(lengths, shared, rotating):
        for call in range(calls):
            outputs = op(lengths, *shared, *rotating[call % len(rotating)])
            zero = sum(jnp.ravel(value)[0].astype(jnp.float32) for value in outputs) * 0
            lengths = lengths + zero.astype(jnp.int32)
        return lengths

    return program


def seconds_per_call(short, long, args, calls: int, repeats: int = 5) -> float:
    """(t(long) - t(short)) / calls, median over repeats, for programs chaining `calls` and
    `2 * calls` calls: the difference cancels dispatch and launch overhead."""
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


def device_time_per_call(op, lengths, shared, rotating, calls: int, repeats: int = 5) -> float:
    """Seconds per call of `op`, chained as in _chained_calls."""
    return seconds_per_call(_chained_calls(op, calls), _chained_calls(op, 2 * calls),
                            (lengths, shared, rotating), calls, repeats)


def calibrated_time_per_call(op, lengths, shared, rotating, max_calls: int = 400,
                             repeats: int = 5) -> float:
    """device_time_per_call with the number of calls chosen from a rough first timing: about 20 ms
    of calls per program (at least 5, at most max_calls), so that the 2N - N difference stands well
    above the timer's noise."""
    rough = device_time_per_call(op, lengths, shared, rotating, 2, repeats=1)
    calls = int(min(max(20e-3 / rough, 5), max_calls))
    return device_time_per_call(op, lengths, shared, rotating, calls, repeats)


# Substrings of the names of the kernels one decode call launches (csrc/): the main kernel first,
# then the combine.
MAIN_KERNEL = "mla_decode"
CALL_KERNELS = (MAIN_KERNEL, "combine")


def calls_in_trace(events) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """The decode calls in a trace's kernel events, (name, start_ns, end_ns) in any order: each is
    its main kernel's (start, end) and the (start, end) of our kernels behind it up to the next
    main kernel (the combine). Other kernels (XLA fusions between calls) are ignored; an event
    seen twice (on two lines of the trace) counts once."""
    ours = sorted({(start, end, name) for name, start, end in events
                   if any(kernel in name for kernel in CALL_KERNELS)})
    calls = []
    for start, end, name in ours:
        if MAIN_KERNEL in name:
            calls.append(((start, end), []))
        elif calls:
            calls[-1][1].append((start, end))
    return calls


def call_spans_ns(events) -> list[float]:
    """Durations of the decode calls in a trace's kernel events (calls_in_trace): from the start
    of a main kernel to the end of the last of our kernels behind it."""
    return [max([main_end] + [end for _, end in behind]) - main_start
            for (main_start, main_end), behind in calls_in_trace(events)]


def traced_kernel_events(op, lengths, shared, rotating,
                         calls: int = 40) -> list[tuple[str, int, int]] | None:
    """(name, start_ns, end_ns) of every kernel on the device in a profiler trace of `calls`
    chained calls of `op` (compiled and run once before); None when no trace was written."""
    program = _chained_calls(op, calls)
    program(lengths, shared, rotating).block_until_ready()  # compiled and warm before tracing
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            program(lengths, shared, rotating).block_until_ready()
        paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return None
        data = jax.profiler.ProfileData.from_file(paths[0])
    return [(event.name, event.start_ns, event.end_ns)
            for plane in data.planes if plane.name.startswith("/device:")
            for line in plane.lines for event in line.events]


def traced_time_per_call(op, lengths, shared, rotating, calls: int = 40) -> float | None:
    """Seconds per call of `op` from a profiler trace of `calls` chained calls (call_spans_ns),
    median over the calls; None when the trace holds no kernel of ours (no GPU, or no CUPTI)."""
    events = traced_kernel_events(op, lengths, shared, rotating, calls)
    spans = call_spans_ns(events) if events else []
    return statistics.median(spans) * 1e-9 if spans else None


def decode_fn(implementation: str):
    """One decode call of `implementation`, as timed by this module (causal, metadata given)."""
    def decode(lengths, metadata, splits, q, k_cache, table):
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


def _out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def measure(shape: Shape, implementations: list[str], with_reference: bool, seed: int = 0,
            max_calls: int = 400, repeats: int = 5):
    problem = make_problem(shape, seed)
    metadata, splits = jax.jit(jax_flashmla.get_mla_metadata, static_argnums=(1, 2))(
        problem.cache_seqlens, shape.seqlen_q * shape.heads_q, 1)
    lengths, shared = problem.cache_seqlens, (metadata, splits)
    row = {"batch": shape.batch, "seqlen_k": shape.seqlen_k, "heads_q": shape.heads_q,
           "seqlen_q": shape.seqlen_q, "fixed": shape.fixed, "total_tokens": problem.total_tokens,
           "pool_copies": len(problem.copies)}
    reference_out = None
    if with_reference:
        try:
            reference_out = jax.jit(decode_fn("reference"))(lengths, *shared, *problem.copies[0])
            row["xla_ms"] = device_time_per_call(decode_fn("reference"), lengths, shared,
                                                 problem.copies, min(3, max_calls),
                                                 repeats) * 1e3
        except Exception as error:  # noqa: BLE001 - the XLA baseline may not fit in memory
            if not _out_of_memory(error):
                raise
            reference_out, row["xla_ms"] = None, None
    if "hopper" in implementations:  # which of the Hopper kernel's two schedules ran (h_kv = 1)
        _, k_cache, table = problem.copies[0]
        row["hopper_schedule"] = hopper_schedule(shape.batch, shape.seqlen_q * shape.heads_q,
                                                 table.shape[1], k_cache.shape[0],
                                                 metadata.shape[0])
    for name in implementations:
        out = jax.jit(decode_fn(name))(lengths, *shared, *problem.copies[0])
        if reference_out is not None:
            row[f"{name}_max_abs_err_out"] = max_abs_error(out[0], reference_out[0])
            row[f"{name}_max_abs_err_lse"] = max_abs_error(out[1], reference_out[1])
        seconds = calibrated_time_per_call(decode_fn(name), lengths, shared, problem.copies,
                                           max_calls, repeats)
        row[f"{name}_ms"] = seconds * 1e3
        if name != "reference" and jax.devices()[0].platform == "gpu":
            traced = traced_time_per_call(decode_fn(name), lengths, shared, problem.copies)
            row[f"{name}_kernel_ms"] = traced * 1e3 if traced else None
        row[f"{name}_gbps"] = bytes_moved(shape, problem.total_tokens) / seconds / 1e9
        row[f"{name}_tflops"] = flops(shape, problem.total_tokens) / seconds / 1e12
        if row.get("xla_ms"):
            row[f"{name}_speedup"] = row["xla_ms"] / row[f"{name}_ms"]
    return row


def metadata_time_us(batch: int = 128) -> float:
    lengths = jnp.asarray(np.random.default_rng(0).integers(1, 8192, batch), jnp.int32)
    schedule = lambda lengths: jax_flashmla.get_mla_metadata(lengths, 128, 1)  # noqa: E731
    return device_time_per_call(schedule, lengths, (), [()], 50) * 1e6


def format_table(rows, implementations) -> str:
    with_reference = any("xla_ms" in row for row in rows)
    header = ["b", "s_k", "h_q", "s_q"]
    with_schedule = any("hopper_schedule" in row for row in rows)
    if with_schedule:
        header += ["hopper schedule"]
    with_kernel_time = {name: any(f"{name}_kernel_ms" in row for row in rows)
                        for name in implementations}
    for name in implementations:
        header += [f"{name} ms", "GB/s", "TFLOPS"]
        if with_kernel_time[name]:
            header += [f"{name} kernel ms"]
    if with_reference:
        header += ["XLA ref ms"] + [f"{name} ÷ XLA" for name in implementations]
        header += [f"{name} max abs err" for name in implementations]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['batch']}{' fixed' if row['fixed'] else ''}", str(row["seqlen_k"]),
                 str(row["heads_q"]), str(row["seqlen_q"])]
        if with_schedule:
            cells += [row.get("hopper_schedule") or "—"]
        for name in implementations:
            cells += [f"{row[f'{name}_ms']:.4f}", f"{row[f'{name}_gbps']:.0f}",
                      f"{row[f'{name}_tflops']:.0f}"]
            if with_kernel_time[name]:
                kernel_ms = row.get(f"{name}_kernel_ms")
                cells += [f"{kernel_ms:.4f}" if kernel_ms else "—"]
        if with_reference:
            if row.get("xla_ms"):
                cells += [f"{row['xla_ms']:.3f}"]
                cells += [f"{row[f'{name}_speedup']:.1f}×" for name in implementations]
                cells += [f"{row[f'{name}_max_abs_err_out']:.1e}" for name in implementations]
            else:
                cells += ["out of memory"] + ["—"] * (2 * len(implementations))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows, path: str) -> None:
    keys = sorted({key for row in rows for key in row}, key=lambda key: (key not in rows[0], key))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, implementations, path: str, device: str) -> None:
    """GB/s and TFLOPS against context length, per (h_q, s_q), ours against the XLA reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bandwidth, compute) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = sorted({(row["batch"], row["heads_q"], row["seqlen_q"]) for row in rows})
    for batch, heads, seqlen_q in groups:
        series = sorted((row for row in rows if (row["batch"], row["heads_q"], row["seqlen_q"])
                         == (batch, heads, seqlen_q)), key=lambda row: row["seqlen_k"])
        lengths = [row["seqlen_k"] for row in series]
        label = f"b={batch} h_q={heads} s_q={seqlen_q}"
        for name in implementations:
            bandwidth.plot(lengths, [row[f"{name}_gbps"] for row in series], "o-",
                           label=f"{name} {label}")
            compute.plot(lengths, [row[f"{name}_tflops"] for row in series], "o-",
                         label=f"{name} {label}")
        with_xla = [row for row in series if row.get("xla_ms")]
        if with_xla:
            xla_bandwidth = [bytes_moved(Shape(row["batch"], row["seqlen_k"], row["heads_q"],
                                               row["seqlen_q"]), row["total_tokens"])
                             / row["xla_ms"] / 1e6 for row in with_xla]
            bandwidth.plot([row["seqlen_k"] for row in with_xla], xla_bandwidth, "x--",
                           label=f"XLA ref {label}")
    for axis, unit in ((bandwidth, "GB/s"), (compute, "TFLOPS")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("mean context length s_k (tokens)")
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3)
    bandwidth.legend(fontsize=6)
    figure.suptitle(f"jax_flashmla paged MLA decode — {device}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def describe_device() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} ({device.platform})"


def git_commit() -> str:
    if os.environ.get("JAX_FLASHMLA_COMMIT"):
        return os.environ["JAX_FLASHMLA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _progress(items, total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, unit="row", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", nargs="+", choices=(*TABLES, "custom"), default=None,
                        help="tables to run (default: standard on a GPU, demo elsewhere); "
                             "custom: the shapes given by the flags below")
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[1024])
    parser.add_argument("--heads", type=int, nargs="+", default=[16])
    parser.add_argument("--seqlen-q", type=int, nargs="+", default=[1])
    parser.add_argument("--fixed", action="store_true", help="every sequence has --seqlen tokens")
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="implementations to time (default: every kernel this GPU has)")
    parser.add_argument("--no-reference", action="store_true", help="skip the XLA reference")
    parser.add_argument("--max-calls", type=int, default=400,
                        help="most decode calls chained in one timed program")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median is kept)")
    parser.add_argument("--markdown", help="append the table, card, date and commit to this file")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--csv", help="write the rows as CSV to this file")
    parser.add_argument("--plot", help="write a PNG plot of GB/s and TFLOPS to this file")
    args = parser.parse_args(argv)

    on_gpu = jax.devices()[0].platform == "gpu"
    tables = args.table or (["standard"] if on_gpu else ["demo"])
    shapes = []
    for table in tables:
        if table == "custom":
            shapes += [Shape(b, s, h, q, args.fixed) for b in args.batch for s in args.seqlen
                       for h in args.heads for q in args.seqlen_q]
        else:
            shapes += TABLES[table]
    if args.kernels:
        implementations = args.kernels
    elif on_gpu and jax_flashmla.cuda_extension_available():
        hopper = (jax_flashmla.hopper_kernel_available()
                  and jax.devices()[0].compute_capability == "9.0")
        implementations = ["portable"] + (["hopper"] if hopper else [])
    else:
        implementations = ["reference"]
    with_reference = not args.no_reference and implementations != ["reference"]

    device = describe_device()
    print(f"device: {device}; implementations: {', '.join(implementations)}; "
          f"tables: {', '.join(tables)}", flush=True)
    rows = []
    progress = _progress(shapes, len(shapes))
    log = getattr(progress, "write", lambda line: print(line, file=sys.stderr, flush=True))
    for shape in progress:
        rows.append(measure(shape, implementations, with_reference,
                            max_calls=args.max_calls, repeats=args.repeats))
        log(f"{shape}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()
                                     if isinstance(v, float)))
    text = format_table(rows, implementations)
    if on_gpu:
        text += f"\n\nmetadata kernel alone (b = 128): {metadata_time_us():.1f} µs"
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "commit": git_commit(), "rows": rows}, handle, indent=1)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(rows, implementations, args.plot, device)
    if args.markdown:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.markdown, "a") as handle:
            handle.write(f"\n### {' + '.join(tables)} — {device}, {stamp}, commit "
                         f"{git_commit()}, jax {jax.__version__}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
