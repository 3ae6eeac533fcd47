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

// Loads one box of a 4-D (5-D) tensor map into shared memory at `dst` (shared byte address);
// the transfer's bytes are counted against mbarrier `bar` (complete_tx), whose current phase must
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

__device__ __forceinline__ void tma_load_5d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t c0, int32_t c1, int32_t c2, int32_t c3,
                                            int32_t c4, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%0], [%1, {%2, %3, %4, %5, %6}], [%7], %8;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
      "r"(bar), "l"(policy)
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

// The two tensor maps over the pool k_cache[num_pages, 64, h_kv, 576] (16-bit elements) that a
// page is loaded with. Both are 128-byte swizzled (token t of a 64-column group lands at t * 128
// bytes, its 16-byte chunk c at position c ^ (t % 8)) and keep every coordinate far below 2^31
// however large the pool is.
//   v_half: 5-D, one V half (columns 256h..256h+255) of a page per instruction, as four
//     consecutive 8 KB groups of 64 tokens x 64 columns, i.e. the same bytes as four separate
//     64-column boxes:
//       dim 0: 64 columns within a group (contiguous)
//       dim 1: h_kv                      (stride 1152 bytes)
//       dim 2: 64 tokens                 (stride h_kv * 1152 bytes)
//       dim 3: 9 column groups           (stride 128 bytes)
//       dim 4: num_pages                 (stride 64 * h_kv * 1152 bytes)
//     Box 64 x 1 x 64 x 4 x 1 = 32 KB. One instruction where four took the issuing thread ~40
//     (kernel-notes.md, v1.8).
//   rope: 4-D, one 64-column box (the RoPE columns 512..575):
//       dim 0: 576 columns, dim 1: h_kv, dim 2: 64 tokens, dim 3: num_pages (strides as above)
//     Box 64 x 1 x 64 x 1 = 8 KB.
struct KvTensorMaps {
  CUtensorMap v_half;
  CUtensorMap rope;
};

// The caller must never issue a load for a page outside [0, num_pages) (out-of-range
// block-table entries), so the page bound is only a safety net (out-of-bounds boxes would be
// zero-filled). With an empty pool (num_pages <= 0) no page is ever loaded, but the maps must
// still encode: `fallback` (any 16-byte-aligned device pointer, e.g. q) stands in for the address.
inline bool make_kv_tensor_maps(KvTensorMaps* maps, const void* k_cache, const void* fallback,
                                int num_pages, int h_kv, bool bf16) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  void* global = const_cast<void*>((num_pages > 0 && k_cache != nullptr) ? k_cache : fallback);
  const CUtensorMapDataType type =
      bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const cuuint64_t row_bytes = 576 * 2;
  const cuuint64_t token_bytes = row_bytes * h_kv;
  const cuuint64_t page_bytes = token_bytes * 64;
  const cuuint64_t pages = static_cast<cuuint64_t>(num_pages > 0 ? num_pages : 1);
  const cuuint32_t unit_strides[5] = {1, 1, 1, 1, 1};

  const cuuint64_t half_dims[5] = {64, static_cast<cuuint64_t>(h_kv), 64, 9, pages};
  const cuuint64_t half_strides[4] = {row_bytes, token_bytes, 128, page_bytes};
  const cuuint32_t half_box[5] = {64, 1, 64, 4, 1};
  CUresult res = encode(&maps->v_half, type, 5, global, half_dims, half_strides, half_box,
                        unit_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) return false;

  const cuuint64_t rope_dims[4] = {576, static_cast<cuuint64_t>(h_kv), 64, pages};
  const cuuint64_t rope_strides[3] = {row_bytes, token_bytes, page_bytes};
  const cuuint32_t rope_box[4] = {64, 1, 64, 1};
  res = encode(&maps->rope, type, 4, global, rope_dims, rope_strides, rope_box, unit_strides,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS;
}

}  // namespace hopper
}  // namespace jax_flashmla
