"""Compile-time properties of the CUDA kernels that no GPU test would notice: spills and wgmma
serialisation make a kernel slower, never wrong. Needs nvcc (not a GPU); skipped without it."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools"))
import ptxas_report  # noqa: E402  (needs the path above)

pytestmark = pytest.mark.skipif(ptxas_report.nvcc() is None, reason="nvcc not found")

# Every kernel a source must contain for each architecture (bf16 and fp16 instantiations; the
# combine has three work shapes of each).
EXPECTED_KERNELS = {
    "csrc/tile_scheduler.cu": 1,
    "csrc/combine.cu": 6,
    "csrc/decode_portable.cu": 2,
    "csrc/hopper/decode_hopper.cu": 2,
    "csrc/hopper/decode_seesaw.cu": 2,
}


@pytest.fixture(scope="module")
def reports():
    return ptxas_report.all_reports()


def test_every_kernel_of_every_architecture_is_reported(reports):
    for source, archs in ptxas_report.SOURCES:
        for arch in archs:
            found = [r for r in reports if r.source == source and r.arch == arch]
            assert len(found) == EXPECTED_KERNELS[source], (source, arch, [r.kernel for r in found])
            assert all(r.registers > 0 for r in found), found


def test_no_kernel_spills_registers_or_uses_a_stack(reports):
    offenders = [(r.source, r.arch, ptxas_report.demangled_short(r.kernel), r.stack_bytes,
                  r.spill_store_bytes, r.spill_load_bytes)
                 for r in reports if r.stack_bytes or r.spill_store_bytes or r.spill_load_bytes]
    assert not offenders, f"stack / spill stores / spill loads in bytes: {offenders}"


def test_ptxas_reports_no_performance_loss_such_as_serialised_wgmma(reports):
    offenders = {(r.source, r.arch, ptxas_report.demangled_short(r.kernel)): r.performance_warnings
                 for r in reports if r.performance_warnings}
    assert not offenders, offenders


def test_parser_reads_spills_and_serialisation_warnings(monkeypatch):
    # The assertions above only mean something if the parser sees what ptxas prints when things
    # go wrong; feed it such a report.
    stderr = "\n".join([
        "ptxas info    : Compiling entry function '_ZN3foo10bar_kernelILb1EEEvv' for 'sm_90a'",
        "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to program dependence on compiler-inserted WG.AR in divergent path in "
        "the function '_ZN3foo10bar_kernelILb1EEEvv'",
        "ptxas info    : Function properties for _ZN3foo10bar_kernelILb1EEEvv",
        "    24 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads",
        "ptxas info    : Used 255 registers, used 16 barriers, 1024 bytes smem",
    ])

    class Completed:
        returncode = 0

    Completed.stderr = stderr
    monkeypatch.setattr(ptxas_report.subprocess, "run", lambda *a, **k: Completed())
    (report,) = ptxas_report.compile_report("csrc/hopper/decode_seesaw.cu", "sm_90a")
    assert (report.registers, report.stack_bytes, report.spill_store_bytes,
            report.spill_load_bytes, report.shared_bytes) == (255, 24, 12, 16, 1024)
    assert len(report.performance_warnings) == 1 and "C7520" in report.performance_warnings[0]
    assert ptxas_report.demangled_short(report.kernel) == "bar_kernel (bf16)"


def test_wgmma_rate_probe_keeps_its_wgmmas_pipelined():
    # tools/wgmma_rate.cu measures the tensor pipe; a serialised wgmma (or a spill) in one of its
    # cases would make that case measure the compiler's fallback instead.
    reports = ptxas_report.compile_report("tools/wgmma_rate.cu", "sm_90a")
    assert len(reports) == 27, [r.kernel for r in reports]
    offenders = [(r.kernel, r.performance_warnings, r.spill_store_bytes, r.spill_load_bytes)
                 for r in reports
                 if r.performance_warnings or r.spill_store_bytes or r.spill_load_bytes]
    assert not offenders, offenders


def test_stream_rate_probe_builds_without_spills():
    # tools/stream_rate.cu measures how fast pages stream from HBM into shared memory; a build
    # error or a spill would otherwise show up only in the next GPU session.
    (report,) = ptxas_report.compile_report("tools/stream_rate.cu", "sm_90a")
    assert ptxas_report.demangled_short(report.kernel).startswith("stream_kernel")
    assert (report.spill_store_bytes, report.spill_load_bytes) == (0, 0)
