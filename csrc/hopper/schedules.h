// The Hopper kernel's two schedules and how launch_decode_hopper picks one.
//
// Split S (decode_hopper.cu): both warpgroups compute half of every page's scores and run the
// softmax in lockstep. Seesaw (decode_seesaw.cu): pages in pairs, one page's scores per
// warpgroup, softmax of one warpgroup overlapping the other's tensor-core work.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "mla_params.h"
#include "tma.h"

namespace jax_flashmla {
namespace hopper {

enum class Schedule { kSplitScores, kSeesaw };

// The schedule for a launch. The environment variable JAX_FLASHMLA_HOPPER_SCHEDULE
// ("split" or "seesaw") overrides the choice by shape; it exists for A/B measurements and for
// testing both schedules with one build.
Schedule choose_schedule(const MlaDecodeParams& params);

cudaError_t launch_split_scores(const KvTensorMaps& kv_maps, const MlaDecodeParams& params,
                                bool bf16, dim3 grid, cudaStream_t stream);
cudaError_t launch_seesaw(const KvTensorMaps& kv_maps, const MlaDecodeParams& params, bool bf16,
                          dim3 grid, cudaStream_t stream);

}  // namespace hopper
}  // namespace jax_flashmla
