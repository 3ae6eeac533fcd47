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
import statistics
import sys

import jax
import numpy as np

import jax_flashmla
from jax_flashmla.bench import (TABLES, Shape, call_spans_ns, calls_in_trace, decode_fn,
                                make_problem, traced_kernel_events)


def breakdown(events) -> dict[str, float]:
    """Median µs of each part of a call, from a trace's kernel events (name, start_ns, end_ns)."""
    parts = {"main": [], "gap": [], "combine": []}
    for (main_start, main_end), behind in calls_in_trace(events):
        parts["main"].append(main_end - main_start)
        first = min((start for start, _ in behind), default=main_end)  # no combine: gap 0
        last = max((end for _, end in behind), default=main_end)
        parts["gap"].append(first - main_end)
        parts["combine"].append(last - first)
    parts["call"] = call_spans_ns(events)  # the bench's "kernel ms", per call
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
        events = traced_kernel_events(decode_fn("hopper"), problem.cache_seqlens,
                                      (metadata, splits), problem.copies, args.calls)
        if not calls_in_trace(events or []):
            print("the trace holds no decode kernel (is CUPTI available?)", file=sys.stderr)
            return 1
        parts = breakdown(events)
        outside = 1 - parts["main"] / parts["call"]
        print(f"| {shape.batch} | {shape.seqlen_k} | {shape.heads_q} | {shape.seqlen_q} "
              f"| {parts['main']:.1f} | {parts['gap']:.1f} | {parts['combine']:.1f} "
              f"| {parts['call']:.1f} | {outside:.1%} | {int((pieces > 1).sum())} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
