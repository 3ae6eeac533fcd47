"""A DeepSeek-V3-style MLA attention stack decoding from a paged cache with jax_flashmla.

What it shows, end to end:

* Weight absorption. MLA caches one 512-wide latent per token (plus a 64-wide RoPE key) instead
  of per-head keys and values. At decode time the per-head key up-projection W_UK is folded into
  the query (``q_latent = q_nope @ W_UK``) and the value up-projection W_UV is applied after
  attention, so every head attends directly over the cached 576-wide rows: exactly the
  ``flash_mla_with_kvcache`` problem, with one KV head shared by all query heads.
* The paged cache: a host :class:`~jax_flashmla.paged_cache.PageAllocator` hands out pages,
  ``write_kv`` puts each step's new rows into them, and all layers share one pool array (layer
  ``l`` owns block ids ``l * blocks_per_layer + id``) so the ``lax.scan`` over layers carries a
  single buffer that every layer updates in place.
* One ``get_mla_metadata`` per step, reused by every layer.
* A variable-length batch: prompts of different lengths prefilled in one left-padded call, then
  greedy decoding token by token.

The same model is written a second time the textbook way — float32, keys and values expanded per
head from a contiguous (unpaged) latent cache, plain einsum attention — and the bfloat16 paged
model must agree with it. Only the attention half of each block is modelled: the MLP / MoE half
never touches the cache.

    python examples/deepseek_mla_decode.py                   # tiny config on CPU, V3 dims on GPU
    python examples/deepseek_mla_decode.py --config tiny --steps 16
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_flashmla import flash_mla_with_kvcache, get_mla_metadata
from jax_flashmla.paged_cache import PageAllocator, layer_block_table, write_kv

PAGE_SIZE = 64
LATENT_DIM = 512  # kv_lora_rank: the cached latent, which is also V
ROPE_DIM = 64     # qk_rope_head_dim: the decoupled RoPE key, shared by all heads


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int
    qk_nope_head_dim: int
    v_head_dim: int
    num_layers: int
    vocab_size: int
    kv_lora_rank: int = LATENT_DIM
    qk_rope_head_dim: int = ROPE_DIM
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        # The decode op's rows are 512 latent + 64 RoPE values: those two are not free choices.
        if (self.kv_lora_rank, self.qk_rope_head_dim) != (LATENT_DIM, ROPE_DIM):
            raise ValueError(f"kv_lora_rank and qk_rope_head_dim must be {LATENT_DIM} and "
                             f"{ROPE_DIM} (the 576-wide cached row), got {self.kv_lora_rank} "
                             f"and {self.qk_rope_head_dim}")

    @property
    def softmax_scale(self) -> float:
        # DeepSeek scales by the un-absorbed query/key head dim, not by the 576 the op sees.
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5


DEEPSEEK_V3 = MLAConfig(hidden_size=7168, num_heads=128, q_lora_rank=1536, qk_nope_head_dim=128,
                        v_head_dim=128, num_layers=61, vocab_size=129280)
TINY = MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=32, qk_nope_head_dim=16,
                 v_head_dim=16, num_layers=2, vocab_size=256)
CONFIGS = {"tiny": TINY, "deepseek-v3": DEEPSEEK_V3}


class LayerWeights(NamedTuple):
    """One attention block's weights; in :class:`Params` each has a leading layer axis."""

    attn_norm: jax.Array  # [hidden]
    w_dq: jax.Array       # [hidden, q_lora]              query down-projection
    q_norm: jax.Array     # [q_lora]
    w_uq: jax.Array       # [q_lora, heads, nope + rope]  query up-projection
    w_dkv: jax.Array      # [hidden, 512 + 64]            latent and RoPE key down-projection
    kv_norm: jax.Array    # [512]
    w_uk: jax.Array       # [heads, nope, 512]            key up-projection (absorbed into q)
    w_uv: jax.Array       # [heads, 512, v_head]          value up-projection (after attention)
    w_o: jax.Array        # [heads, v_head, hidden]


class Params(NamedTuple):
    embed: jax.Array      # [vocab, hidden]; also the (tied) output head
    layers: LayerWeights  # stacked: [num_layers, ...]
    final_norm: jax.Array  # [hidden]


def init_params(key: jax.Array, config: MLAConfig, dtype=jnp.bfloat16) -> Params:
    """Random weights scaled by fan-in, so activations stay near unit size through the stack."""
    c, n = config, config.num_layers
    shapes = LayerWeights(
        attn_norm=(n, c.hidden_size), w_dq=(n, c.hidden_size, c.q_lora_rank),
        q_norm=(n, c.q_lora_rank),
        w_uq=(n, c.q_lora_rank, c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim),
        w_dkv=(n, c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim),
        kv_norm=(n, c.kv_lora_rank), w_uk=(n, c.num_heads, c.qk_nope_head_dim, c.kv_lora_rank),
        w_uv=(n, c.num_heads, c.kv_lora_rank, c.v_head_dim),
        w_o=(n, c.num_heads, c.v_head_dim, c.hidden_size))
    fan_in = LayerWeights(attn_norm=None, w_dq=c.hidden_size, q_norm=None, w_uq=c.q_lora_rank,
                          w_dkv=c.hidden_size, kv_norm=None, w_uk=c.qk_nope_head_dim,
                          w_uv=c.kv_lora_rank, w_o=c.num_heads * c.v_head_dim)
    keys = jax.random.split(key, len(shapes) + 1)
    layers = LayerWeights(*[
        jnp.ones(shape, dtype) if fan is None
        else (jax.random.normal(k, shape, jnp.float32) * fan ** -0.5).astype(dtype)
        for k, shape, fan in zip(keys[1:], shapes, fan_in)])
    embed = jax.random.normal(keys[0], (c.vocab_size, c.hidden_size), jnp.float32).astype(dtype)
    return Params(embed, layers, jnp.ones((c.hidden_size,), dtype))


# --- pieces both models share -----------------------------------------------------------------

def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x, positions, theta):
    """Rotary embedding (rotate-half form) of x[..., 64] at integer positions [b, s]."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * frequencies           # [b, s, half]
    if x.ndim == 4:                                                            # [b, s, heads, 64]
        angles = angles[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def project(weights: LayerWeights, x, positions, config: MLAConfig):
    """The block's projections up to attention: (q_nope, q_rope, latent, k_rope), RoPE applied."""
    c = config
    q_compressed = rms_norm(x @ weights.w_dq, weights.q_norm, c.norm_eps)
    q = jnp.einsum("bsr,rhd->bshd", q_compressed, weights.w_uq)
    q_nope, q_rope = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    compressed_kv = x @ weights.w_dkv
    latent = rms_norm(compressed_kv[..., :LATENT_DIM], weights.kv_norm, c.norm_eps)
    k_rope = compressed_kv[..., LATENT_DIM:]
    return (q_nope, apply_rope(q_rope, positions, c.rope_theta), latent,
            apply_rope(k_rope, positions, c.rope_theta))


def logits_of(params: Params, hidden):
    return jnp.einsum("bd,vd->bv", hidden.astype(jnp.float32), params.embed.astype(jnp.float32))


# --- the paged model (what a server runs) --------------------------------------------------------

def paged_step(params: Params, pool, block_table, write_start, tokens, *, config: MLAConfig,
               blocks_per_layer: int):
    """Runs ``tokens [b, s]`` through every layer, caching them; returns (hidden [b, s], pool).

    ``write_start[i]`` is the position of sequence i's first new token (its length before the
    step); a left-padded prefill passes ``prompt_length - s``, and padding rows are dropped by
    ``write_kv``. ``pool`` is ``[num_layers * blocks_per_layer, 64, 1, 576]``.
    """
    s = tokens.shape[1]
    lengths = write_start + s
    positions = write_start[:, None] + jnp.arange(s, dtype=jnp.int32)
    # One schedule for the step: every layer attends over the same lengths.
    metadata, num_splits = get_mla_metadata(lengths, s * config.num_heads, 1)

    def layer(carry, weights: LayerWeights):
        x, pool, index = carry
        table = layer_block_table(block_table, index, blocks_per_layer)
        q_nope, q_rope, latent, k_rope = project(
            weights, rms_norm(x, weights.attn_norm, config.norm_eps), positions, config)
        q_latent = jnp.einsum("bshn,hnc->bshc", q_nope, weights.w_uk)         # absorb W_UK
        q = jnp.concatenate([q_latent, q_rope], axis=-1).astype(pool.dtype)   # [b, s, h, 576]
        new_rows = jnp.concatenate([latent, k_rope], axis=-1)[:, :, None, :].astype(pool.dtype)
        pool = write_kv(pool, table, write_start, new_rows)
        out_latent, _ = flash_mla_with_kvcache(q, pool, table, lengths, LATENT_DIM, metadata,
                                               num_splits, config.softmax_scale, causal=True)
        values = jnp.einsum("bshc,hcv->bshv", out_latent, weights.w_uv)        # apply W_UV
        x = x + jnp.einsum("bshv,hvd->bsd", values, weights.w_o).astype(x.dtype)
        return (x, pool, index + 1), None

    x = params.embed[tokens]
    (x, pool, _), _ = lax.scan(layer, (x, pool, jnp.int32(0)), params.layers)
    return rms_norm(x, params.final_norm, config.norm_eps), pool


def new_pool(config: MLAConfig, blocks_per_layer: int, dtype=jnp.bfloat16):
    return jnp.zeros((config.num_layers * blocks_per_layer, PAGE_SIZE, 1, LATENT_DIM + ROPE_DIM),
                     dtype)


# --- the reference model (textbook MLA, float32, contiguous cache) -------------------------------

def reference_step(params: Params, caches, block_table, write_start, tokens, *,
                   config: MLAConfig):
    """``paged_step`` without absorption or paging: caches ``[layers, b, max_len, 576]`` float32.

    Takes (and ignores) a block table only to share ``paged_step``'s signature.
    """
    del block_table
    c = config
    batch, s = tokens.shape
    max_len = caches.shape[2]
    positions = write_start[:, None] + jnp.arange(s, dtype=jnp.int32)            # [b, s]
    key_positions = jnp.arange(max_len, dtype=jnp.int32)
    visible = key_positions[None, None, :] <= positions[:, :, None]               # [b, s, T]
    rows = jnp.arange(batch)[:, None]
    # Negative positions (left padding) must be dropped, not wrapped to the end.
    write_positions = jnp.where(positions >= 0, positions, max_len)

    def layer(x, weights_and_cache):
        weights, cache = weights_and_cache
        q_nope, q_rope, latent, k_rope = project(
            weights, rms_norm(x, weights.attn_norm, c.norm_eps), positions, c)
        cache = cache.at[rows, write_positions].set(
            jnp.concatenate([latent, k_rope], axis=-1), mode="drop")
        cached_latent, cached_rope = cache[..., :LATENT_DIM], cache[..., LATENT_DIM:]
        keys = jnp.einsum("btc,hnc->bthn", cached_latent, weights.w_uk)
        values = jnp.einsum("btc,hcv->bthv", cached_latent, weights.w_uv)
        scores = (jnp.einsum("bshn,bthn->bhst", q_nope, keys)
                  + jnp.einsum("bshr,btr->bhst", q_rope, cached_rope))
        scores = jnp.where(visible[:, None], scores * c.softmax_scale, -jnp.inf)
        # A padding query sees no key: give it zeros, as the decode op does.
        sees_any = visible.any(-1)[:, None, :, None]
        probs = jax.nn.softmax(jnp.where(sees_any, scores, 0.0), axis=-1) * sees_any
        attended = jnp.einsum("bhst,bthv->bshv", probs, values)
        x = x + jnp.einsum("bshv,hvd->bsd", attended, weights.w_o)
        return x, cache

    # Full float32 matmuls even where the default would use TF32 (GPUs): this is the yardstick.
    with jax.default_matmul_precision("highest"):
        x, caches = lax.scan(layer, params.embed[tokens], (params.layers, caches))
    return rms_norm(x, params.final_norm, c.norm_eps), caches


# --- the decode loop ----------------------------------------------------------------------------

def left_pad(prompts: list[np.ndarray]) -> np.ndarray:
    width = max(len(p) for p in prompts)
    padded = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, width - len(prompt):] = prompt
    return padded


def generate(step, pool, allocator, prompts, num_decode_steps, forced_tokens=None):
    """Prefills ``prompts`` (one left-padded call), then decodes greedily token by token.

    ``step(pool, block_table, write_start, tokens) -> (hidden, pool)``, and
    ``step.logits(hidden)`` scores the greedy choice. With ``forced_tokens [b, num_decode_steps]``
    those tokens are fed instead of the greedy choices (to replay another run exactly).

    Returns ``(last_hidden [b, 1 + steps, hidden] float32, fed tokens, pool)``: the hidden state
    of each prompt's last token, then of each decoded token.
    """
    seq_ids = list(range(len(prompts)))
    for seq_id, prompt in zip(seq_ids, prompts):
        allocator.add(seq_id, num_tokens=len(prompt))
    padded = left_pad(prompts)
    tables = allocator.step_tables(seq_ids)
    hidden, pool = step(pool, tables.block_table, tables.cache_seqlens - padded.shape[1], padded)
    last_hidden, fed = [hidden[:, -1]], []
    for index in range(num_decode_steps):
        if forced_tokens is None:
            next_tokens = np.asarray(jnp.argmax(step.logits(last_hidden[-1]), axis=-1), np.int32)
        else:
            next_tokens = np.asarray(forced_tokens[:, index], np.int32)
        fed.append(next_tokens)
        tables = allocator.append_tokens(seq_ids, 1)
        hidden, pool = step(pool, tables.block_table, tables.cache_seqlens, next_tokens[:, None])
        last_hidden.append(hidden[:, 0])
    for seq_id in seq_ids:
        allocator.free(seq_id)
    stacked = np.stack([np.asarray(h, np.float32) for h in last_hidden], axis=1)
    return stacked, np.stack(fed, axis=1) if fed else np.zeros((len(prompts), 0), np.int32), pool


class Model:
    """A jitted step with its weights bound: what :func:`generate` drives.

    ``step(params, cache, block_table, write_start, tokens) -> (hidden, cache)``; the cache is
    donated, so the paged pool is updated in place. ``jit_options`` go to ``jax.jit`` (shardings).
    """

    def __init__(self, params: Params, step, **jit_options):
        self.params = params
        self._step = jax.jit(step, donate_argnums=1, **jit_options)
        self.logits = jax.jit(functools.partial(logits_of, params))

    def __call__(self, cache, block_table, write_start, tokens):
        return self._step(self.params, cache, block_table, write_start, tokens)

    def lower(self, cache, block_table, write_start, tokens):
        return self._step.lower(self.params, cache, block_table, write_start, tokens)


def blocks_needed(prompt_lengths, num_decode_steps) -> int:
    return max(-(-(length + num_decode_steps) // PAGE_SIZE) for length in prompt_lengths)


def relative_error(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def cosine(got, want) -> float:
    got, want = got.ravel(), want.ravel()
    return float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))


def run_paged(params, config, prompts, num_decode_steps):
    """The paged model on one device: greedy decoding; returns (last hidden states, tokens)."""
    max_blocks = blocks_needed([len(p) for p in prompts], num_decode_steps)
    blocks_per_layer = len(prompts) * max_blocks
    allocator = PageAllocator(blocks_per_layer, max_blocks)
    model = Model(params, functools.partial(paged_step, config=config,
                                            blocks_per_layer=blocks_per_layer))
    hidden, tokens, _ = generate(model, new_pool(config, blocks_per_layer), allocator, prompts,
                                 num_decode_steps)
    assert allocator.num_free_blocks == blocks_per_layer, "freed sequences must return every page"
    return hidden, tokens


def run_reference(params, config, prompts, tokens):
    """The reference model fed the same prompts and decode tokens."""
    steps = tokens.shape[1]
    max_blocks = blocks_needed([len(p) for p in prompts], steps)
    caches = jnp.zeros((config.num_layers, len(prompts), max_blocks * PAGE_SIZE,
                        LATENT_DIM + ROPE_DIM), jnp.float32)
    # The allocator only tracks lengths here: the contiguous cache ignores its block tables.
    lengths = PageAllocator(len(prompts) * max_blocks, max_blocks)
    params = jax.tree.map(lambda w: w.astype(jnp.float32), params)
    model = Model(params, functools.partial(reference_step, config=config))
    hidden, _, _ = generate(model, caches, lengths, prompts, steps, forced_tokens=tokens)
    return hidden


def resolve_config(config: str | MLAConfig | None, num_layers: int | None) -> MLAConfig:
    """A config by name (default: tiny on CPU, DeepSeek-V3 dims elsewhere), layers overridden."""
    if config is None:
        config = "tiny" if jax.default_backend() == "cpu" else "deepseek-v3"
    if isinstance(config, str):
        config = CONFIGS[config]
        if config is DEEPSEEK_V3 and num_layers is None:
            num_layers = 4  # 61 layers of random weights plus a float32 copy exceed one GPU
    if num_layers is not None:
        config = dataclasses.replace(config, num_layers=num_layers)
    return config


def random_prompts(seed: int, config: MLAConfig, lengths) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, length).astype(np.int32) for length in lengths]


def main(config: str | MLAConfig | None = None, num_layers: int | None = None,
         prompt_lengths=(5, 64, 70, 1), num_decode_steps: int = 8, seed: int = 0,
         max_relative_error: float = 0.03) -> dict:
    """Decodes with the paged bf16 model and checks it against the float32 reference.

    Returns the comparison numbers; raises AssertionError when they are out of tolerance.
    """
    config = resolve_config(config, num_layers)
    prompts = random_prompts(seed, config, prompt_lengths)
    params = init_params(jax.random.key(seed), config)

    hidden, tokens = run_paged(params, config, prompts, num_decode_steps)
    want = run_reference(params, config, prompts, tokens)
    result = {"relative_error": relative_error(hidden, want), "cosine": cosine(hidden, want),
              "layers": config.num_layers, "batch": len(prompts), "steps": num_decode_steps}
    print(f"paged bf16 vs float32 reference: relative error {result['relative_error']:.2e}, "
          f"cosine {result['cosine']:.6f} ({config.num_layers} layers, batch {len(prompts)}, "
          f"prompts {list(prompt_lengths)}, {num_decode_steps} decode steps)")
    assert np.isfinite(hidden).all(), "the paged model produced non-finite hidden states"
    assert result["relative_error"] < max_relative_error, result
    return result


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        help="default: tiny on CPU, deepseek-v3 elsewhere")
    parser.add_argument("--layers", type=int, help="default: the config's (4 for deepseek-v3)")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[5, 64, 70, 1])
    parser.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    main(args.config, args.layers, tuple(args.prompt_lengths), args.steps, args.seed)
