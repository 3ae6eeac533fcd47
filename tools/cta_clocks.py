"""Per-CTA clocks of the Hopper decode kernels: when each persistent CTA starts and when it finishes
each of its pieces (a sequence's share of its partition), in ns of the GPU's global timer, which
all SMs share. tools/seesaw_timeline.py follows one CTA of the seesaw cycle by cycle; this follows
every CTA of either schedule piece by piece, which is what the partitions' balance and a piece's
fixed cost are made of (kernel-notes.md, session 14).

The stamps come from an instrumented copy of the sources, built apart from the real package:

    python tools/cta_clocks.py instrument /tmp/cta-src
    pip install --no-build-isolation --no-deps --target /tmp/cta -C build-dir=/tmp/cta-build /tmp/cta-src
    PYTHONPATH=/tmp/cta python tools/cta_clocks.py run --heads 64 --seqlen-q 1

`instrument` copies the repository and rewrites both Hopper kernels: thread 0 of each CTA stamps
%globaltimer at its start and after each piece's output is written, and a one-thread kernel
launched behind the decode prints the records ("CTA kind index sm pieces start s:lo:hi:end ...").
`run` decodes a few times in a child process (the device's printf goes to its stdout) and reports
the last calls: the main kernel's span per call; for the last call, each CTA's end relative to the
first start (mean, min, 10th percentile, max) and the idle share at the tail (1 - mean / max: what
a perfect balance would recover); a least-squares fit of a piece's duration, a * pages + b
+ c * [odd page count] + d * [the CTA's first piece], whose b / a is a piece's fixed cost in pages
(the scheduler charges kFixedOverheadPages); and the three CTAs that finished last. A saved log
can be read again with --log.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re
import shutil
import statistics
import subprocess
import sys

import numpy as np

# The same decode calls and options as the seesaw's timeline (both tools sit in tools/, which is
# first on the path).
from seesaw_timeline import add_decode_arguments, run_decode

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = {"decode_hopper.cu": 0, "decode_seesaw.cu": 1}  # file -> kind printed in its records
MAX_CTAS = 1024
MAX_PIECES = 24
# Tokens a page (jax_flashmla._constants.PAGE_SIZE, not imported: instrument and --log run
# without the package installed).
PAGE_SIZE = 64

RECORDS = f"""namespace {{
// ---- per-CTA clocks (tools/cta_clocks.py) ----
constexpr int kClockCtas = {MAX_CTAS}, kClockPieces = {MAX_PIECES};
__device__ long long g_clock_start[kClockCtas];
__device__ long long g_clock_piece_end[kClockCtas][kClockPieces];
__device__ int g_clock_piece[kClockCtas][kClockPieces][3];  // sequence, first token, end token
__device__ int g_clock_pieces[kClockCtas];
__device__ int g_clock_sm[kClockCtas];
__device__ __forceinline__ long long clock_now() {{
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}}
__global__ void print_clocks_kernel(int ctas, int kind) {{
  for (int c = 0; c < ctas && c < kClockCtas; ++c) {{
    const int n = g_clock_pieces[c];
    if (n <= 0) continue;
    printf("CTA %d %d %d %d %lld", kind, c, g_clock_sm[c], n, g_clock_start[c]);
    for (int i = 0; i < n && i < kClockPieces; ++i)
      printf(" %d:%d:%d:%lld", g_clock_piece[c][i][0], g_clock_piece[c][i][1],
             g_clock_piece[c][i][2], g_clock_piece_end[c][i]);
    printf("\\n");
    g_clock_pieces[c] = 0;
  }}
}}
}}  // namespace
"""
START = """  const long long clock_start = clock_now();
  int clock_pieces = 0;
  const int clock_cta = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
"""
PIECE = """    if (threadIdx.x == 0 && clock_pieces < kClockPieces && clock_cta < kClockCtas) {
      g_clock_piece[clock_cta][clock_pieces][0] = s;
      g_clock_piece[clock_cta][clock_pieces][1] = seq_lo(pt, s);
      g_clock_piece[clock_cta][clock_pieces][2] = seq_hi(p, pt, s);
      g_clock_piece_end[clock_cta][clock_pieces] = clock_now();
    }
    ++clock_pieces;
"""
END = """  if (threadIdx.x == 0 && clock_cta < kClockCtas) {
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    g_clock_start[clock_cta] = clock_start;
    g_clock_pieces[clock_cta] = clock_pieces;
    g_clock_sm[clock_cta] = sm;
  }
"""

# (pattern, replacement) applied to each kernel file; each must match exactly once.
REWRITES = [
    (r"(namespace jax_flashmla \{\nnamespace hopper \{\n)", lambda m: m.group(1) + RECORDS),
    (r"(  if \(!read_partition\(p, [^;]*\)\) return;[^\n]*\n)", lambda m: m.group(1) + START),
    (r"(    write_piece<kBf16>\([^;]*;\n)(  \}\n)(\}\n)",
     lambda m: m.group(1) + PIECE + m.group(2) + END + m.group(3)),
]
LAUNCH = r"(  kernel<<<grid, kThreads, [^;]*;\n)"


def instrument(destination: pathlib.Path, source: pathlib.Path = ROOT) -> None:
    """Copies the repository at `source` to `destination` and adds the clocks to both kernels."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(
        ".git", "build", "exp", "out", ".whl", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis"))
    for name, kind in KERNELS.items():
        path = destination / "csrc" / "hopper" / name
        text = "#include <cstdio>\n" + path.read_text()
        launch = (LAUNCH, lambda m, kind=kind: m.group(1) + "  print_clocks_kernel<<<1, 1, 0, "
                  f"stream>>>(grid.x * grid.y * grid.z, {kind});\n")
        for pattern, replacement in REWRITES + [launch]:
            text, count = re.subn(pattern, replacement, text)
            if count != 1:
                raise RuntimeError(f"{name}: /{pattern}/ matched {count} times, not once: the "
                                   "kernel changed shape; update tools/cta_clocks.py")
        path.write_text(text)


@dataclasses.dataclass
class Cta:
    kind: int            # 0: split S, 1: seesaw
    sm: int
    start_ns: int
    pieces: list[tuple[int, int, int, int]]  # (sequence, first token, end token, end ns)


def parse(lines) -> list[dict[int, Cta]]:
    """The CTAs of each decode call in a log (a call starts again when a CTA index repeats)."""
    calls: list[dict[int, Cta]] = []
    current: dict[int, Cta] = {}
    for line in lines:
        words = line.split()
        if len(words) < 6 or words[0] != "CTA":
            continue
        index = int(words[2])
        if index in current:
            calls.append(current)
            current = {}
        pieces = [tuple(int(v) for v in piece.split(":")) for piece in words[6:]]
        current[index] = Cta(int(words[1]), int(words[3]), int(words[5]), pieces)
    if current:
        calls.append(current)
    return calls


def pages(first_token: int, end_token: int) -> int:
    """Pages of the tokens [first_token, end_token): the pages a piece loads."""
    return max(math.ceil(end_token / PAGE_SIZE) - first_token // PAGE_SIZE, 0)


def span_us(call: dict[int, Cta]) -> float:
    """The main kernel's span: first CTA start to last piece end."""
    start = min(cta.start_ns for cta in call.values())
    return (max(cta.pieces[-1][3] for cta in call.values()) - start) / 1e3


def fit_piece_cost(call: dict[int, Cta]) -> tuple[np.ndarray, float, int]:
    """Least squares over the call's pieces: duration (µs) = a * pages + b + c * [odd page count]
    + d * [the CTA's first piece]. Returns (a, b, c, d), the residuals' standard deviation and
    the number of pieces."""
    features, durations = [], []
    for cta in call.values():
        previous = cta.start_ns
        for index, (_, first, end, end_ns) in enumerate(cta.pieces):
            count = pages(first, end)
            features.append([count, 1.0, count % 2, index == 0])
            durations.append((end_ns - previous) / 1e3)
            previous = end_ns
    x, y = np.array(features, float), np.array(durations)
    coefficients = np.linalg.lstsq(x, y, rcond=None)[0]
    return coefficients, float(np.std(y - x @ coefficients)), len(y)


def report(calls: list[dict[int, Cta]], label: str = "") -> str:
    if not calls:
        return "no CTA records"
    timed = calls[1:] if len(calls) > 1 else calls  # the first call also compiles and warms up
    spans = [span_us(call) for call in timed]
    call = calls[-1]
    start = min(cta.start_ns for cta in call.values())
    ends = np.array([(cta.pieces[-1][3] - start) / 1e3 for cta in call.values()])
    kind = "seesaw" if next(iter(call.values())).kind else "split S"
    (a, b, c, d), residual, count = fit_piece_cost(call)
    out = [f"{label}{kind}, {len(call)} CTAs; span per call (µs): "
           + " ".join(f"{span:.1f}" for span in spans) + f", median {statistics.median(spans):.1f}",
           f"  last call: CTA ends (µs) mean {ends.mean():.1f}, min {ends.min():.1f}, "
           f"p10 {np.percentile(ends, 10):.1f}, max {ends.max():.1f}; idle share at the tail "
           f"{1 - ends.mean() / ends.max():.1%}",
           f"  piece fit: {a * 1e3:.0f} ns a page, {b * 1e3:.0f} ns a piece (= {b / a:.1f} pages), "
           f"{c * 1e3:.0f} ns for an odd page count, {d * 1e3:.0f} ns more for a CTA's first "
           f"piece; residual sd {residual * 1e3:.0f} ns over {count} pieces"]
    for index, cta in sorted(call.items(), key=lambda item: item[1].pieces[-1][3])[-3:]:
        pieces = " ".join(f"s{seq}[{first // PAGE_SIZE}:{first // PAGE_SIZE + pages(first, end)}]"
                          f"@{(t - start) / 1e3:.1f}"
                          for seq, first, end, t in cta.pieces)
        out.append(f"  late CTA {index} (SM {cta.sm}, start {(cta.start_ns - start) / 1e3:.1f}): "
                   f"{pieces}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rewrite = commands.add_parser("instrument", help="copy the repository, add the clocks")
    rewrite.add_argument("destination", type=pathlib.Path)
    run = commands.add_parser("run", help="decode with an instrumented build and report")
    add_decode_arguments(run, 6, "decode calls; the first is not timed")
    args = parser.parse_args()
    if args.command == "instrument":
        instrument(args.destination)
        return 0
    if args.child:
        run_decode(args)
        return 0
    if args.log:
        text = pathlib.Path(args.log).read_text()
    else:
        command = [sys.executable, __file__, "run", "--child", *sys.argv[2:]]
        text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        if args.save:
            pathlib.Path(args.save).write_text(text)
    calls = parse(text.splitlines())
    if not calls:
        print("no CTA records: is the instrumented build on PYTHONPATH?", file=sys.stderr)
        return 1
    label = f"b {args.batch} s_k {args.seqlen} h_q {args.heads} s_q {args.seqlen_q}: "
    print(report(calls, label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
