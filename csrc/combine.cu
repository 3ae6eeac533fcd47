// Combine: merges the pieces of split sequences into out / lse.
//
// A sequence cut across n partitions left n normalised partial outputs O_i and partial lse_i in
// its workspace slots. For each query row: m = max_i lse_i, w_i = exp(lse_i - m),
// lse = m + log(sum w), out = sum (w_i / sum w) * O_i. Unsplit sequences were written by the main
// kernel and are skipped here.
//
// Work shape, by the number of rows in the launch (batch x h_kv x rows per KV head):
//  * many (>= 2048: a large batch, few pieces per split sequence, 2-3): a block's 8 warps take 8
//    rows, one each, a warp covering its row's 512 columns (16 per lane, float4 loads);
//  * fewer: a small batch, many pieces (b = 1: one per partition, ~132). A block takes one row
//    and its 8 warps take every eighth piece, adding their partial sums through shared memory;
//  * very few (< 128, e.g. b = 1 with h_q 16): a block takes a quarter of a row's columns (one
//    float4 per lane and piece), so that the launch still has a block per SM or so. The combine is
//    latency-bound there: 16 blocks reading whole rows took 2 us longer than 64 quarter-row
//    blocks at b = 1, h_q 16; with 128 rows or more the quarters measured no faster, and 3%
//    slower at b = 8, h_q 128 (each block recomputes its row's lse statistics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "mla_params.h"

namespace jax_flashmla {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kVectorWidth = 4;  // float4 loads of the partial outputs
constexpr int64_t kManyRows = 2048;  // from here on, a row per warp
constexpr int64_t kFewRows = 128;    // below this, a block per quarter row
constexpr int kFewRowsColumnParts = 4;

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

// A block takes kRowsPerBlock rows (kWarps: a row per warp; 1: the warps share the row's pieces)
// and 1 / kColumnParts of their columns: blockIdx.x = row block * kColumnParts + column part.
template <typename T, int kRowsPerBlock, int kColumnParts>
__global__ void __launch_bounds__(kThreads) combine_kernel(const MlaDecodeParams params) {
  constexpr int kColumns = kHeadDimV / kColumnParts;  // this block's columns of a row
  constexpr int kColumnsPerLane = kColumns / kWarpSize;
  constexpr int kVectorsPerLane = kColumnsPerLane / kVectorWidth;
  static_assert(kColumnsPerLane % kVectorWidth == 0, "lanes read whole float4 vectors");
  static_assert(kWarps % kRowsPerBlock == 0, "a row's warps are in one block");
  constexpr int kWarpsPerRow = kWarps / kRowsPerBlock;
  __shared__ float partial_sums[kWarps][kColumns];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int row = blockIdx.x / kColumnParts * kRowsPerBlock + warp / kWarpsPerRow;
  const int first_column = blockIdx.x % kColumnParts * kColumns;
  const int piece_group = warp % kWarpsPerRow;
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
  T* out = static_cast<T*>(params.out) + out_row * kHeadDimV + first_column;
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
    // This warp's pieces: piece_group, + kWarpsPerRow, ... Unrolled so that several pieces'
    // loads are in flight before the first multiply-add needs them.
#pragma unroll 4
    for (int piece = piece_group; piece < num_pieces; piece += kWarpsPerRow) {
      const int64_t slot = slot_row(piece);
      const float weight = expf(params.lse_accum[slot] - max_lse) * inv_sum;
      const float* partial = params.o_accum + slot * kHeadDimV + first_column;
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

  if constexpr (kWarpsPerRow > 1) {  // one row per block: add the 8 warps' sums
#pragma unroll
    for (int v = 0; v < kVectorsPerLane; ++v) {
      *reinterpret_cast<float4*>(&partial_sums[warp][(v * kWarpSize + lane) * kVectorWidth]) =
          make_float4(result[v * kVectorWidth + 0], result[v * kVectorWidth + 1],
                      result[v * kVectorWidth + 2], result[v * kVectorWidth + 3]);
    }
    __syncthreads();
    for (int col = threadIdx.x; col < kColumns; col += kThreads) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += partial_sums[w][col];
      out[col] = from_float<T>(total);
    }
    if (threadIdx.x == 0 && first_column == 0) *lse = row_lse;
  } else {
    for (int v = 0; v < kVectorsPerLane; ++v) {
      for (int j = 0; j < kVectorWidth; ++j) {
        out[(v * kWarpSize + lane) * kVectorWidth + j] =
            from_float<T>(result[v * kVectorWidth + j]);
      }
    }
    if (lane == 0) *lse = row_lse;
  }
}

template <typename T>
void launch_combine_kernel(const MlaDecodeParams& params, int64_t rows, cudaStream_t stream) {
  if (rows >= kManyRows) {
    const dim3 grid((params.rows_per_kv + kWarps - 1) / kWarps, params.num_heads_kv, params.batch);
    combine_kernel<T, kWarps, 1><<<grid, kThreads, 0, stream>>>(params);
  } else if (rows >= kFewRows) {
    const dim3 grid(params.rows_per_kv, params.num_heads_kv, params.batch);
    combine_kernel<T, 1, 1><<<grid, kThreads, 0, stream>>>(params);
  } else {
    const dim3 grid(params.rows_per_kv * kFewRowsColumnParts, params.num_heads_kv, params.batch);
    combine_kernel<T, 1, kFewRowsColumnParts><<<grid, kThreads, 0, stream>>>(params);
  }
}

}  // namespace

cudaError_t launch_combine(const MlaDecodeParams& params, cudaStream_t stream) {
  const int64_t rows =
      static_cast<int64_t>(params.batch) * params.num_heads_kv * params.rows_per_kv;
  if (params.dtype == ElementType::kBFloat16) {
    launch_combine_kernel<__nv_bfloat16>(params, rows, stream);
  } else {
    launch_combine_kernel<__half>(params, rows, stream);
  }
  return cudaGetLastError();
}

}  // namespace jax_flashmla
