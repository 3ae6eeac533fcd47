#!/usr/bin/env bash
# Builds a wheel of this checkout, installs it into a fresh virtual environment and runs one decode
# from a directory without the source tree, comparing against the reference implementation. Proves
# the wheel is self-contained (package data, compiled extension when built, dependencies).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$work"/dist/jax_flashmla-*.whl
cd "$work"
"$work/venv/bin/python" - <<'PY'
import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla

assert "site-packages" in jax_flashmla.__file__, jax_flashmla.__file__
k_cache = jax.random.normal(jax.random.key(0), (8, 64, 1, 576), jnp.bfloat16)
q = jax.random.normal(jax.random.key(1), (2, 1, 16, 576), jnp.bfloat16)
table = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
lengths = jnp.array([200, 17], jnp.int32)
out, lse = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(*a, 512, causal=True))(
    q, k_cache, table, lengths)
ref_out, ref_lse = jax_flashmla.mla_decode_reference(q, k_cache, table, lengths, 512,
                                                     576 ** -0.5, True)
np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                           atol=2 ** -8, rtol=2 / 128)
np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5)
print(f"wheel smoke test passed: jax_flashmla {jax_flashmla.__version__} on {jax.devices()[0]}, "
      f"CUDA extension {'present' if jax_flashmla.cuda_extension_available() else 'absent'}")
PY
