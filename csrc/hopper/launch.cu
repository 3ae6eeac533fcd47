// Host side of the Hopper kernel: the K-cache tensor map, the grid, and the choice of schedule.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "mla_params.h"
#include "schedules.h"
#include "tma.h"
#include "traits.h"

namespace jax_flashmla {
namespace hopper {

Schedule choose_schedule(const MlaDecodeParams& params) {
  if (const char* forced = std::getenv("JAX_FLASHMLA_HOPPER_SCHEDULE")) {
    if (std::strcmp(forced, "split") == 0) return Schedule::kSplitScores;
    if (std::strcmp(forced, "seesaw") == 0) return Schedule::kSeesaw;
  }
  // Several 64-row tiles per KV head means compute-bound work (h_q * s_q >= 128 for h_kv = 1):
  // there the overlap of softmax and tensor-core work pays, 5-15% once each CTA walks more than a
  // few pages (b = 1..8 with long contexts, and b = 128); one tile is memory-bound and both
  // schedules tie. Below about four pages per partition the two are within noise of each other
  // (b = 1, s_k 4096, h_q 128 came out 10% apart, either way, in two runs), and split S stays
  // (tools/schedule_crossover.py, docs/kernel-notes.md). The lengths are on the device, so the
  // pages a partition walks are bounded by the block table's capacity and the pool's size.
  constexpr int64_t kSeesawMinPagesPerPartition = 4;
  const int64_t pages = std::min(static_cast<int64_t>(params.batch) * params.max_pages_per_seq,
                                 static_cast<int64_t>(params.num_pages));
  return params.rows_per_kv > kBlockM &&
                 pages >= kSeesawMinPagesPerPartition * static_cast<int64_t>(params.num_sm_parts)
             ? Schedule::kSeesaw
             : Schedule::kSplitScores;
}

}  // namespace hopper

bool hopper_kernel_available() { return true; }

const char* hopper_schedule_name(int batch, int rows_per_kv, int max_pages_per_seq, int num_pages,
                                 int num_sm_parts) {
  MlaDecodeParams params{};
  params.batch = batch;
  params.rows_per_kv = rows_per_kv;
  params.max_pages_per_seq = max_pages_per_seq;
  params.num_pages = num_pages;
  params.num_sm_parts = num_sm_parts;
  return hopper::choose_schedule(params) == hopper::Schedule::kSeesaw ? "seesaw" : "split";
}

cudaError_t launch_decode_hopper(const MlaDecodeParams& params, cudaStream_t stream) {
  if (params.batch <= 0 || params.num_sm_parts <= 0 || params.rows_per_kv <= 0 ||
      params.num_heads_kv <= 0) {
    return cudaSuccess;  // nothing to compute
  }
  const bool bf16 = params.dtype == ElementType::kBFloat16;
  hopper::KvTensorMaps kv_maps;
  if (!hopper::make_kv_tensor_maps(&kv_maps, params.k_cache, params.q, params.num_pages,
                                   params.num_heads_kv, bf16)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid((params.rows_per_kv + hopper::kBlockM - 1) / hopper::kBlockM,
                  params.num_heads_kv, params.num_sm_parts);
  // Kernel attributes are per-device, host-side settings (no stream work): safe under graph
  // capture.
  return hopper::choose_schedule(params) == hopper::Schedule::kSeesaw
             ? hopper::launch_seesaw(kv_maps, params, bf16, grid, stream)
             : hopper::launch_split_scores(kv_maps, params, bf16, grid, stream);
}

}  // namespace jax_flashmla
