"""Eight virtual CPU devices for the sharding tests, and the `gpu` marker's skip rule."""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


def _cuda_ready() -> bool:
    import jax_flashmla
    try:
        has_gpu = any(device.platform == "gpu" for device in jax.devices())
    except RuntimeError:
        has_gpu = False
    return has_gpu and jax_flashmla.cuda_extension_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and jax_flashmla's compiled extension")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
