// cp.async (sm_80+) helpers shared by the kernels: 16-byte global -> shared copies that complete
// asynchronously, in groups (inline PTX).
#pragma once

#include <cstdint>

namespace jax_flashmla {

// 16-byte copy through L2 only; src_bytes < 16 zero-fills the rest of the destination, and 0
// reads nothing from src (which must still be a valid address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits for all of this thread's committed groups.
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

}  // namespace jax_flashmla
