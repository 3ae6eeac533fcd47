"""A few small decode cases that reach every code path of the CUDA kernels, for compute-sanitizer.

tools/sanitize.sh runs this under memcheck, racecheck and synccheck. The cases are small because
the sanitizer slows instrumented kernels down a hundredfold, yet together they cover: unsplit and
split sequences (and so the combine kernel), zero-length sequences, partial last pages, causal
s_q = 2, two KV heads, query tiles of more than 64 rows, needed block ids outside the pool, and
negative and too-long lengths. Each case is also checked against the float64 oracle of
tests/mla_cases.py, so a kernel that goes wrong without a memory fault still fails the run.

    python tools/sanitize_cases.py [--implementations portable,hopper] [--case NAME ...]

Exits 1 when any case mismatches the oracle; the sanitizer's verdict is in its own output.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import ml_dtypes
import numpy as np

import jax_flashmla

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from mla_cases import assert_close, make_case, oracle  # noqa: E402  (needs the path above)


@dataclasses.dataclass
class SanitizeCase:
    name: str
    batch: int
    seqlen_q: int
    heads_q: int
    heads_kv: int
    lengths: list[int]
    causal: bool
    # Partitions of the schedule: 1 keeps every sequence whole, more split the long ones.
    num_sm_parts: int
    dtype: type = ml_dtypes.bfloat16
    # (sequence, page, block id) entries written into the table after the case is built.
    bad_blocks: tuple = ()
    # (sequence, length) overrides applied after the table is built, so they are faults.
    bad_lengths: tuple = ()


CASES = [
    SanitizeCase("unsplit", 4, 1, 16, 1, [100, 0, 64, 300], False, num_sm_parts=1),
    SanitizeCase("split", 2, 1, 16, 1, [3000, 129], False, num_sm_parts=8),
    SanitizeCase("causal s_q=2, h_kv=2, fp16", 3, 2, 32, 2, [1, 700, 2100], True, num_sm_parts=6,
                 dtype=np.float16),
    SanitizeCase("two query tiles", 2, 2, 128, 1, [500, 1300], True, num_sm_parts=4),
    SanitizeCase("bad block ids", 3, 1, 16, 1, [300, 1000, 200], False, num_sm_parts=5,
                 bad_blocks=((0, 2, -7), (1, 9, 1 << 20))),
    SanitizeCase("negative and too-long lengths", 3, 2, 16, 1, [300, 300, 900], True,
                 num_sm_parts=5, bad_lengths=((0, -1), (1, 1 << 20))),
]


def build(spec: SanitizeCase, rng):
    case = make_case(rng, batch=spec.batch, seqlen_q=spec.seqlen_q, heads_q=spec.heads_q,
                     heads_kv=spec.heads_kv, lengths=spec.lengths, dtype=spec.dtype,
                     causal=spec.causal)
    for seq, page, block in spec.bad_blocks:
        case.block_table[seq, page] = block
    for seq, length in spec.bad_lengths:
        case.cache_seqlens[seq] = length
    return case


def run_case(spec: SanitizeCase, case, implementation: str):
    rows_per_kv = spec.seqlen_q * spec.heads_q // spec.heads_kv

    @jax.jit
    def decode(q, k_cache, block_table, cache_seqlens):
        metadata, num_splits = jax_flashmla.get_mla_metadata(
            cache_seqlens, rows_per_kv, spec.heads_kv, num_sm_parts=spec.num_sm_parts)
        return jax_flashmla.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, 512, metadata, num_splits,
            softmax_scale=case.softmax_scale, causal=case.causal, implementation=implementation)

    out, lse = decode(*case.args)
    return np.asarray(out), np.asarray(lse)


def available_implementations() -> list[str]:
    names = ["portable"]
    device = jax.devices()[0]
    if jax_flashmla.hopper_kernel_available() and getattr(device, "compute_capability",
                                                           "") == "9.0":
        names.append("hopper")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--implementations", default=None,
                        help="comma-separated kernel families (default: every one this GPU runs)")
    parser.add_argument("--case", action="append", choices=[spec.name for spec in CASES],
                        help="run only this case (repeatable; default: every case). Every case is "
                             "still built, so a case's data does not depend on the selection.")
    args = parser.parse_args()
    if jax.devices()[0].platform != "gpu" or not jax_flashmla.cuda_extension_available():
        print("needs a CUDA GPU and jax_flashmla's compiled extension")
        return 2
    implementations = (args.implementations.split(",") if args.implementations
                       else available_implementations())

    failures = 0
    rng = np.random.default_rng(0)
    for spec in CASES:
        case = build(spec, rng)
        if args.case and spec.name not in args.case:
            continue
        expected = oracle(case)
        for implementation in implementations:
            # The case's name goes out before it runs and its time after, so that a log cut off
            # by a time limit tells a slow case (the sanitizer slows kernels a hundredfold, and
            # the first call of a process also pays its instrumentation of the module) from one
            # that never returned.
            print(f"{implementation:9s} {spec.name:32s} ", end="", flush=True)
            start = time.perf_counter()
            try:
                assert_close(*run_case(spec, case, implementation), *expected, spec.dtype)
                verdict = "ok"
            except AssertionError as error:
                failures += 1
                verdict = "MISMATCH " + str(error).strip().splitlines()[0]
            print(f"{verdict} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"{failures} case(s) mismatched the oracle")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
