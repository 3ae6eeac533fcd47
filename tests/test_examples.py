"""Each example runs at a tiny size on CPU and passes its own correctness check.

The examples are scripts; here their ``main`` runs in-process (conftest's 8 virtual CPU devices
serve the sharded one) and raises AssertionError if the model disagrees with its reference. The
notebook runs in a fresh Jupyter kernel and fails the test on the first cell that errors.
"""

import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    # The examples import each other as plain modules, as they do when run as scripts.
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_deepseek_mla_decode_matches_float32_reference(examples_on_path):
    import deepseek_mla_decode

    # Prompts on both sides of a page boundary; decoding carries the 63-token one across it.
    result = deepseek_mla_decode.main("tiny", prompt_lengths=(3, 63, 66), num_decode_steps=3)
    assert result["relative_error"] < 0.03 and result["cosine"] > 0.999


def test_model_step_updates_the_shared_pool_in_place(examples_on_path):
    # The scan over layers carries one pool that every layer writes: compiled with the pool
    # donated, the step's temporaries must not hold a copy of it. float16, because XLA:CPU
    # converts bfloat16 scatters through float32 (test_paged_cache.py says more).
    import functools

    import jax
    import jax.numpy as jnp
    import deepseek_mla_decode as model_example

    config = model_example.TINY
    params = model_example.init_params(jax.random.key(0), config, jnp.float16)
    blocks_per_layer = 256
    pool = model_example.new_pool(config, blocks_per_layer, jnp.float16)
    model = model_example.Model(params, functools.partial(
        model_example.paged_step, config=config, blocks_per_layer=blocks_per_layer))
    batch, max_blocks = 4, 2
    compiled = model.lower(pool, jax.ShapeDtypeStruct((batch, max_blocks), jnp.int32),
                           jax.ShapeDtypeStruct((batch,), jnp.int32),
                           jax.ShapeDtypeStruct((batch, 1), jnp.int32)).compile()
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes == pool.nbytes, "the donated pool is not aliased"
    assert memory.temp_size_in_bytes < pool.nbytes // 4, (
        f"{memory.temp_size_in_bytes} bytes of temporaries for a {pool.nbytes}-byte pool")


def test_sharded_decode_matches_single_device(examples_on_path):
    import jax
    import sharded_decode

    # Every device of the default backend: conftest's 8 virtual ones on CPU. 8 prompts split
    # evenly over 1, 2, 4 or 8 GPUs too.
    result = sharded_decode.main("tiny", num_layers=1, prompt_lengths=(3, 63, 66, 1, 9, 20, 2, 5),
                                 num_decode_steps=2)
    assert result["devices"] == len(jax.devices())
    assert result["data_parallel"] < 0.02 and result["tensor_parallel"] < 0.02


def test_walkthrough_notebook_runs_without_errors():
    import nbclient
    import nbformat

    path = EXAMPLES / "walkthrough.ipynb"
    notebook = nbformat.read(path, as_version=4)
    stale = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not stale, f"clear the outputs of cells {stale} before committing the notebook"
    # execute() raises CellExecutionError on the first cell that fails.
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if "image/png" in output.get("data", {})]
    assert images, "the notebook's plot produced no image"
