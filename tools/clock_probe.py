"""Whether the gap between the benchmark's chained time and its traced kernel time is the SM clock:
times one row both ways, twice, while a thread reads the SM clock and the board power through NVML
every ~2 ms, and prints each timing with the clock and power seen during it.

The chained timing runs programs of up to hundreds of decode calls back to back; the traced one
40 calls. If the card lowers its clock under the sustained tensor-core load, the chained time
grows with it.

    python tools/clock_probe.py [--batch 128] [--seqlen 8192] [--heads 128] [--seqlen-q 2]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import threading
import time

import jax_flashmla
from jax_flashmla import bench

NVML_CLOCK_SM = 1
BUSY_WATTS = 150  # samples below this are idle gaps between the timing programs


class NvmlSampler:
    """Samples (time, SM clock MHz, power W) of GPU 0 on a background thread."""

    def __init__(self, period_s: float = 0.002):
        self._nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if self._nvml.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit failed")
        self._device = ctypes.c_void_p()
        if self._nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self._device)) != 0:
            raise RuntimeError("no NVML handle for GPU 0")
        self._period_s = period_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, int, float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        clock = ctypes.c_uint()
        milliwatts = ctypes.c_uint()
        while not self._stop.is_set():
            self._nvml.nvmlDeviceGetClockInfo(self._device, NVML_CLOCK_SM, ctypes.byref(clock))
            self._nvml.nvmlDeviceGetPowerUsage(self._device, ctypes.byref(milliwatts))
            self.samples.append((time.perf_counter(), clock.value, milliwatts.value / 1000))
            time.sleep(self._period_s)

    def __enter__(self) -> "NvmlSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, start: float, end: float) -> str:
        busy = [s for s in self.samples if start <= s[0] <= end and s[2] > BUSY_WATTS]
        if not busy:
            return "no busy samples"
        clocks = sorted(s[1] for s in busy)
        return (f"{len(busy)} busy samples: SM clock median {statistics.median(clocks):.0f} MHz, "
                f"p10 {clocks[len(clocks) // 10]}, min {clocks[0]}, max {clocks[-1]}; "
                f"power median {statistics.median(s[2] for s in busy):.0f} W, "
                f"max {max(s[2] for s in busy):.0f} W")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--seqlen-q", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shape = bench.Shape(args.batch, args.seqlen, args.heads, args.seqlen_q)
    problem = bench.make_problem(shape)
    # (metadata, num_splits), shared by every call
    shared = jax_flashmla.get_mla_metadata(problem.cache_seqlens, shape.seqlen_q * shape.heads_q, 1)
    op = bench.decode_fn("hopper")
    timings = {
        "chained": lambda: bench.calibrated_time_per_call(op, problem.cache_seqlens, shared,
                                                          problem.copies),
        "traced": lambda: bench.traced_time_per_call(op, problem.cache_seqlens, shared,
                                                     problem.copies),
    }
    print(shape)
    with NvmlSampler() as sampler:
        for repeat in range(args.repeats):
            for name, timing in timings.items():
                start = time.perf_counter()
                seconds = timing()
                end = time.perf_counter()
                value = "n/a" if seconds is None else f"{seconds * 1e3:.4f} ms"
                print(f"  {name} {repeat}: {value}; {sampler.summary(start, end)}")


if __name__ == "__main__":
    main()
