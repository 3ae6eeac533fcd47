"""Every trace-time misuse of flash_mla_with_kvcache gets an error naming the argument at fault."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla

BF16 = ml_dtypes.bfloat16


def good_args():
    return dict(
        q=np.zeros((2, 1, 4, 576), BF16),
        k_cache=np.zeros((3, 64, 1, 576), BF16),
        block_table=np.zeros((2, 2), np.int32),
        cache_seqlens=np.zeros(2, np.int32),
        head_dim_v=512,
    )


CASES = [
    ("q rank", dict(q=np.zeros((2, 4, 576), BF16)), ValueError, "q must have shape"),
    ("q dtype", dict(q=np.zeros((2, 1, 4, 576), np.float32)), TypeError,
     "q must be bfloat16 or float16, got float32"),
    ("head dim", dict(q=np.zeros((2, 1, 4, 128), BF16)), ValueError,
     "q's last dimension .* must be 576, got 128"),
    ("cache rank", dict(k_cache=np.zeros((3, 64, 576), BF16)), ValueError, "k_cache must have shape"),
    ("cache dtype", dict(k_cache=np.zeros((3, 64, 1, 576), np.float16)), TypeError,
     "k_cache must have q's dtype bfloat16, got float16"),
    ("page size", dict(k_cache=np.zeros((3, 32, 1, 576), BF16)), ValueError,
     "page size .* must be 64, got 32"),
    ("cache head dim", dict(k_cache=np.zeros((3, 64, 1, 512), BF16)), ValueError,
     "k_cache's last dimension must be 576"),
    ("head grouping", dict(k_cache=np.zeros((3, 64, 3, 576), BF16)), ValueError,
     r"num_heads_q \(4\) must be a multiple of k_cache's num_heads_k \(3\)"),
    ("head_dim_v", dict(head_dim_v=576), ValueError, "head_dim_v must be 512, got 576"),
    ("table dtype", dict(block_table=np.zeros((2, 2), np.int64)), TypeError,
     "block_table must be int32, got int64"),
    ("table batch", dict(block_table=np.zeros((3, 2), np.int32)), ValueError,
     r"block_table must have shape \(2, max_blocks_per_seq\), got \(3, 2\)"),
    ("table width", dict(block_table=np.zeros((2, 0), np.int32)), ValueError,
     "max_blocks_per_seq must be in"),
    ("lengths dtype", dict(cache_seqlens=np.zeros(2, np.float32)), TypeError,
     "cache_seqlens must be int32, got float32"),
    ("lengths batch", dict(cache_seqlens=np.zeros(3, np.int32)), ValueError,
     r"cache_seqlens must have shape \(2,\), got \(3,\)"),
    ("scale zero", dict(softmax_scale=0.0), ValueError, "softmax_scale must be a finite number > 0"),
    ("scale nan", dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite"),
    ("causal type", dict(causal="yes"), TypeError, "causal must be a bool"),
    ("implementation", dict(implementation="triton"), ValueError, "implementation must be one of"),
    ("metadata alone", dict(tile_scheduler_metadata=np.zeros((4, 8), np.int32)), ValueError,
     "pass tile_scheduler_metadata and num_splits together"),
    ("metadata shape", dict(tile_scheduler_metadata=np.zeros((4, 6), np.int32),
                            num_splits=np.zeros(3, np.int32)), ValueError,
     r"tile_scheduler_metadata must have shape \(num_sm_parts, 8\)"),
    ("metadata for another batch", dict(tile_scheduler_metadata=np.zeros((4, 8), np.int32),
                                        num_splits=np.zeros(5, np.int32)), ValueError,
     "num_splits must have shape .3,. .batch \\+ 1; was the metadata made for another batch"),
    ("no query tokens", dict(q=np.zeros((2, 0, 4, 576), BF16)), ValueError,
     "q must have seqlen_q >= 1 and num_heads_q >= 1"),
    ("no heads", dict(q=np.zeros((2, 1, 0, 576), BF16)), ValueError,
     "q must have seqlen_q >= 1 and num_heads_q >= 1"),
    ("batch too large", dict(q=np.zeros((8193, 1, 1, 576), BF16),
                             block_table=np.zeros((8193, 1), np.int32),
                             cache_seqlens=np.zeros(8193, np.int32)), ValueError,
     "batch size must be at most 8192, got 8193"),
    ("empty pool", dict(k_cache=np.zeros((0, 64, 1, 576), BF16)), ValueError,
     "k_cache must hold at least one block"),
    ("table too wide", dict(block_table=np.zeros((2, (1 << 18) + 1), np.int32)), ValueError,
     "max_blocks_per_seq must be in \\[1, 262144\\], got 262145"),
    ("metadata dtype", dict(tile_scheduler_metadata=np.zeros((4, 8), np.int64),
                            num_splits=np.zeros(3, np.int32)), TypeError,
     "tile_scheduler_metadata must be int32, got int64"),
    ("num_splits dtype", dict(tile_scheduler_metadata=np.zeros((4, 8), np.int32),
                              num_splits=np.zeros(3, np.uint32)), TypeError,
     "num_splits must be int32"),
]


@pytest.mark.parametrize("name,changes,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_named_in_the_error(name, changes, error, message):
    args = good_args()
    args.update(changes)
    with pytest.raises(error, match=message):
        jax_flashmla.flash_mla_with_kvcache(**args)


@pytest.mark.parametrize("name,changes,error,message", CASES[:9], ids=[c[0] for c in CASES[:9]])
def test_errors_are_raised_at_trace_time(name, changes, error, message):
    args = good_args()
    args.update(changes)
    arrays = {k: v for k, v in args.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in args.items() if k not in arrays}
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
    with pytest.raises(error, match=message):
        jax.jit(lambda **a: jax_flashmla.flash_mla_with_kvcache(**a, **static)).trace(**specs)


def test_primitive_rechecks_shapes_when_bound_directly():
    # Bypassing the API (as a transformation would) still meets the shape rules.
    from jax_flashmla._decode_op import mla_decode_p
    args = good_args()
    with pytest.raises(ValueError, match="head_dim_v must be 512"):
        jax.eval_shape(lambda q, k, t, l, m, n: mla_decode_p.bind(
            q, k, t, l, m, n, head_dim_v=256, softmax_scale=0.1, causal=False,
            implementation="auto"),
            args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"],
            jnp.zeros((4, 8), jnp.int32), jnp.zeros((3,), jnp.int32))


def test_forcing_a_cuda_kernel_on_cpu_is_an_error():
    args = good_args()
    head_dim_v = args.pop("head_dim_v")
    with pytest.raises(ValueError, match="implementation='portable' names a CUDA kernel.*cpu"):
        jax.jit(lambda **a: jax_flashmla.flash_mla_with_kvcache(
            **a, head_dim_v=head_dim_v, implementation="portable")).trace(**args).lower(
                lowering_platforms=("cpu",))
