// Combine: merges the pieces of split sequences into out / lse.
//
// A sequence cut across n partitions left n normalised partial outputs O_i and partial lse_i in
// its workspace slots. For each query row: m = max_i lse_i, w_i = exp(lse_i - m),
// lse = m + log(sum w), out = sum (w_i / sum w) * O_i. Unsplit sequences were written by the main
// kernel and are skipped here.
//
// Work shape. One warp covers a row's 512 columns (16 per lane, float4 loads). A large batch
// has many rows and few pieces per split sequence (2-3), so a block's 8 warps take 8 rows, one
// each. A small batch has few rows and many pieces (b = 1: one per partition, ~132), so the host
// gives each block a single row and its 8 warps take every eighth piece each, then add their
// partial sums through shared memory: 8 times the loads in flight for that row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "mla_params.h"

namespace jax_flashmla {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kColumnsPerLane = kHeadDimV / kWarpSize;  // 16
constexpr int kVectorWidth = 4;                         // float4 loads of the partial outputs
constexpr int kVectorsPerLane = kColumnsPerLane / kVectorWidth;
static_assert(kColumnsPerLane % kVectorWidth == 0, "lanes read whole float4 vectors");
// Below this many rows in the whole launch (batch x h_kv x rows), one row per block.
constexpr int64_t kManyRows = 2048;

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

// rows_per_block is 1 (the 8 warps share the row's pieces) or kWarps (a row per warp).
template <typename T>
__global__ void __launch_bounds__(kThreads)
combine_kernel(const MlaDecodeParams params, int rows_per_block) {
  __shared__ float partial_sums[kWarps][kHeadDimV];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps_per_row = kWarps / rows_per_block;
  const int row = blockIdx.x * rows_per_block + warp / warps_per_row;
  const int piece_group = warp % warps_per_row;
  const int kv_head = blockIdx.y;
  const int seq = blockIdx.z;

  const int first_slot = params.num_splits[seq];
  const int num_pieces = params.num_splits[seq + 1] - first_slot;
  if (num_pieces <= 1) return;  // written directly by the main kernel (uniform per block)
  // With one row per block the grid has exactly rows_per_kv rows, so this is uniform then too.
  if (row >= params.rows_per_kv) return;

  const int query_token = row / params.heads_per_kv;
  const int head = kv_head * params.heads_per_kv + row % params.heads_per_kv;
  const int64_t out_row =
      (static_cast<int64_t>(seq) * params.seqlen_q + query_token) * params.num_heads_q + head;
  T* out = static_cast<T*>(params.out) + out_row * kHeadDimV;
  float* lse = params.lse +
               (static_cast<int64_t>(seq) * params.num_heads_q + head) * params.seqlen_q +
               query_token;

  const bool slots_valid = first_slot >= 0 && first_slot + num_pieces <= params.num_slots;
  auto slot_row = [&](int piece) {
    return (static_cast<int64_t>(first_slot + piece) * params.num_heads_kv + kv_head) *
               params.rows_per_kv + row;
  };

  // The row's statistics, computed by every warp of the row (lanes stride over the pieces).
  // Pass 1: the largest partial lse, and whether any piece is NaN (fmaxf would drop it).
  float max_lse = -INFINITY;
  bool any_nan = !slots_valid;
  if (slots_valid) {
    for (int piece = lane; piece < num_pieces; piece += kWarpSize) {
      const float value = params.lse_accum[slot_row(piece)];
      any_nan |= isnan(value);
      max_lse = fmaxf(max_lse, value);
    }
  }
  max_lse = warp_max(max_lse);
  any_nan = __any_sync(0xffffffffu, any_nan);

  float result[kColumnsPerLane];
  float row_lse;
  if (any_nan || max_lse == -INFINITY) {
    // NaN anywhere poisons the row; no piece saw a key: the row is empty. Every warp of the row
    // takes this branch; only the first one's values are kept.
    const float fill = any_nan ? NAN : 0.0f;
    for (int i = 0; i < kColumnsPerLane; ++i) result[i] = piece_group == 0 ? fill : 0.0f;
    row_lse = any_nan ? NAN : INFINITY;
  } else {
    float weight_sum = 0.0f;
    for (int piece = lane; piece < num_pieces; piece += kWarpSize) {
      weight_sum += expf(params.lse_accum[slot_row(piece)] - max_lse);
    }
    weight_sum = warp_sum(weight_sum);
    const float inv_sum = 1.0f / weight_sum;
    row_lse = max_lse + logf(weight_sum);

    for (int i = 0; i < kColumnsPerLane; ++i) result[i] = 0.0f;
    // This warp's pieces: piece_group, + warps_per_row, ... Unrolled so that several pieces'
    // loads are in flight before the first multiply-add needs them.
#pragma unroll 4
    for (int piece = piece_group; piece < num_pieces; piece += warps_per_row) {
      const int64_t slot = slot_row(piece);
      const float weight = expf(params.lse_accum[slot] - max_lse) * inv_sum;
      const float* partial = params.o_accum + slot * kHeadDimV;
      // Lane l owns columns [l*4, l*4+4) of each 128-column stripe: coalesced float4 loads.
#pragma unroll
      for (int v = 0; v < kVectorsPerLane; ++v) {
        const float4 chunk = *reinterpret_cast<const float4*>(
            partial + (v * kWarpSize + lane) * kVectorWidth);
        result[v * kVectorWidth + 0] += weight * chunk.x;
        result[v * kVectorWidth + 1] += weight * chunk.y;
        result[v * kVectorWidth + 2] += weight * chunk.z;
        result[v * kVectorWidth + 3] += weight * chunk.w;
      }
    }
  }

  if (warps_per_row > 1) {  // uniform: one row per block; add the 8 warps' sums
#pragma unroll
    for (int v = 0; v < kVectorsPerLane; ++v) {
      *reinterpret_cast<float4*>(&partial_sums[warp][(v * kWarpSize + lane) * kVectorWidth]) =
          make_float4(result[v * kVectorWidth + 0], result[v * kVectorWidth + 1],
                      result[v * kVectorWidth + 2], result[v * kVectorWidth + 3]);
    }
    __syncthreads();
    for (int col = threadIdx.x; col < kHeadDimV; col += kThreads) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += partial_sums[w][col];
      out[col] = from_float<T>(total);
    }
    if (threadIdx.x == 0) *lse = row_lse;
    return;
  }

  for (int v = 0; v < kVectorsPerLane; ++v) {
    for (int j = 0; j < kVectorWidth; ++j) {
      out[(v * kWarpSize + lane) * kVectorWidth + j] = from_float<T>(result[v * kVectorWidth + j]);
    }
  }
  if (lane == 0) *lse = row_lse;
}

}  // namespace

cudaError_t launch_combine(const MlaDecodeParams& params, cudaStream_t stream) {
  const int64_t rows =
      static_cast<int64_t>(params.batch) * params.num_heads_kv * params.rows_per_kv;
  const int rows_per_block = rows >= kManyRows ? kWarps : 1;
  const dim3 grid((params.rows_per_kv + rows_per_block - 1) / rows_per_block, params.num_heads_kv,
                  params.batch);
  if (params.dtype == ElementType::kBFloat16) {
    combine_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(params, rows_per_block);
  } else {
    combine_kernel<__half><<<grid, kThreads, 0, stream>>>(params, rows_per_block);
  }
  return cudaGetLastError();
}

}  // namespace jax_flashmla
