"""ptxas's resource report for every CUDA kernel of the project, as a table.

Compiles each kernel source the way CMakeLists.txt does (same flags, one architecture at a time)
with `-Xptxas -v` and collects, per kernel: registers, stack frame, spill stores / loads, shared
memory, and any "Potential Performance Loss" line (ptxas's C75xx infos, e.g. wgmma instructions
serialised because of divergent code: such a kernel still runs correctly, only slower, so nothing
else would tell). Needs nvcc, not a GPU; tests/test_kernel_build.py asserts on the result.

    python tools/ptxas_report.py [--markdown FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shutil
import subprocess
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
# Flags of JAX_FLASHMLA_CUDA_FLAGS in CMakeLists.txt, plus the host-side defaults CMake adds.
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# (source, architectures it is built for), as in CMakeLists.txt.
SOURCES = [
    ("csrc/tile_scheduler.cu", ("sm_80", "sm_90a")),
    ("csrc/combine.cu", ("sm_80", "sm_90a")),
    ("csrc/decode_portable.cu", ("sm_80", "sm_90a")),
    ("csrc/hopper/decode_hopper.cu", ("sm_90a",)),
    ("csrc/hopper/decode_seesaw.cu", ("sm_90a",)),
]


@dataclasses.dataclass
class KernelReport:
    source: str
    arch: str
    kernel: str  # mangled name
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0
    performance_warnings: list[str] = dataclasses.field(default_factory=list)


def nvcc() -> str | None:
    return shutil.which("nvcc")


def compile_command(source: pathlib.Path, arch: str) -> list[str]:
    """nvcc compiling `source` for one architecture as CMakeLists.txt does; append the output
    options (-c / -cubin, -o)."""
    gencode = f"arch=compute_{arch.removeprefix('sm_')},code={arch}"
    return [nvcc(), *NVCC_FLAGS, "-gencode", gencode, "-I", str(REPO / "csrc"), str(source)]


def compile_report(source: str, arch: str) -> list[KernelReport]:
    """Compiles one source for one architecture and parses ptxas's per-kernel report."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [*compile_command(REPO / source, arch), "-Xptxas", "-v", "-c", "-o",
             str(pathlib.Path(tmp) / "kernel.o")],
            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} ({arch}):\n{result.stderr[-4000:]}")
    reports: list[KernelReport] = []
    current: KernelReport | None = None
    for line in result.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = KernelReport(source, arch, m.group(1))
            reports.append(current)
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                            r"(\d+) bytes spill loads", line):
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(
                int, m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            current.registers = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current.shared_bytes = int(s.group(1))
        elif "Potential Performance Loss" in line:
            # The message names the function it is about; attribute it to that kernel.
            target = next((r for r in reports if r.kernel in line), current)
            target.performance_warnings.append(line.split("info    :", 1)[-1].strip())
    return reports


def all_reports() -> list[KernelReport]:
    return [r for source, archs in SOURCES for arch in archs for r in compile_report(source, arch)]


def demangled_short(kernel: str) -> str:
    """A readable name: the kernel's identifier and its element type (template argument)."""
    name = re.findall(r"\d+([a-z_]+_kernel)[IE]", kernel)
    if "ILb1E" in kernel or "I13__nv_bfloat16E" in kernel:
        flavour = " (bf16)"
    elif "ILb0E" in kernel or "I6__halfE" in kernel:
        flavour = " (fp16)"
    else:
        flavour = ""
    return (name[-1] if name else kernel) + flavour


def markdown(reports: list[KernelReport]) -> str:
    lines = ["| source | arch | kernel | registers | stack / spill stores / spill loads (B) | "
             "static smem (B) | ptxas performance warnings |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.source} | {r.arch} | {demangled_short(r.kernel)} | {r.registers} | "
                     f"{r.stack_bytes} / {r.spill_store_bytes} / {r.spill_load_bytes} | "
                     f"{r.shared_bytes} | {len(r.performance_warnings) or 'none'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the table to this file")
    args = parser.parse_args()
    if nvcc() is None:
        print("nvcc not found")
        return 2
    table = markdown(all_reports())
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
