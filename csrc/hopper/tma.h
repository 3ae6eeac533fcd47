// TMA (cp.async.bulk.tensor) helpers: the device-side load and the host-side tensor map of the
// paged KV pool. The driver's cuTensorMapEncodeTiled is fetched through the runtime
// (cudaGetDriverEntryPointByVersion), so nothing links libcuda.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap and its enums (types only)
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

namespace jax_flashmla {
namespace hopper {

// L2 policy "evict first": a cached token is read once per decode call and query tile.
__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Loads one box of a 4-D tensor map into shared memory at `dst` (shared byte address); the
// transfer's bytes are counted against mbarrier `bar` (complete_tx), whose current phase must
// already expect them (arrive.expect_tx). Coordinates are element indices, innermost first.
// A CTA launched without clusters is its own cluster, so its shared::cta addresses are valid
// shared::cluster addresses.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t c0, int32_t c1, int32_t c2, int32_t c3,
                                            uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar),
      "l"(policy)
      : "memory");
}

// The driver entry point, looked up once per process (thread-safe static init).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                       cudaEnableDefault, &status);
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // do not leave a sticky-looking error for the launch check
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// Tensor map over the pool k_cache[num_pages, 64, h_kv, 576] (16-bit elements), described as
// 4-D so that every coordinate stays far below 2^31 however large the pool is:
//   dim 0: 576 columns   (contiguous)
//   dim 1: h_kv          (stride 1152 bytes)
//   dim 2: 64 tokens     (stride h_kv * 1152 bytes)
//   dim 3: num_pages     (stride 64 * h_kv * 1152 bytes)
// Box = 64 columns x 1 head x 64 tokens x 1 page = 8 KB, 128-byte swizzled: token t of the box
// lands at t * 128 bytes, its 16-byte chunk c at position c ^ (t % 8). The caller must never
// issue a load for a page outside [0, num_pages) (out-of-range block-table entries), so the
// dim-3 bound is only a safety net (out-of-bounds boxes would be zero-filled).
// With an empty pool (num_pages <= 0) no page is ever loaded, but the map must still encode:
// `fallback` (any 16-byte-aligned device pointer, e.g. q) stands in for the address then.
inline bool make_kv_tensor_map(CUtensorMap* map, const void* k_cache, const void* fallback,
                               int num_pages, int h_kv, bool bf16) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const void* global = (num_pages > 0 && k_cache != nullptr) ? k_cache : fallback;
  const cuuint64_t row_bytes = 576 * 2;
  cuuint64_t dims[4] = {576, static_cast<cuuint64_t>(h_kv), 64,
                        static_cast<cuuint64_t>(num_pages > 0 ? num_pages : 1)};
  cuuint64_t strides[3] = {row_bytes, row_bytes * h_kv, row_bytes * h_kv * 64};
  cuuint32_t box[4] = {64, 1, 64, 1};
  cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUresult res = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                        4, const_cast<void*>(global), dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS;
}

}  // namespace hopper
}  // namespace jax_flashmla
