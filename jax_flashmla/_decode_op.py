"""The paged MLA decode primitive: abstract evaluation, lowerings, batching and partitioning.

Two primitives, because custom_partitioning has no batching rule:

* ``mla_decode_p`` (outer) is what the API binds. Its batching rule folds a mapped axis into the
  batch; its lowering runs the op through ``custom_partitioning`` when the program is partitioned
  over several devices (so batch- or head-sharded inputs run sharded without gathering the page
  pool), and binds the inner primitive directly otherwise (one device, inside shard_map, and in
  ``jax.export``, which cannot serialize custom_partitioning).
* ``_mla_decode_kernel_p`` (inner) lowers to our CUDA kernels through an XLA FFI custom call on
  CUDA, and to the pure-JAX reference on every other platform.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch
from jax._src import sharding_impls
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_flashmla import _extension
from jax_flashmla._constants import HEAD_DIM_V
from jax_flashmla._metadata_op import mla_metadata_p
from jax_flashmla._reference import mla_decode_reference
from jax_flashmla._validation import check_decode_args

# The FFI target's "kernel" attribute.
_KERNEL_CHOICE = {"auto": 0, "portable": 1, "hopper": 2}


def _output_avals(q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, head_dim_v,
                  softmax_scale, causal, implementation):
    check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits,
                      softmax_scale, causal, implementation)
    batch, seqlen_q, heads_q, _ = q.shape
    return (jax.core.ShapedArray((batch, seqlen_q, heads_q, head_dim_v), q.dtype),
            jax.core.ShapedArray((batch, heads_q, seqlen_q), jnp.float32))


# --- inner primitive: the kernel call ---------------------------------------------------------

_mla_decode_kernel_p = Primitive("jax_flashmla_mla_decode_kernel")
_mla_decode_kernel_p.multiple_results = True
_mla_decode_kernel_p.def_abstract_eval(_output_avals)
_mla_decode_kernel_p.def_impl(functools.partial(dispatch.apply_primitive, _mla_decode_kernel_p))


def _reference_impl(q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, head_dim_v,
                    softmax_scale, causal, implementation):
    del metadata, num_splits, implementation  # the reference needs no schedule
    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                softmax_scale, causal)


def _ffi_impl(q, k_cache, block_table, cache_seqlens, metadata, num_splits, *, head_dim_v,
              softmax_scale, causal, implementation):
    batch, seqlen_q, heads_q, _ = q.shape
    heads_k = k_cache.shape[2]
    rows_per_kv = seqlen_q * (heads_q // heads_k)
    num_slots = batch + metadata.shape[0]
    out, lse, _, _ = jax.ffi.ffi_call(
        _extension.DECODE_TARGET,
        (jax.ShapeDtypeStruct((batch, seqlen_q, heads_q, head_dim_v), q.dtype),
         jax.ShapeDtypeStruct((batch, heads_q, seqlen_q), jnp.float32),
         # Split-KV workspace: partial outputs and lse of sequences cut across partitions.
         jax.ShapeDtypeStruct((num_slots, heads_k, rows_per_kv, HEAD_DIM_V), jnp.float32),
         jax.ShapeDtypeStruct((num_slots, heads_k, rows_per_kv), jnp.float32)),
    )(q, k_cache, block_table, cache_seqlens, metadata, num_splits,
      softmax_scale=np.float32(softmax_scale), causal=bool(causal),
      kernel=np.int64(_KERNEL_CHOICE[implementation]))
    return out, lse


def _cuda_lowering(ctx, *args, implementation, **params):
    if implementation == "reference":
        impl = _reference_impl
    elif _extension.cuda_extension_available():
        impl = _ffi_impl
    else:
        raise RuntimeError(_extension.missing_extension_message())
    return mlir.lower_fun(impl, multiple_results=True)(ctx, *args, implementation=implementation,
                                                       **params)


def _default_lowering(ctx, *args, implementation, **params):
    if implementation in ("portable", "hopper"):
        platforms = ", ".join(ctx.module_context.platforms)
        raise ValueError(f"implementation={implementation!r} names a CUDA kernel, but this program "
                         f"is lowered for {platforms}; use 'auto' or 'reference' there")
    return mlir.lower_fun(_reference_impl, multiple_results=True)(
        ctx, *args, implementation=implementation, **params)


mlir.register_lowering(_mla_decode_kernel_p, _default_lowering)
mlir.register_lowering(_mla_decode_kernel_p, _cuda_lowering, platform="cuda")


# --- partitioning ---------------------------------------------------------------------------------

_STATIC_PARAMS = ("head_dim_v", "softmax_scale", "causal", "implementation")


def _local_decode(q, k_cache, block_table, cache_seqlens, metadata, num_splits, head_dim_v,
                  softmax_scale, causal, implementation):
    return tuple(_mla_decode_kernel_p.bind(
        q, k_cache, block_table, cache_seqlens, metadata, num_splits, head_dim_v=head_dim_v,
        softmax_scale=softmax_scale, causal=causal, implementation=implementation))


def _sharded_axes(q_sharding, heads_k):
    """Mesh axes of q's batch and head dimensions that the op keeps sharded."""
    spec = tuple(q_sharding.spec) + (None,) * 4
    batch_axes, head_axes = spec[0], spec[2]
    # Heads may be split only when every shard keeps whole KV-head groups; with one KV head any
    # split does. Splitting the KV heads of the pool itself is left to shard_map.
    if heads_k != 1:
        head_axes = None
    return batch_axes, head_axes


def _shardings(mesh, batch_axes, head_axes):
    replicated = NamedSharding(mesh, P())
    args = (NamedSharding(mesh, P(batch_axes, None, head_axes, None)),  # q
            replicated,                                                 # k_cache (page pool)
            NamedSharding(mesh, P(batch_axes, None)),                   # block_table
            NamedSharding(mesh, P(batch_axes)),                         # cache_seqlens
            replicated, replicated)                                     # metadata, num_splits
    results = (NamedSharding(mesh, P(batch_axes, None, head_axes, None)),
               NamedSharding(mesh, P(batch_axes, head_axes, None)))
    return args, results


def _infer_sharding(head_dim_v, softmax_scale, causal, implementation, mesh, arg_shapes,
                    result_shape):
    del head_dim_v, softmax_scale, causal, implementation, result_shape
    q, k_cache = arg_shapes[0], arg_shapes[1]
    batch_axes, head_axes = _sharded_axes(q.sharding, k_cache.shape[2])
    return _shardings(mesh, batch_axes, head_axes)[1]


def _partition(head_dim_v, softmax_scale, causal, implementation, mesh, arg_shapes, result_shape):
    del result_shape
    q, k_cache, metadata = arg_shapes[0], arg_shapes[1], arg_shapes[4]
    heads_k = k_cache.shape[2]
    batch_axes, head_axes = _sharded_axes(q.sharding, heads_k)
    arg_shardings, result_shardings = _shardings(mesh, batch_axes, head_axes)
    num_sm_parts = metadata.shape[0]

    def lower(q, k_cache, block_table, cache_seqlens, metadata, num_splits):
        if batch_axes is not None:
            # The step's metadata describes the global batch; each shard schedules its own.
            metadata, num_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=num_sm_parts)
        return _local_decode(q, k_cache, block_table, cache_seqlens, metadata, num_splits,
                             head_dim_v, softmax_scale, causal, implementation)

    return mesh, lower, result_shardings, arg_shardings


_partitioned_decode = custom_partitioning(_local_decode, static_argnums=(6, 7, 8, 9))
_partitioned_decode.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer_sharding,
    # b: batch, s: query tokens, h: query heads. Everything else must stay replicated: the page
    # pool and the schedule are read whole by every shard.
    sharding_rule="b s h d, n p g e, b m, b, t f, c -> b s h v, b h s",
    need_replication_factors=("s", "d", "n", "p", "g", "e", "m", "t", "f", "c", "v"),
)


def _is_partitioned(ctx) -> bool:
    axis_context = ctx.module_context.axis_context
    return (isinstance(axis_context, sharding_impls.ShardingContext)
            and axis_context.num_devices > 1)


# --- outer primitive: what the API binds ---------------------------------------------------------

mla_decode_p = Primitive("jax_flashmla_mla_decode")
mla_decode_p.multiple_results = True
mla_decode_p.def_abstract_eval(_output_avals)
mla_decode_p.def_impl(functools.partial(dispatch.apply_primitive, mla_decode_p))


def _outer_lowering(ctx, *args, **params):
    decode = _partitioned_decode if _is_partitioned(ctx) else _local_decode
    static = [params[name] for name in _STATIC_PARAMS]
    return mlir.lower_fun(lambda *arrays: decode(*arrays, *static),
                          multiple_results=True)(ctx, *args)


# custom_partitioning needs the device assignment while lowering; JAX only keeps it for primitives
# that say so, and cached lowerings would drop it again.
mlir.register_lowering(mla_decode_p, _outer_lowering, cacheable=False)
dispatch.prim_requires_devices_during_lowering.add(mla_decode_p)


def _fold_pools(k_cache, block_table, num_instances):
    """Stacks per-instance page pools into one and rebases each instance's block ids onto it."""
    pool_blocks = k_cache.shape[1]
    pool = k_cache.reshape((num_instances * pool_blocks,) + k_cache.shape[2:])
    valid = (block_table >= 0) & (block_table < pool_blocks)
    offsets = (jnp.arange(num_instances, dtype=jnp.int32) * pool_blocks)[:, None, None]
    # Invalid ids must stay invalid, not land in a neighbour's pool.
    return pool, jnp.where(valid, block_table + offsets, -1)


def _batching_rule(args, dims, **params):
    q, k_cache, block_table, cache_seqlens, metadata, _ = args
    q_dim, k_dim, table_dim, lens_dim = dims[:4]
    num_instances = next(arg.shape[dim] for arg, dim in zip(args, dims)
                         if dim is not None)

    def stacked(value, dim):
        if dim is None:
            return jnp.broadcast_to(value, (num_instances,) + value.shape)
        return jnp.moveaxis(value, dim, 0)

    q = stacked(q, q_dim)
    block_table = stacked(block_table, table_dim)
    cache_seqlens = stacked(cache_seqlens, lens_dim)
    if k_dim is not None:
        k_cache, block_table = _fold_pools(jnp.moveaxis(k_cache, k_dim, 0), block_table,
                                           num_instances)

    batch = q.shape[1]
    folded_q = q.reshape((num_instances * batch,) + q.shape[2:])
    folded_table = block_table.reshape((num_instances * batch, block_table.shape[2]))
    folded_lens = cache_seqlens.reshape(num_instances * batch)
    # The given schedule belongs to one instance's batch; the folded batch needs its own.
    num_sm_parts = metadata.shape[-2]
    folded_metadata, folded_splits = mla_metadata_p.bind(folded_lens, num_sm_parts=num_sm_parts)
    out, lse = mla_decode_p.bind(folded_q, k_cache, folded_table, folded_lens, folded_metadata,
                                 folded_splits, **params)
    out = out.reshape((num_instances, batch) + out.shape[1:])
    lse = lse.reshape((num_instances, batch) + lse.shape[1:])
    return (out, lse), (0, 0)


batching.primitive_batchers[mla_decode_p] = _batching_rule
