"""Where one decode call's device time goes: the main kernel, the launch gap behind it, and the
combine, read from a profiler trace of chained calls (as the bench's "kernel ms" column, which is
their sum). Tells whether folding the combine into the main kernel, or overlapping the two, is
worth more than the main kernel's own schedule on a given row.

    python tools/call_breakdown.py                      # the standard table's rows
    python tools/call_breakdown.py --batch 128 --seqlen 4096 --heads 128 --seqlen-q 2

Columns (µs, median over the traced calls): main kernel, gap from its end to the combine's start,
combine, the whole call (main start to combine end), then the share of the call spent outside the
main kernel, and how many sequences were split (the combine's work).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile

import jax
import numpy as np

import jax_flashmla
from jax_flashmla.bench import (CALL_KERNELS, MAIN_KERNEL, TABLES, Shape, _chained_calls,
                                decode_fn, make_problem)


def kernel_events(program, args) -> list[tuple[int, int, str]]:
    """(start_ns, end_ns, name) of every kernel of ours in one traced run of `program`."""
    program(*args).block_until_ready()
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            program(*args).block_until_ready()
        paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(paths[0])
    return sorted({(event.start_ns, event.end_ns, event.name)
                   for plane in data.planes if plane.name.startswith("/device:")
                   for line in plane.lines for event in line.events
                   if any(kernel in event.name for kernel in CALL_KERNELS)})


def breakdown(events) -> dict[str, float]:
    """Median µs of each part of a call; a call is a main kernel and the combines behind it."""
    calls = []
    for start, end, name in events:
        if MAIN_KERNEL in name:
            calls.append({"main": (start, end), "combine": []})
        elif calls:
            calls[-1]["combine"].append((start, end))
    parts = {"main": [], "gap": [], "combine": [], "call": []}
    for call in calls:
        main_start, main_end = call["main"]
        parts["main"].append(main_end - main_start)
        if call["combine"]:
            first = min(start for start, _ in call["combine"])
            last = max(end for _, end in call["combine"])
            parts["gap"].append(first - main_end)
            parts["combine"].append(last - first)
            parts["call"].append(last - main_start)
        else:
            parts["gap"].append(0)
            parts["combine"].append(0)
            parts["call"].append(main_end - main_start)
    return {part: statistics.median(values) / 1e3 for part, values in parts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+")
    parser.add_argument("--seqlen", type=int, nargs="+")
    parser.add_argument("--heads", type=int, nargs="+")
    parser.add_argument("--seqlen-q", type=int, nargs="+")
    parser.add_argument("--calls", type=int, default=40, help="chained calls in the trace")
    args = parser.parse_args()
    if args.batch or args.seqlen or args.heads or args.seqlen_q:
        shapes = [Shape(b, s_k, h, s_q) for b in args.batch or [128]
                  for s_k in args.seqlen or [4096] for h in args.heads or [128]
                  for s_q in args.seqlen_q or [1]]
    else:
        shapes = TABLES["standard"]
    if jax.devices()[0].platform != "gpu":
        print("needs a GPU: the breakdown reads our kernels from a profiler trace", file=sys.stderr)
        return 1
    print(f"{jax.devices()[0].device_kind}")
    print("| b | s_k | h_q | s_q | main µs | gap µs | combine µs | call µs | outside main "
          "| split sequences |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        problem = make_problem(shape)
        metadata, splits = jax.jit(jax_flashmla.get_mla_metadata, static_argnums=(1, 2))(
            problem.cache_seqlens, shape.seqlen_q * shape.heads_q, 1)
        pieces = np.diff(np.asarray(splits))
        program = _chained_calls(decode_fn("hopper"), args.calls)
        parts = breakdown(kernel_events(program, (problem.cache_seqlens, (metadata, splits),
                                                  problem.copies)))
        outside = 1 - parts["main"] / parts["call"]
        print(f"| {shape.batch} | {shape.seqlen_k} | {shape.heads_q} | {shape.seqlen_q} "
              f"| {parts['main']:.1f} | {parts['gap']:.1f} | {parts['combine']:.1f} "
              f"| {parts['call']:.1f} | {outside:.1%} | {int((pieces > 1).sum())} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
