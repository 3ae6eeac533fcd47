"""Accuracy of every available implementation against a float64 NumPy oracle, as a table.

The tests say whether outputs are within tolerance; this says by how much, so a kernel change that
costs accuracy shows up as a number before it shows up as a failure. The oracle is tests/
mla_cases.py's, straight from the definition in float64.

    python tools/accuracy.py [--markdown FILE] [--seed N] [--implementations reference,portable]
                             [--pool-scale S]

--pool-scale multiplies the cache by S, which multiplies every score by S: a peakier softmax, where
the rounding of P to 16 bits shows most (S = 3 is the hardest layer of the GPU suite's scan test).
To compare the Hopper kernel's two schedules, run it once per JAX_FLASHMLA_HOPPER_SCHEDULE value.

Metrics, per (dtype, implementation, shape):

* out rel err: |out - oracle| / max|oracle| over the same row, a row being the 512 output values of
  one (sequence, query token, head). Normalising by the row's peak rather than element by element
  keeps near-zero elements from dominating; the table shows the max and the mean over all elements.
* lse abs err: max |lse - oracle lse| (natural log).
* non-finite: elements whose NaN/inf status differs from the oracle's (0 expected).

The "oracle in <dtype>" rows are the oracle rounded to the output dtype: the floor that no
implementation returning that dtype can beat.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import jax
import ml_dtypes
import numpy as np

import jax_flashmla

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from mla_cases import make_case, oracle  # noqa: E402  (needs the path above)

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}
BATCH = 8
SHAPES = [(seqlen_q, heads_q) for seqlen_q in (1, 2) for heads_q in (16, 128)]
LENGTH_RANGE = (1000, 4000)
ORACLE_ROUNDED = "oracle in dtype"


def available_implementations() -> list[str]:
    names = ["reference"]
    device = jax.devices()[0]
    if device.platform == "gpu" and jax_flashmla.cuda_extension_available():
        names.append("portable")
        if (jax_flashmla.hopper_kernel_available()
                and getattr(device, "compute_capability", "") == "9.0"):
            names.append("hopper")
    return names


def decode(case, implementation):
    fn = jax.jit(lambda q, k, t, l: jax_flashmla.flash_mla_with_kvcache(
        q, k, t, l, 512, softmax_scale=case.softmax_scale, causal=case.causal,
        implementation=implementation))
    out, lse = fn(*case.args)
    return np.asarray(out).astype(np.float64), np.asarray(lse).astype(np.float64)


def errors(out, lse, want_out, want_lse):
    """(max rel err of out, mean rel err of out, max abs err of lse, non-finite mismatches)."""
    mismatched = int(np.sum(np.isfinite(out) != np.isfinite(want_out))
                     + np.sum(np.isfinite(lse) != np.isfinite(want_lse)))
    finite = np.isfinite(want_out) & np.isfinite(out)
    row_peak = np.max(np.abs(np.where(finite, want_out, 0.0)), axis=-1, keepdims=True)
    relative = np.abs(out - want_out) / np.where(row_peak > 0, row_peak, 1.0)
    relative = relative[finite]
    finite_lse = np.isfinite(want_lse) & np.isfinite(lse)
    lse_error = np.abs(lse - want_lse)[finite_lse]
    return (float(relative.max(initial=0.0)), float(relative.mean()) if relative.size else 0.0,
            float(lse_error.max(initial=0.0)), mismatched)


def measure(implementations, seed, pool_scale=1.0):
    rng = np.random.default_rng(seed)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for seqlen_q, heads_q in SHAPES:
            lengths = rng.integers(LENGTH_RANGE[0], LENGTH_RANGE[1] + 1, BATCH)
            case = make_case(rng, batch=BATCH, seqlen_q=seqlen_q, heads_q=heads_q,
                             lengths=lengths, dtype=dtype, causal=True)
            case.k_cache = (case.k_cache.astype(np.float32) * pool_scale).astype(dtype)
            want_out, want_lse = oracle(case)
            shape = f"b={BATCH} s_q={seqlen_q} h_q={heads_q} h_kv=1 causal"
            results = {ORACLE_ROUNDED: (want_out.astype(dtype).astype(np.float64), want_lse)}
            for implementation in implementations:
                results[implementation] = decode(case, implementation)
            for name, (out, lse) in results.items():
                rows.append((dtype_name, name, shape, *errors(out, lse, want_out, want_lse)))
    return rows


def table(rows) -> str:
    header = ("| dtype | implementation | shape | out max rel err | out mean rel err "
              "| lse max abs err | non-finite |\n|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {dtype} | {name} | {shape} | {max_rel:.2e} | {mean_rel:.2e} | "
                   f"{lse_err:.2e} | {mismatched} |\n"
                   for dtype, name, shape, max_rel, mean_rel, lse_err, mismatched in rows)
    return header + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=pathlib.Path, help="append the table to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-scale", type=float, default=1.0,
                        help="multiply the cache (and so every score) by this (default 1)")
    parser.add_argument("--implementations", default=None,
                        help="comma-separated (default: reference, and the kernels this GPU runs)")
    args = parser.parse_args()
    implementations = (args.implementations.split(",") if args.implementations
                       else available_implementations())

    device = jax.devices()[0]
    title = (f"## Accuracy vs float64 oracle ({datetime.date.today()}, "
             f"{getattr(device, 'device_kind', device.platform)}, jax {jax.__version__}, "
             f"seed {args.seed})\n\n"
             f"Lengths uniform in [{LENGTH_RANGE[0]}, {LENGTH_RANGE[1]}], cache scaled by "
             f"{args.pool_scale:g}. out rel err = "
             "|out - oracle| / max |oracle| of the same 512-value row (one sequence, query token "
             "and head); lse err is absolute (natural log); non-finite counts elements whose "
             "NaN/inf status differs from the oracle's. 'oracle in dtype' is the oracle rounded "
             "to the output dtype, the best any implementation can do.\n\n")
    report = title + table(measure(implementations, args.seed, args.pool_scale))
    print(report)
    if args.markdown:
        with args.markdown.open("a") as file:
            file.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
