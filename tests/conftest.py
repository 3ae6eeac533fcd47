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


def _gpu_count() -> int:
    try:
        return sum(device.platform == "gpu" for device in jax.devices())
    except RuntimeError:
        return 0


def pytest_collection_modifyitems(config, items):
    cuda_ready = _cuda_ready()
    several_gpus = cuda_ready and _gpu_count() >= 2
    for item in items:
        if "gpu" in item.keywords and not cuda_ready:
            item.add_marker(pytest.mark.skip(
                reason="needs a CUDA GPU and jax_flashmla's compiled extension"))
        if "multigpu" in item.keywords and not several_gpus:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))
