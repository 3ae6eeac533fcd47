"""Eight virtual CPU devices for the sharding tests; skip rules of the gpu / multigpu markers."""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


def _gpu_count() -> int:
    try:
        return sum(device.platform == "gpu" for device in jax.devices())
    except RuntimeError:
        return 0


def pytest_collection_modifyitems(config, items):
    import jax_flashmla
    gpus = _gpu_count() if jax_flashmla.cuda_extension_available() else 0
    cuda_ready, several_gpus = gpus >= 1, gpus >= 2
    for item in items:
        if "gpu" in item.keywords and not cuda_ready:
            item.add_marker(pytest.mark.skip(
                reason="needs a CUDA GPU and jax_flashmla's compiled extension"))
        if "multigpu" in item.keywords and not several_gpus:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))
