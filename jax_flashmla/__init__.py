"""jax_flashmla: paged Multi-head Latent Attention decode for JAX, on Hopper-class CUDA kernels.

FlashMLA's API (``get_mla_metadata``, ``flash_mla_with_kvcache``) as jittable JAX primitives: XLA
FFI custom calls on NVIDIA GPUs, an identical pure-JAX reference everywhere else.
"""

from jax_flashmla._extension import cuda_extension_available, hopper_kernel_available
from jax_flashmla._reference import mla_decode_reference
from jax_flashmla.api import flash_mla_with_kvcache, get_mla_metadata
from jax_flashmla.checked import check_decode_inputs, checked_flash_mla_with_kvcache
from jax_flashmla.paged_cache import (UNUSED_BLOCK_ID, DuplicateSequenceError, PageAllocator,
                                      PageAllocatorError, PoolExhaustedError, SequenceTooLongError,
                                      StepTables, UnknownSequenceError, layer_block_table, write_kv)

__version__ = "0.1.0"

__all__ = [
    "UNUSED_BLOCK_ID",
    "DuplicateSequenceError",
    "PageAllocator",
    "PageAllocatorError",
    "PoolExhaustedError",
    "SequenceTooLongError",
    "StepTables",
    "UnknownSequenceError",
    "layer_block_table",
    "write_kv",
    "check_decode_inputs",
    "checked_flash_mla_with_kvcache",
    "cuda_extension_available",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "hopper_kernel_available",
    "mla_decode_reference",
]
