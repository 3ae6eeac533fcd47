"""How much of the Hopper kernel's time is waiting for HBM: the same decode timed twice, once with
the block table spread over the whole page pool (every page streams from HBM, as in the
benchmark) and once with every entry folded onto the pool's first `--resident-pages` pages (all
loads hit L2). The work, the shared-memory traffic and the number of page loads are identical; only
where the pages come from differs.

    python tools/l2_probe.py [--seqlen 4096] [--heads 128] [--seqlen-q 1 2]
"""

from __future__ import annotations

import argparse

import jax

import jax_flashmla
from jax_flashmla import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seqlen", type=int, nargs="+", default=[4096])
    parser.add_argument("--heads", type=int, nargs="+", default=[128])
    parser.add_argument("--seqlen-q", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--resident-pages", type=int, default=256,
                        help="pages the folded table uses (256 pages = 18.9 MB, well inside L2)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}")
    print("| b | s_k | h_q | s_q | HBM-streamed ms | L2-resident ms | resident / streamed |")
    print("|---|---|---|---|---|---|---|")
    for seqlen in args.seqlen:
        for heads in args.heads:
            for seqlen_q in args.seqlen_q:
                shape = bench.Shape(args.batch, seqlen, heads, seqlen_q)
                problem = bench.make_problem(shape)
                metadata = jax.jit(jax_flashmla.get_mla_metadata, static_argnums=(1, 2))(
                    problem.cache_seqlens, seqlen_q * heads, 1)
                times = []
                for fold in (False, True):
                    copies = [(q, k_cache, table % args.resident_pages if fold else table)
                              for q, k_cache, table in problem.copies]
                    seconds = bench.calibrated_time_per_call(
                        bench.decode_fn("hopper"), problem.cache_seqlens, metadata, copies)
                    times.append(seconds * 1e3)
                print(f"| {args.batch} | {seqlen} | {heads} | {seqlen_q} | {times[0]:.4f} | "
                      f"{times[1]:.4f} | {times[1] / times[0]:.2f} |", flush=True)
                del problem  # free this shape's pools before the next one's


if __name__ == "__main__":
    main()
