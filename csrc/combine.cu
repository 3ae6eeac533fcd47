// Combine: merges the pieces of split sequences into out / lse.
//
// A sequence cut across n partitions left n normalised partial outputs O_i and partial lse_i in
// its workspace slots. For each query row: m = max_i lse_i, w_i = exp(lse_i - m),
// lse = m + log(sum w), out = sum (w_i / sum w) * O_i. Unsplit sequences were written by the main
// kernel and are skipped here. One warp merges one row (512 columns, 16 per lane).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "mla_params.h"

namespace jax_flashmla {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row
constexpr int kColumnsPerLane = kHeadDimV / kWarpSize;
constexpr int kVectorWidth = 4;   // float4 loads of the partial outputs
static_assert(kColumnsPerLane % kVectorWidth == 0, "lanes read whole float4 vectors");

template <typename T>
__device__ T from_float(float value);
template <>
__device__ __nv_bfloat16 from_float(float value) { return __float2bfloat16_rn(value); }
template <>
__device__ __half from_float(float value) { return __float2half_rn(value); }

__device__ float warp_max(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

__device__ float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize)
combine_kernel(const MlaDecodeParams params) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int kv_head = blockIdx.y;
  const int seq = blockIdx.z;
  if (row >= params.rows_per_kv) return;

  const int first_slot = params.num_splits[seq];
  const int num_pieces = params.num_splits[seq + 1] - first_slot;
  if (num_pieces <= 1) return;  // written directly by the main kernel

  const int query_token = row / params.heads_per_kv;
  const int head = kv_head * params.heads_per_kv + row % params.heads_per_kv;
  T* out = static_cast<T*>(params.out) +
           ((static_cast<int64_t>(seq) * params.seqlen_q + query_token) * params.num_heads_q + head) *
               kHeadDimV;
  float* lse = params.lse + (static_cast<int64_t>(seq) * params.num_heads_q + head) * params.seqlen_q +
               query_token;

  const bool slots_valid = first_slot >= 0 && first_slot + num_pieces <= params.num_slots;
  auto partial_lse = [&](int piece) {
    const int64_t slot = first_slot + piece;
    return params.lse_accum[(slot * params.num_heads_kv + kv_head) * params.rows_per_kv + row];
  };

  // Pass 1: the largest partial lse, and whether any piece is NaN (fmaxf would drop it).
  float max_lse = -INFINITY;
  bool any_nan = !slots_valid;
  if (slots_valid) {
    for (int piece = lane; piece < num_pieces; piece += kWarpSize) {
      const float value = partial_lse(piece);
      any_nan |= isnan(value);
      max_lse = fmaxf(max_lse, value);
    }
  }
  max_lse = warp_max(max_lse);
  any_nan = __any_sync(0xffffffffu, any_nan);

  float result[kColumnsPerLane];
  if (any_nan || max_lse == -INFINITY) {
    // NaN anywhere poisons the row; no piece saw a key: the row is empty.
    const float fill = any_nan ? NAN : 0.0f;
    for (int i = 0; i < kColumnsPerLane; ++i) result[i] = fill;
    if (lane == 0) *lse = any_nan ? NAN : INFINITY;
  } else {
    float weight_sum = 0.0f;
    for (int piece = lane; piece < num_pieces; piece += kWarpSize) {
      weight_sum += expf(partial_lse(piece) - max_lse);
    }
    weight_sum = warp_sum(weight_sum);
    const float inv_sum = 1.0f / weight_sum;

    for (int i = 0; i < kColumnsPerLane; ++i) result[i] = 0.0f;
    for (int piece = 0; piece < num_pieces; ++piece) {
      const float weight = expf(partial_lse(piece) - max_lse) * inv_sum;
      const int64_t slot = first_slot + piece;
      const float* partial =
          params.o_accum + ((slot * params.num_heads_kv + kv_head) * params.rows_per_kv + row) * kHeadDimV;
      // Lane l owns columns [l*4, l*4+4) of each 128-column stripe: coalesced float4 loads.
      for (int v = 0; v < kColumnsPerLane / kVectorWidth; ++v) {
        const float4 chunk = *reinterpret_cast<const float4*>(
            partial + (v * kWarpSize + lane) * kVectorWidth);
        result[v * kVectorWidth + 0] += weight * chunk.x;
        result[v * kVectorWidth + 1] += weight * chunk.y;
        result[v * kVectorWidth + 2] += weight * chunk.z;
        result[v * kVectorWidth + 3] += weight * chunk.w;
      }
    }
    if (lane == 0) *lse = max_lse + logf(weight_sum);
  }

  for (int v = 0; v < kColumnsPerLane / kVectorWidth; ++v) {
    for (int j = 0; j < kVectorWidth; ++j) {
      out[(v * kWarpSize + lane) * kVectorWidth + j] = from_float<T>(result[v * kVectorWidth + j]);
    }
  }
}

}  // namespace

cudaError_t launch_combine(const MlaDecodeParams& params, cudaStream_t stream) {
  const dim3 grid((params.rows_per_kv + kRowsPerBlock - 1) / kRowsPerBlock, params.num_heads_kv,
                  params.batch);
  const dim3 block(kRowsPerBlock * kWarpSize);
  if (params.dtype == ElementType::kBFloat16) {
    combine_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(params);
  } else {
    combine_kernel<__half><<<grid, block, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace jax_flashmla
