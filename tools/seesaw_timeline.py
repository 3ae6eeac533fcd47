"""Timeline of the seesaw kernel's pairs, from clock64() stamps inside one CTA: where a pair's
cycles go (which warpgroup waits for what, when each wgmma group is issued and done) and what a
sequence boundary costs. Profilers give totals per source line; this gives the order of events,
which is what a schedule is made of (kernel-notes.md, session 11).

The stamps come from an instrumented build: tools/seesaw_timeline.patch adds them to
csrc/hopper/decode_seesaw.cu (two leader threads of one CTA write them to a global array; a
one-thread kernel prints them after each decode call). Build it apart from the real package:

    git apply tools/seesaw_timeline.patch
    pip install --no-build-isolation --no-deps --target /tmp/timeline -C build-dir=/tmp/tl-build .
    git apply -R tools/seesaw_timeline.patch
    PYTHONPATH=/tmp/timeline python tools/seesaw_timeline.py --heads 128 --seqlen-q 2

The patch must apply to the kernel as committed (a CPU test checks it); refresh it after editing
the kernel: apply it, fix what no longer fits, and write `git diff` of the kernel back to it.
A saved log can be read again with --log. Times are SM cycles of the traced CTA (partition 7 of
tile 0 unless the build sets JFM_TIMELINE_PARTITION), the median over the pairs of the last
decode call that are neither a sequence's first or last pair; each pair's events are relative
to warpgroup 0's top of that pair (the scores a pair uses are issued during the pair before,
so their events are negative).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys

# Event numbers of the patch: (name, what happened just before the stamp).
EVENTS = {
    0: ("wg0 top", "warpgroup 0 starts the pair (its scores of page c are done)"),
    38: ("wg0 body", "the pair's bookkeeping done, warpgroup 0's branch entered"),
    32: ("wg0 row max", "row maxima of S_c"),
    33: ("wg0 exp", "P_c exponentiated"),
    34: ("wg0 P stored", "P_c packed and stored to warpgroup 0's P tile"),
    35: ("wg0 P fenced", "fence.proxy.async after the P tile"),
    1: ("wg0 A", "arrived at barrier A (m_c, P_c ready for warpgroup 1)"),
    36: ("wg0 rescaled", "row sums and O_L rescaled to m_c"),
    15: ("wg0 P ready", "warpgroup barrier: the whole P tile is stored"),
    2: ("wg0 PcVcL issued", "O_L += P_c V_c,L committed"),
    3: ("wg0 B", "passed barrier B (m_d, P_d from warpgroup 1)"),
    4: ("wg0 PcVcL done", "wgmma wait: P_c V_c,L complete"),
    5: ("wg0 released c.V0", "page c's V half 0 re-armed for page c + 2"),
    6: ("wg0 PdVdL issued", "O_L += P_d V_d,L committed"),
    7: ("wg0 S.g1 waited", "next S_c: V half 0 of page c + 2 landed"),
    8: ("wg0 S.g1 issued", "next S_c: its first commit group issued"),
    9: ("wg0 PdVdL done", "wgmma wait: P_d V_d,L complete"),
    10: ("wg0 released d", "page d's V half 0 and RoPE box re-armed"),
    11: ("wg0 S.rope waited", "next S_c: RoPE box of page c + 2 landed"),
    12: ("wg0 S.V1 waited", "next S_c: V half 1 of page c + 2 landed"),
    13: ("wg0 S issued", "next S_c: all of it issued (arrives at D)"),
    14: ("wg0 S done", "next S_c complete"),
    16: ("wg1 top", "warpgroup 1 starts the pair (its scores of page d are done)"),
    46: ("wg1 body", "the pair's bookkeeping done, warpgroup 1's branch entered"),
    40: ("wg1 row max", "row maxima of S_d"),
    17: ("wg1 A", "passed barrier A"),
    41: ("wg1 P_c loaded", "P_c loaded from warpgroup 0's tile (and scaled to m_d)"),
    42: ("wg1 exp", "P_d exponentiated"),
    43: ("wg1 P stored", "P_d packed and stored to page d's RoPE box"),
    44: ("wg1 P fenced", "fence.proxy.async after P_d"),
    18: ("wg1 B", "arrived at barrier B"),
    45: ("wg1 rescaled", "row sums and O_R rescaled to m_d"),
    19: ("wg1 c.V1 ready", "page c's V half 1 waited (and tail rows zeroed)"),
    20: ("wg1 PcVcR issued", "O_R += P_c V_c,R committed"),
    21: ("wg1 PdVdR issued", "O_R += P_d V_d,R committed"),
    22: ("wg1 PcVcR done", "wgmma wait: P_c V_c,R complete"),
    23: ("wg1 released c", "page c's V half 1 and RoPE box re-armed"),
    24: ("wg1 PdVdR done", "wgmma wait: P_d V_d,R complete"),
    25: ("wg1 released d", "page d's V half 1 re-armed"),
    26: ("wg1 D", "next S_d: passed barrier D (S_c queued)"),
    27: ("wg1 S.V1 waited", "next S_d: V half 1 of page d + 2 landed"),
    28: ("wg1 S.rope waited", "next S_d: RoPE box landed"),
    29: ("wg1 S.V0 waited", "next S_d: V half 0 landed"),
    30: ("wg1 S issued", "next S_d: all of it issued"),
    31: ("wg1 S done", "next S_d complete"),
    48: ("wg0 epilogue", "epilogue barrier passed (row sums exchanged)"),
    49: ("wg1 epilogue", "epilogue barrier passed"),
    50: ("wg0 written", "the piece's output written"),
    51: ("wg1 written", "the piece's output written"),
    52: ("wg0 Q wait", "next sequence: before finish_q_load"),
    53: ("wg1 Q wait", "next sequence: before finish_q_load"),
    54: ("wg0 Q ready", "next sequence: Q in shared memory"),
    55: ("wg1 Q ready", "next sequence: Q in shared memory"),
}
BOUNDARY_EVENTS = (48, 49, 50, 51, 52, 53, 54, 55)


@dataclasses.dataclass
class Pair:
    sequence: int
    first_page: int
    events: dict[int, int]  # event -> cycles since the call's first stamp


def parse(lines) -> list[list[Pair]]:
    """The pairs of each decode call in a log (a call starts again at pair 0)."""
    calls: list[list[Pair]] = []
    for line in lines:
        words = line.split()
        if len(words) < 3 or words[0] != "TIMELINE":
            continue
        index = int(words[2])
        if words[1] == "pair":
            if index == 0:
                calls.append([])
            calls[-1].append(Pair(int(words[3]), int(words[4]), {}))
        elif words[1] == "events" and calls:
            first = int(words[3])
            for offset, value in enumerate(words[4:]):
                if int(value) >= 0:
                    calls[-1][index].events[first + offset] = int(value)
    return calls


def steady(pairs: list[Pair]) -> list[int]:
    """Pairs inside a sequence: neither its first nor its last (nor the CTA's last)."""
    return [q for q in range(1, len(pairs) - 1)
            if pairs[q - 1].sequence == pairs[q].sequence == pairs[q + 1].sequence]


def report(pairs: list[Pair]) -> str:
    inner = steady(pairs)
    if not inner:
        return "no pair lies inside a sequence: use longer sequences"
    out = []
    periods = [pairs[q + 1].events[0] - pairs[q].events[0] for q in inner]
    period = statistics.median(periods)
    out.append(f"{len(pairs)} pairs, {len(inner)} inside sequences; period median {period:.0f} "
               f"cycles (min {min(periods)}, max {max(periods)})")
    rows = []
    for event, (name, meaning) in EVENTS.items():
        if event in BOUNDARY_EVENTS:
            continue
        offsets = [pairs[q].events[event] - pairs[q].events[0] for q in inner
                   if event in pairs[q].events and 0 in pairs[q].events]
        if offsets:
            rows.append((statistics.median(offsets), name, meaning))
    out.append(f"{'cycles':>7}  {'event':<18} what")
    out += [f"{t:7.0f}  {name:<18} {meaning}" for t, name, meaning in sorted(rows)]
    starts = [q for q in range(1, len(pairs)) if pairs[q].sequence != pairs[q - 1].sequence]
    if starts:
        out.append("sequence boundaries (cycles from the top of the old sequence's last pair):")
    for q in starts:
        top = pairs[q - 1].events.get(0)
        if top is None:
            continue
        stamps = {EVENTS[e][0]: pairs[q].events[e] - top for e in BOUNDARY_EVENTS + (0,)
                  if e in pairs[q].events}
        extra = stamps.get("wg0 top", period) - period
        out.append(f"  pair {q} (sequence {pairs[q].sequence}): {extra:+.0f} cycles over a pair; "
                   + ", ".join(f"{name} {t}" for name, t in stamps.items()))
    return "\n".join(out)


def run_decode(args) -> None:
    """Child process: the decode calls whose records the instrumented build prints."""
    import jax
    import jax_flashmla
    from jax_flashmla.bench import Shape, decode_fn, make_problem

    problem = make_problem(Shape(args.batch, args.seqlen, args.heads, args.seqlen_q))
    metadata, splits = jax.jit(jax_flashmla.get_mla_metadata, static_argnums=(1, 2))(
        problem.cache_seqlens, args.seqlen_q * args.heads, 1)
    decode = jax.jit(decode_fn("hopper"))
    for call in range(args.calls):
        copy = problem.copies[call % len(problem.copies)]
        jax.block_until_ready(decode(problem.cache_seqlens, metadata, splits, *copy))


def add_decode_arguments(parser: argparse.ArgumentParser, calls: int, calls_help: str) -> None:
    """The decode's shape (run_decode's), and how a run is made or read back (with cta_clocks.py)."""
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=4096, help="mean length (varlen, as bench)")
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--seqlen-q", type=int, default=2)
    parser.add_argument("--calls", type=int, default=calls, help=calls_help)
    parser.add_argument("--log", help="read this saved log instead of running")
    parser.add_argument("--save", help="also write the run's log to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_decode_arguments(parser, 3, "decode calls; the last is reported")
    args = parser.parse_args()
    if args.child:
        run_decode(args)
        return 0
    if args.log:
        with open(args.log) as f:
            text = f.read()
    else:
        # The device's printf goes to the process's stdout, outside Python's buffers: run the
        # decode in a child and read what it printed.
        command = [sys.executable, __file__, "--child", *sys.argv[1:]]
        text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        if args.save:
            with open(args.save, "w") as f:
                f.write(text)
    calls = parse(text.splitlines())
    if not calls:
        print("no timeline records: is the instrumented build on PYTHONPATH, and did the seesaw "
              "schedule run (JAX_FLASHMLA_HOPPER_SCHEDULE=seesaw forces it)?", file=sys.stderr)
        return 1
    print(report(calls[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
