"""The tile-scheduler primitive: abstract evaluation, lowerings and batching, side by side.

On CUDA it lowers to the device-side scheduler kernel (no host round trip, so it stays jittable
and graph-capturable); elsewhere to the identical pure-JAX loop in _reference.py. Sharded inputs
are simply replicated: the op is tiny and its output is consumed whole by every shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_flashmla import _extension
from jax_flashmla._constants import SCHEDULER_FIELDS
from jax_flashmla._reference import tile_scheduler_reference
from jax_flashmla._validation import check_batch, check_int32_vector

mla_metadata_p = Primitive("jax_flashmla_mla_metadata")
mla_metadata_p.multiple_results = True


def _abstract_eval(cache_seqlens, *, num_sm_parts: int):
    check_int32_vector("cache_seqlens", cache_seqlens.shape, cache_seqlens.dtype)
    check_batch("cache_seqlens", cache_seqlens.shape[0])
    batch = cache_seqlens.shape[0]
    return (jax.core.ShapedArray((num_sm_parts, SCHEDULER_FIELDS), jnp.int32),
            jax.core.ShapedArray((batch + 1,), jnp.int32))


def _reference_impl(cache_seqlens, *, num_sm_parts: int):
    return tile_scheduler_reference(cache_seqlens, num_sm_parts)


def _cuda_impl(cache_seqlens, *, num_sm_parts: int):
    batch = cache_seqlens.shape[0]
    return jax.ffi.ffi_call(
        _extension.METADATA_TARGET,
        (jax.ShapeDtypeStruct((num_sm_parts, SCHEDULER_FIELDS), jnp.int32),
         jax.ShapeDtypeStruct((batch + 1,), jnp.int32)),
    )(cache_seqlens)


def _cuda_lowering(ctx, cache_seqlens, *, num_sm_parts: int):
    # Without the extension the pure-JAX scheduler runs on the GPU too; the decode itself is what
    # refuses to run without the kernels.
    impl = _cuda_impl if _extension.cuda_extension_available() else _reference_impl
    return mlir.lower_fun(impl, multiple_results=True)(ctx, cache_seqlens,
                                                       num_sm_parts=num_sm_parts)


def _batching_rule(args, dims, *, num_sm_parts: int):
    (cache_seqlens,), (dim,) = args, dims
    stacked = jnp.moveaxis(cache_seqlens, dim, 0)
    # One schedule per mapped instance; a loop keeps each one exactly what an unmapped call gives.
    metadata, num_splits = jax.lax.map(
        lambda lengths: tuple(mla_metadata_p.bind(lengths, num_sm_parts=num_sm_parts)), stacked)
    return (metadata, num_splits), (0, 0)


mla_metadata_p.def_impl(functools.partial(dispatch.apply_primitive, mla_metadata_p))
mla_metadata_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(mla_metadata_p,
                       mlir.lower_fun(_reference_impl, multiple_results=True))
mlir.register_lowering(mla_metadata_p, _cuda_lowering, platform="cuda")
batching.primitive_batchers[mla_metadata_p] = _batching_rule
