"""The checked mode (jax_flashmla/checked.py) names the sequence and table entry behind each fault.

Runs on the reference path (CPU): the checks are plain JAX and do not depend on the kernels.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental import checkify

import jax_flashmla
from jax_flashmla.checked import check_decode_inputs, checked_flash_mla_with_kvcache

NUM_BLOCKS = 8
GARBAGE = [-1, NUM_BLOCKS, 1 << 30, -(1 << 30)]

# One program for every case below (same shapes), so the module compiles it once.
checked_decode = checkify.checkify(jax.jit(
    checked_flash_mla_with_kvcache, static_argnames=("head_dim_v", "softmax_scale", "causal")))


def valid_inputs():
    """Four sequences over an 8-page pool, with garbage wherever a sequence needs no page."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 2, 4, 576)).astype(ml_dtypes.bfloat16)
    k_cache = rng.standard_normal((NUM_BLOCKS, 64, 1, 576)).astype(ml_dtypes.bfloat16)
    # Lengths need 2, 1, 0 and 3 pages of the 3-column table.
    lengths = np.array([128, 1, 0, 150], np.int32)
    table = np.array([[5, 2, GARBAGE[0]],
                      [7, GARBAGE[1], GARBAGE[2]],
                      [GARBAGE[3], GARBAGE[0], GARBAGE[1]],
                      [0, 3, 6]], np.int32)
    return q, k_cache, table, lengths


def error_of(q, k_cache, table, lengths):
    err, _ = checked_decode(q, k_cache, table, lengths, head_dim_v=512, causal=True)
    return err.get()


def test_valid_inputs_with_garbage_in_unused_entries_pass_and_match_the_unchecked_op():
    q, k_cache, table, lengths = valid_inputs()
    err, (out, lse) = checked_decode(q, k_cache, table, lengths, head_dim_v=512, causal=True)
    err.throw()
    want_out, want_lse = jax_flashmla.flash_mla_with_kvcache(q, k_cache, table, lengths, 512,
                                                             causal=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))


def test_negative_length_names_the_sequence():
    q, k_cache, table, lengths = valid_inputs()
    lengths[2] = -5
    message = error_of(q, k_cache, table, lengths)
    assert "sequence 2 has a negative length: cache_seqlens[2] = -5" in message


def test_length_beyond_the_table_capacity_names_the_sequence():
    q, k_cache, table, lengths = valid_inputs()
    lengths[1] = 3 * 64 + 1
    message = error_of(q, k_cache, table, lengths)
    assert ("sequence 1 is longer than the block table can hold: cache_seqlens[1] = 193 > "
            "max_blocks_per_seq * 64 = 192") in message


def test_length_at_the_table_capacity_is_valid():
    q, k_cache, table, lengths = valid_inputs()
    lengths[3] = 3 * 64
    assert error_of(q, k_cache, table, lengths) is None


@pytest.mark.parametrize("block", [-1, NUM_BLOCKS, 1 << 30], ids=["negative", "pool-size", "far"])
def test_needed_entry_outside_the_pool_names_sequence_and_entry(block):
    q, k_cache, table, lengths = valid_inputs()
    table[3, 2] = block
    message = error_of(q, k_cache, table, lengths)
    assert (f"sequence 3 (length 150) needs page 2, but block_table[3, 2] = {block} is outside "
            f"the page pool [0, {NUM_BLOCKS})") in message


def test_a_partial_last_page_is_needed():
    # 129 tokens spill one token onto page 2, whose entry holds garbage.
    q, k_cache, table, lengths = valid_inputs()
    lengths[0] = 129
    message = error_of(q, k_cache, table, lengths)
    assert f"block_table[0, 2] = {GARBAGE[0]} is outside" in message


def test_the_first_faulty_sequence_is_reported():
    q, k_cache, table, lengths = valid_inputs()
    table[1, 0] = -3
    table[3, 0] = -4
    assert "block_table[1, 0] = -3" in error_of(q, k_cache, table, lengths)


def test_lengths_are_reported_before_pages_and_a_bad_length_adds_no_page_error():
    q, k_cache, table, lengths = valid_inputs()
    table[0, 0] = -1
    lengths[3] = 10_000  # clamped to the table for the page check: its pages are all valid
    message = error_of(q, k_cache, table, lengths)
    assert "sequence 3 is longer than the block table can hold" in message


def test_works_with_checkify_inside_jit_and_with_a_given_schedule():
    q, k_cache, table, lengths = valid_inputs()
    table[0, 1] = NUM_BLOCKS + 4

    @jax.jit
    @checkify.checkify
    def step(q, k_cache, table, lengths):
        metadata, splits = jax_flashmla.get_mla_metadata(lengths, 2 * 4, 1)
        return checked_flash_mla_with_kvcache(q, k_cache, table, lengths, 512, metadata, splits)

    err, _ = step(q, k_cache, table, lengths)
    with pytest.raises(checkify.JaxRuntimeError, match=r"block_table\[0, 1\] = 12 is outside"):
        err.throw()


def test_check_decode_inputs_alone_in_a_user_step():
    _, _, table, lengths = valid_inputs()
    lengths[0] = -1
    checked = checkify.checkify(jax.jit(lambda t, l: check_decode_inputs(t, l, NUM_BLOCKS)))
    err, _ = checked(table, lengths)
    assert "sequence 0 has a negative length" in err.get()
    err, _ = checked(*valid_inputs()[2:])
    err.throw()


def test_eager_call_raises_at_once():
    q, k_cache, table, lengths = valid_inputs()
    lengths[1] = -2
    with pytest.raises(checkify.JaxRuntimeError, match="sequence 1 has a negative length"):
        checked_flash_mla_with_kvcache(q, k_cache, table, lengths, 512)


def test_staging_without_checkify_is_refused():
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(checked_flash_mla_with_kvcache, static_argnums=4)(*valid_inputs(), 512)


def test_empty_batch_has_nothing_to_check():
    err, (out, lse) = checkify.checkify(checked_flash_mla_with_kvcache)(
        jnp.zeros((0, 1, 4, 576), jnp.bfloat16), jnp.zeros((2, 64, 1, 576), jnp.bfloat16),
        jnp.zeros((0, 3), jnp.int32), jnp.zeros((0,), jnp.int32), 512)
    err.throw()
    assert out.shape == (0, 1, 4, 512) and lse.shape == (0, 4, 1)
