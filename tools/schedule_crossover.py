"""Where the Hopper kernel's seesaw schedule starts to beat split S: the same decode (fixed
lengths) timed with each schedule forced through JAX_FLASHMLA_HOPPER_SCHEDULE, in one process and
alternating, with the pages each partition walks. The dispatcher's threshold
(kSeesawMinPagesPerPartition in csrc/hopper/launch.cu) comes from this table.

    python tools/schedule_crossover.py [--batch 1 8] [--seqlen 4096 32768] [--heads 128]
"""

from __future__ import annotations

import argparse
import os

import jax

import jax_flashmla
from jax_flashmla import bench
from jax_flashmla._extension import SCHEDULE_VARIABLE

SCHEDULES = ("split", "seesaw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[4096, 32768, 65536])
    parser.add_argument("--heads", type=int, nargs="+", default=[128])
    parser.add_argument("--seqlen-q", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=2, help="timings per schedule and row")
    args = parser.parse_args()
    if not jax_flashmla.hopper_kernel_available():
        raise SystemExit("this build has no Hopper kernel")
    print(f"device: {jax.devices()[0].device_kind}")
    print("| b | s_k | h_q | s_q | pages per partition | split S µs | seesaw µs |")
    print("|---|---|---|---|---|---|---|")
    forced_before = os.environ.get(SCHEDULE_VARIABLE)
    try:
        for batch in args.batch:
            for seqlen in args.seqlen:
                for heads in args.heads:
                    for seqlen_q in args.seqlen_q:
                        shape = bench.Shape(batch, seqlen, heads, seqlen_q, fixed=True)
                        print(row(shape, args.repeats), flush=True)
    finally:
        if forced_before is None:
            os.environ.pop(SCHEDULE_VARIABLE, None)
        else:
            os.environ[SCHEDULE_VARIABLE] = forced_before


def row(shape: bench.Shape, repeats: int) -> str:
    problem = bench.make_problem(shape)
    metadata, splits = jax_flashmla.get_mla_metadata(problem.cache_seqlens,
                                                     shape.seqlen_q * shape.heads_q, 1)
    pages = problem.total_tokens / bench.PAGE_SIZE / metadata.shape[0]
    times = {name: [] for name in SCHEDULES}
    for _ in range(repeats):
        for name in SCHEDULES:  # read by the extension at every launch
            os.environ[SCHEDULE_VARIABLE] = name
            seconds = bench.calibrated_time_per_call(bench.decode_fn("hopper"),
                                                     problem.cache_seqlens, (metadata, splits),
                                                     problem.copies)
            times[name].append(f"{seconds * 1e6:.1f}")
    cells = [" / ".join(times[name]) for name in SCHEDULES]
    return (f"| {shape.batch} | {shape.seqlen_k} | {shape.heads_q} | {shape.seqlen_q} | "
            f"{pages:.1f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
