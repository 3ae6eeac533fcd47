// How fast can one CTA per SM stream 72 KB pages from HBM into shared memory, as a function of how
// many pages each CTA keeps in flight (stages) and how long it holds a landed page (the math)?
// The split-S kernel keeps two 72 KB stages beside its 72 KB Q tile and streams the one-tile rows
// at 2.7 TB/s; a layout with a smaller Q tile would have room for a third stage. This measures
// what that could buy before anyone builds it (kernel-notes.md, session 15).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Icsrc \
//     -o /tmp/stream_rate tools/stream_rate.cu && /tmp/stream_rate        (needs an sm_90 GPU)
//
// Pages are read in a random order (a permutation of the pool, as a block table scatters them),
// each as the kernel loads it: two 32 KB V halves and the 8 KB RoPE box, by bulk copies on one
// mbarrier per stage, evict-first. Consumers (256 threads) wait for the page, spin for the given
// number of SM cycles, then re-arm the stage with the page `stages` further on. Reported: GB/s
// over the pool (CUDA events, best of three), per stages x hold.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "hopper/barrier.h"
#include "hopper/tma.h"
#include "hopper/traits.h"

namespace jh = jax_flashmla::hopper;

namespace {

constexpr int kPageBytes = jh::kTileBytes;  // one 64-token page of the cache
// A page's load groups as the kernel issues them: two V halves of four boxes, then the RoPE box.
__host__ __device__ constexpr int group_bytes(int group) {
  return group == jh::kGroupRope ? jh::kBoxBytes : jh::kBoxesPerWarpgroupV * jh::kBoxBytes;
}
static_assert(group_bytes(jh::kGroupVHalf0) + group_bytes(jh::kGroupVHalf1) +
                      group_bytes(jh::kGroupRope) == kPageBytes,
              "the load groups make up the page");
constexpr int kMaxStages = 3;               // 3 x 72 KB: what 227 KB of shared memory holds
constexpr int kThreads = 256;
constexpr int kPoolPages = 8704;          // 627 MB, the benchmark's b 128 s_k 4096 pool + slack

__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1], %2, [%3], %4;\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}

__device__ __forceinline__ void issue_page(const uint8_t* pool, int page, uint32_t dst,
                                           uint32_t bar, uint64_t policy) {
  jh::mbar_arrive_expect_tx(bar, kPageBytes);
  const uint8_t* src = pool + static_cast<size_t>(page) * kPageBytes;
  uint32_t offset = 0;
  for (int group = 0; group < jh::kLoadGroups; ++group) {
    bulk_load(dst + offset, src + offset, group_bytes(group), bar, policy);
    offset += group_bytes(group);
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    stream_kernel(const uint8_t* __restrict__ pool, const int* __restrict__ order,
                  int pages_per_cta, int stages, int hold_cycles) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t base = jh::smem_addr(smem);
  const uint32_t bar_base = base + kMaxStages * kPageBytes;
  const int* my_pages = order + static_cast<size_t>(blockIdx.x) * pages_per_cta;
  uint64_t policy = 0;
  if (threadIdx.x == 0) {
    for (int st = 0; st < stages; ++st) jh::mbar_init(bar_base + 8 * st, 1);
    jh::mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    policy = jh::l2_policy_evict_first();
    for (int st = 0; st < stages && st < pages_per_cta; ++st)
      issue_page(pool, my_pages[st], base + st * kPageBytes, bar_base + 8 * st, policy);
  }
  for (int k = 0; k < pages_per_cta; ++k) {
    const int st = k % stages;
    jh::mbar_wait(bar_base + 8 * st, (k / stages) & 1);
    const long long until = clock64() + hold_cycles;
    while (clock64() < until) {
    }
    __syncthreads();  // every consumer is done with the stage
    if (threadIdx.x == 0 && k + stages < pages_per_cta)
      issue_page(pool, my_pages[k + stages], base + st * kPageBytes, bar_base + 8 * st, policy);
  }
}

}  // namespace

int main() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, device);
  const int pages_per_cta = kPoolPages / sms;
  uint8_t* pool = nullptr;
  int* order = nullptr;
  cudaMalloc(&pool, static_cast<size_t>(kPoolPages) * kPageBytes);
  cudaMemset(pool, 0, static_cast<size_t>(kPoolPages) * kPageBytes);
  std::vector<int> host_order(kPoolPages);
  std::iota(host_order.begin(), host_order.end(), 0);
  std::shuffle(host_order.begin(), host_order.end(), std::mt19937(1234));
  cudaMalloc(&order, kPoolPages * sizeof(int));
  cudaMemcpy(order, host_order.data(), kPoolPages * sizeof(int), cudaMemcpyHostToDevice);
  const int smem_bytes = kMaxStages * kPageBytes + 64;
  cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);

  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const double bytes = static_cast<double>(pages_per_cta) * sms * kPageBytes;
  std::printf("%s, %d SMs, %d pages of %d B per CTA (%.0f MB in all)\n", prop.name, sms,
              pages_per_cta, kPageBytes, bytes / 1e6);
  std::printf("| stages | hold (SM cycles) | GB/s |\n|---|---|---|\n");
  for (int stages = 1; stages <= kMaxStages; ++stages) {
    for (int hold : {0, 1000, 2000, 3000}) {
      float best_ms = 1e30f;
      for (int rep = 0; rep < 4; ++rep) {  // the first run warms up
        cudaEventRecord(start);
        stream_kernel<<<sms, kThreads, smem_bytes>>>(pool, order, pages_per_cta, stages, hold);
        cudaEventRecord(stop);
        cudaEventSynchronize(stop);
        float ms = 0.f;
        cudaEventElapsedTime(&ms, start, stop);
        if (rep > 0) best_ms = std::min(best_ms, ms);
      }
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) {
        std::printf("error: %s\n", cudaGetErrorString(err));
        return 1;
      }
      std::printf("| %d | %d | %.0f |\n", stages, hold, bytes / (best_ms * 1e-3) / 1e9);
    }
  }
  return 0;
}
