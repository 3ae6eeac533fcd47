"""Where a kernel's warps stall, by source line: joins the per-SASS-instruction warp samples that
Nsight Compute exports (the CSV `tools/profile_kernels.sh` writes) with the line table of the same
kernel compiled here with -lineinfo (`nvdisasm -gi`), and prints, per region of the kernel, the
source lines with the most samples and the stall reasons behind them.

Compiling here gives the same SASS as the GPU machine's build when the source, nvcc and flags are
the same (the offsets are checked: the function is picked by its instruction count, and every
instruction's opcode must match). An instruction is charged to the innermost line of the call
chain that lies in the kernel's body (inlined helpers count where the kernel calls them); a region
(`--region WG0=527-611`) takes the instructions whose call chain passes through its lines.
The CSV has no column for the `warpgroup_arrive` reason (warps of a warpgroup waiting for each
other at a wgmma); it is what the sampled total leaves over the listed reasons.

    python tools/sass_lines.py SASS_CSV --source csrc/hopper/decode_seesaw.cu \\
        --region WG0=527-611 --region WG1=612-692 [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ptxas_report import compile_command, nvcc  # noqa: E402

TOTAL_COLUMN = "Warp Stall Sampling (All Samples)"
UNLISTED_REASON = "warpgroup_arrive"

Frame = tuple[str, int]  # (file name, line)


@dataclasses.dataclass
class SassFunction:
    name: str
    opcodes: list[str]        # per instruction, in address order
    chains: list[list[Frame]]  # per instruction: its line and the lines it is inlined at


def parse_line_table(text: str) -> list[SassFunction]:
    """Functions of `nvdisasm -gi -c` output with each instruction's inlined call chain."""
    functions: list[SassFunction] = []
    pending: list[Frame] = []
    last: list[Frame] = []
    for line in text.splitlines():
        if m := re.match(r"\s*\.text\.(\S+):", line):
            functions.append(SassFunction(m.group(1), [], []))
            pending, last = [], []
        elif m := re.match(r'\s*//## File "([^"]+)", line (\d+)', line):
            pending.append((pathlib.PurePath(m.group(1)).name, int(m.group(2))))
        elif functions and (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)",
                                          line)):
            if pending:  # the first frame of a group is the instruction's own line
                last, pending = pending, []
            functions[-1].opcodes.append(m.group(1))
            functions[-1].chains.append(last)
    return functions


def read_samples(path: str) -> tuple[list[str], list[dict[str, float]]]:
    """Opcodes and per-reason sample counts of each instruction of the profiled kernel."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[1], rows[2:]
    source = header.index("Source")
    total = header.index(TOTAL_COLUMN)
    reasons = [(i, h.removeprefix("stall_")) for i, h in enumerate(header)
               if h.startswith("stall_") and "Not Issued" not in h]
    opcodes, samples = [], []
    for row in data:
        counts = {name: float(row[i] or 0) for i, name in reasons}
        counts[UNLISTED_REASON] = float(row[total] or 0) - sum(counts.values())
        counts["all"] = float(row[total] or 0)
        samples.append(counts)
        m = re.match(r"\s*(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", row[source])
        opcodes.append(m.group(1) if m else "")
    return opcodes, samples


def body_line(chain: list[Frame], source: str, body_from: int) -> int:
    """The innermost line of the chain in the kernel's body, or 0."""
    return next((line for name, line in chain if name == source and line >= body_from), 0)


def region_of(chain: list[Frame], source: str, regions: dict[str, tuple[int, int]]) -> str:
    for name, (first, last) in regions.items():
        if any(f == source and first <= line <= last for f, line in chain):
            return name
    return "other"


def report(function: SassFunction, samples: list[dict[str, float]], source_path: pathlib.Path,
           body_from: int, regions: dict[str, tuple[int, int]], top: int) -> str:
    source = source_path.name
    text = source_path.read_text().splitlines()
    per_line: dict[tuple[str, int], collections.Counter] = collections.defaultdict(
        collections.Counter)
    for chain, counts in zip(function.chains, samples):
        key = (region_of(chain, source, regions), body_line(chain, source, body_from))
        per_line[key].update(counts)
    grand = sum(c["all"] for c in per_line.values()) or 1.0
    out = []
    for region in [*regions, "other"]:
        lines = {k[1]: c for k, c in per_line.items() if k[0] == region}
        region_total = sum(c["all"] for c in lines.values())
        if not region_total:
            continue
        out.append(f"== {region}: {100 * region_total / grand:.1f}% of all samples; "
                   "each line's share of the region's, with its top reasons")
        for line, counts in sorted(lines.items(), key=lambda kv: -kv[1]["all"])[:top]:
            reasons = sorted(((v, k) for k, v in counts.items() if k != "all"), reverse=True)[:3]
            code = text[line - 1].strip() if 0 < line <= len(text) else "(outside the body)"
            out.append(f"{line:6d} {100 * counts['all'] / region_total:5.1f}%  {code[:60]:60s} "
                       + " ".join(f"{k}:{100 * v / region_total:.1f}" for v, k in reasons if v))
    return "\n".join(out)


def disassemble(source: pathlib.Path, arch: str, nvdisasm: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        subprocess.run([*compile_command(source, arch), "-cubin", "-o", str(cubin)], check=True)
        return subprocess.run([nvdisasm, "-gi", "-c", str(cubin)], check=True,
                              capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="per-instruction samples (ncu --page source --csv)")
    parser.add_argument("--source", required=True, help="the kernel's .cu file")
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--region", action="append", default=[], metavar="NAME=FIRST-LAST")
    parser.add_argument("--body-from", type=int, default=0,
                        help="first line of the kernel's body (default: its __global__ line)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--nvdisasm", default=None, help="default: next to nvcc, else on PATH")
    args = parser.parse_args()
    source = pathlib.Path(args.source).resolve()
    if nvcc() is None:
        sys.exit("needs nvcc")
    nvdisasm = args.nvdisasm or str(pathlib.Path(nvcc()).with_name("nvdisasm"))
    if not pathlib.Path(nvdisasm).exists():
        nvdisasm = shutil.which("nvdisasm") or sys.exit("needs nvdisasm (--nvdisasm PATH)")
    body_from = args.body_from or next(
        i + 1 for i, line in enumerate(source.read_text().splitlines()) if "__global__" in line)
    regions = {}
    for spec in args.region:
        name, span = spec.split("=")
        first, last = map(int, span.split("-"))
        regions[name] = (first, last)
    opcodes, samples = read_samples(args.csv)
    matches = [f for f in parse_line_table(disassemble(source, args.arch, nvdisasm))
               if f.opcodes == opcodes]
    if not matches:
        sys.exit("no function compiled here has the profiled kernel's instructions: "
                 "another source, nvcc or flags than the profiled build")
    print(report(matches[0], samples, source, body_from, regions, args.top))


if __name__ == "__main__":
    main()
