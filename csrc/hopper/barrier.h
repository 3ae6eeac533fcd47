// mbarrier, named-barrier and proxy-fence helpers for the Hopper decode kernel (inline PTX).
//
// mbarrier phases: a barrier initialised with count C completes a phase when C arrivals have
// been made and its pending transaction count (raised by arrive.expect_tx, lowered by TMA's
// complete_tx) is back to zero; then it flips to the next phase. A waiter that wants the n-th
// completion (n = 0, 1, ...) waits with parity n & 1: try_wait.parity(P) succeeds once the
// phase with parity P has completed. This is only unambiguous if the barrier cannot complete
// twice while someone still waits for the earlier phase; the kernel guarantees that by never
// re-arming a buffer's barriers before every consumer has released that buffer.
#pragma once

#include <cstdint>

namespace jax_flashmla {
namespace hopper {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the barrier initialisations visible to the async proxy (TMA's complete_tx) and to the
// other threads (together with the __syncthreads that follows).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// One arrival that also announces `bytes` of incoming TMA transactions for the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// A plain arrival (used when a page is not loaded: the phase still has to complete).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Spins until the phase with parity `parity` has completed. try_wait may suspend the thread
// for a system-dependent time before returning false, so the loop is not a hot spin.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "JFM_MBAR_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra JFM_MBAR_WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Generic-proxy writes to shared memory (st.shared) become visible to later async-proxy reads
// (wgmma operands, TMA) only after this fence in the writing thread, followed by a barrier.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Named barrier over `count` threads (a multiple of 32). Id 0 is __syncthreads'. A producer
// that only signals uses named_barrier_arrive (it does not wait); the consumers sync, and
// `count` counts both sides.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

}  // namespace hopper
}  // namespace jax_flashmla
