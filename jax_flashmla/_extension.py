"""Finds the compiled CUDA extension, checks it against the running jaxlib, registers its targets,
and answers what the build contains (the Hopper kernel, the schedule it would pick).

The extension is optional: without it the package still works on the reference path. When it is
present but was built against a newer jaxlib than the one running, XLA would fail later with an
obscure "no registered implementation"; we refuse at import instead, with the fix.
"""

from __future__ import annotations

import os
import warnings

import jax
import jaxlib

METADATA_TARGET = "jax_flashmla_mla_metadata_v1"
DECODE_TARGET = "jax_flashmla_mla_decode_v1"

BUILD_HINT = (
    "Build it on a machine with the CUDA toolkit (nvcc 12.4+): `pip install --no-build-isolation "
    ". ` from a checkout of jax_flashmla, with jax and jaxlib already installed. To run on the "
    "pure-JAX reference path instead, pass implementation='reference'.")

try:
    from jax_flashmla import _jax_flashmla_cuda as _cuda
except ImportError:  # installed without a CUDA compiler, or with the build switched off
    _cuda = None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_jaxlib_compatibility(built_with: str, running: str) -> None:
    """Raises ImportError unless ``running`` jaxlib can load handlers built against ``built_with``."""
    if _version_tuple(running) < _version_tuple(built_with):
        raise ImportError(
            f"jax_flashmla's CUDA extension was built against jaxlib {built_with}, but jaxlib "
            f"{running} is running. XLA's FFI is only forward compatible: rebuild jax_flashmla "
            f"against jaxlib {running} (or older), or upgrade jaxlib. {BUILD_HINT}")


def cuda_extension_available() -> bool:
    """Whether the compiled CUDA kernels are installed (they still need a GPU to run)."""
    return _cuda is not None


def hopper_kernel_available() -> bool:
    """Whether the installed extension contains the sm_90a (Hopper) kernel."""
    return _cuda is not None and bool(_cuda.hopper_kernel_available())


# Forces one of the Hopper kernel's schedules ("split" or "seesaw"), for kernel work; read by the
# extension whenever a call is launched.
SCHEDULE_VARIABLE = "JAX_FLASHMLA_HOPPER_SCHEDULE"


def hopper_schedule(batch: int, rows_per_kv: int, max_pages_per_seq: int, num_pages: int,
                    num_sm_parts: int) -> str | None:
    """The schedule the Hopper kernel picks for a call: "split" or "seesaw", after any
    JAX_FLASHMLA_HOPPER_SCHEDULE override; None without the Hopper kernel.

    The call is described by its batch size, query rows per KV head (s_q * h_q / h_kv), the block
    table's second dimension, the pool's page count and the scheduler metadata's partition count
    (``metadata.shape[0]``). Warns about a value of that variable the kernel ignores."""
    if not hopper_kernel_available():
        return None
    forced = os.environ.get(SCHEDULE_VARIABLE)
    if forced is not None and forced not in ("split", "seesaw"):
        warnings.warn(f"{SCHEDULE_VARIABLE}={forced!r} is ignored: the Hopper kernel takes "
                      "'split' or 'seesaw' and otherwise chooses by shape", stacklevel=2)
    return str(_cuda.hopper_schedule(batch, rows_per_kv, max_pages_per_seq, num_pages,
                                     num_sm_parts))


def missing_extension_message() -> str:
    return ("jax_flashmla was installed without its CUDA extension, so its kernels cannot run "
            f"on this GPU. {BUILD_HINT}")


def _register_targets() -> None:
    check_jaxlib_compatibility(_cuda.built_with_jaxlib, jaxlib.__version__)
    for name, capsule in _cuda.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


if _cuda is not None:
    _register_targets()
