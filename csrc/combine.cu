// Combine: merges the pieces of split sequences into out / lse.
//
// A sequence cut across n partitions left n normalised partial outputs O_i and partial lse_i in
// its workspace slots. For each query row: m = max_i lse_i, w_i = exp(lse_i - m),
// lse = m + log(sum w), out = sum (w_i / sum w) * O_i. Unsplit sequences were written by the main
// kernel and are skipped here.
//
// The partial outputs are dead once merged, and most are still in L2 (the main kernel wrote them
// moments ago, and streams the cache with an evict-first hint): combine_kernel drops the lines it
// read with discard.global.L2 once their values reached its stores, so that they are never
// written back to memory. The next call's main kernel would otherwise pay for the write-back
// beside its own stream: measured 3% of a call on one-tile rows with many split rows, 0.8-1.6% on
// the multi-tile rows at b = 128 (docs/kernel-notes.md, session 14). Only the row-per-warp shape
// does: with a block per row (many pieces a row) the discards cost more than they saved, 2-4% of
// a call at b = 1 and 8, h_q 128 (session 15), and combine_pieces_kernel (a few MB of partials)
// was never measured with them (they would cost it 11 registers).
//
// Work shape, by the number of rows in the launch (batch x h_kv x rows per KV head):
//  * many (>= 2048: a large batch, few pieces per split sequence, 2-3): a block's 8 warps take 8
//    rows, one each, a warp covering its row's 512 columns (16 per lane, float4 loads);
//  * fewer: a small batch, many pieces (b = 1: one per partition, ~132). A block takes one row
//    and its 8 warps take every eighth piece, adding their partial sums through shared memory;
//  * very few (< 128, e.g. b = 1 with h_q 16): combine_pieces_kernel, every piece of a row at
//    once. The launch is latency-bound there, and walking the pieces costs a global round trip
//    per few pieces: at b = 1, h_q 16 this shape took 2.3 us less per call than quarter rows
//    walked by warps (s_k 32768) and 1 us less at s_k 4096. With 128 rows or more its grid is
//    several waves (b = 8, h_q 128: twice the time of a block per row), so only here.
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
constexpr int64_t kFewRows = 128;    // below this, combine_pieces_kernel
constexpr int kL2LineBytes = 128;
constexpr int kFloatsPerL2Line = kL2LineBytes / sizeof(float);
constexpr int kPartialRowLines = kHeadDimV * sizeof(float) / kL2LineBytes;  // 16

// Drops the 128-byte L2 line at `address` (aligned) without writing it back: its memory is
// undefined afterwards, until written again.
__device__ __forceinline__ void discard_l2(const float* address) {
  asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(address) : "memory");
}

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

// A block takes kRowsPerBlock rows (kWarps: a row per warp; 1: the warps share the row's pieces).
template <typename T, int kRowsPerBlock>
__global__ void __launch_bounds__(kThreads) combine_kernel(const MlaDecodeParams params) {
  constexpr int kColumnsPerLane = kHeadDimV / kWarpSize;
  constexpr int kVectorsPerLane = kColumnsPerLane / kVectorWidth;
  static_assert(kColumnsPerLane % kVectorWidth == 0, "lanes read whole float4 vectors");
  static_assert(kWarps % kRowsPerBlock == 0, "a row's warps are in one block");
  constexpr int kWarpsPerRow = kWarps / kRowsPerBlock;
  __shared__ float partial_sums[kWarps][kHeadDimV];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int row = blockIdx.x * kRowsPerBlock + warp / kWarpsPerRow;
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
  T* out = static_cast<T*>(params.out) + out_row * kHeadDimV;
  float* lse = params.lse +
               (static_cast<int64_t>(seq) * params.num_heads_q + head) * params.seqlen_q +
               query_token;

  const bool slots_valid = first_slot >= 0 && first_slot + num_pieces <= params.num_slots;
  auto slot_row = [&](int piece) {
    return workspace_row(params, first_slot + piece, kv_head, row);
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

  if constexpr (kWarpsPerRow > 1) {  // one row per block: add the 8 warps' sums
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
  } else {
    for (int v = 0; v < kVectorsPerLane; ++v) {
      for (int j = 0; j < kVectorWidth; ++j) {
        out[(v * kWarpSize + lane) * kVectorWidth + j] =
            from_float<T>(result[v * kVectorWidth + j]);
      }
    }
    if (lane == 0) *lse = row_lse;
  }
  // The partial rows this warp read are dead: their values reached the stores above. Only where
  // a warp takes a whole row (large batches, 2-3 pieces a row): with a block per row (b = 1..8,
  // ~17-132 pieces a row) dropping them measured 2-4% slower (kernel-notes.md, session 15).
  if (kWarpsPerRow == 1 && slots_valid) {
    __syncwarp();
    for (int piece = piece_group; piece < num_pieces; piece += kWarpsPerRow) {
      if (lane < kPartialRowLines) {
        discard_l2(params.o_accum + slot_row(piece) * kHeadDimV + lane * kFloatsPerL2Line);
      }
    }
  }
}

// Block-wide reductions through `scratch` (kWarps floats); every thread gets the result.
__device__ float block_max(float value, float* scratch) {
  value = warp_max(value);
  __syncthreads();  // scratch may still be read by the previous reduction
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  float result = scratch[0];
  for (int w = 1; w < kWarps; ++w) result = fmaxf(result, scratch[w]);
  return result;
}

__device__ float block_sum(float value, float* scratch) {
  value = warp_sum(value);
  __syncthreads();
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  float result = 0.0f;
  for (int w = 0; w < kWarps; ++w) result += scratch[w];
  return result;
}

// Few rows (a small batch), many pieces per row (b = 1: one per partition, ~132): latency-bound,
// so every load a block needs is issued at once. A block takes kPiecesColumns columns of one row
// and all of its pieces: thread (piece lane, vector) accumulates the float4 `vector` of pieces
// piece lane, + kPieceLanes, ..., up to 256 pieces per pass (a sequence has at most one piece per
// partition, so one pass in practice), all loads in flight together with the loads of the lse
// the row's statistics need: one global round trip after the piece count, where a warp walking
// its pieces in turn pays one per few pieces. 64 registers, so a 256-block grid (b = 1, h_q 16)
// is one wave.
constexpr int kPiecesColumns = 32;                               // a block's columns of its row
constexpr int kPiecesColumnParts = kHeadDimV / kPiecesColumns;   // blocks per row: 16
constexpr int kPiecesVectors = kPiecesColumns / kVectorWidth;    // float4 per piece: 8
constexpr int kPieceLanes = kThreads / kPiecesVectors;           // pieces side by side: 32
constexpr int kPiecesPerPass = kThreads;  // a pass's statistics take one lse per thread: 256
constexpr int kPiecesPerThread = kPiecesPerPass / kPieceLanes;   // per pass, in registers: 8

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_pieces_kernel(const MlaDecodeParams params) {
  __shared__ float scratch[kWarps];
  __shared__ float4 lane_sums[kPieceLanes][kPiecesVectors];

  const int row = blockIdx.x / kPiecesColumnParts;
  const int first_column = blockIdx.x % kPiecesColumnParts * kPiecesColumns;
  const int kv_head = blockIdx.y;
  const int seq = blockIdx.z;
  const int vector = threadIdx.x % kPiecesVectors;
  const int piece_lane = threadIdx.x / kPiecesVectors;

  const int first_slot = params.num_splits[seq];
  const int num_pieces = params.num_splits[seq + 1] - first_slot;
  if (num_pieces <= 1) return;  // written directly by the main kernel (uniform per block)

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
    return workspace_row(params, first_slot + piece, kv_head, row);
  };

  // The row's statistics and its weighted sum, pass by pass (one pass up to 256 pieces). The sum
  // is kept relative to the running maximum and rescaled when a later pass raises it.
  float max_lse = -INFINITY;
  float weight_sum = 0.0f;
  bool any_nan = !slots_valid;
  float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int pass = 0; slots_valid && pass * kPiecesPerPass < num_pieces; ++pass) {
    const int first_piece = pass * kPiecesPerPass;
    const int stats_piece = first_piece + threadIdx.x;
    const float stats_lse =
        stats_piece < num_pieces ? params.lse_accum[slot_row(stats_piece)] : -INFINITY;
    float piece_lse[kPiecesPerThread];
    float4 partial[kPiecesPerThread];
#pragma unroll
    for (int k = 0; k < kPiecesPerThread; ++k) {
      const int piece = first_piece + piece_lane + k * kPieceLanes;
      piece_lse[k] = -INFINITY;
      partial[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (piece < num_pieces) {
        const int64_t slot = slot_row(piece);
        piece_lse[k] = params.lse_accum[slot];
        partial[k] = *reinterpret_cast<const float4*>(params.o_accum + slot * kHeadDimV +
                                                      first_column + vector * kVectorWidth);
      }
    }
    any_nan = __syncthreads_or(any_nan || isnan(stats_lse));
    if (any_nan) break;  // uniform: the row is NaN
    const float pass_max = block_max(stats_lse, scratch);
    const float new_max = fmaxf(max_lse, pass_max);
    if (new_max == -INFINITY) continue;  // uniform: no piece so far saw a key
    // Scale of what came before; exactly 0 before the first visible key.
    const float carried = max_lse == -INFINITY ? 0.0f : expf(max_lse - new_max);
    max_lse = new_max;
    weight_sum = weight_sum * carried + block_sum(expf(stats_lse - new_max), scratch);
    sum.x *= carried;
    sum.y *= carried;
    sum.z *= carried;
    sum.w *= carried;
#pragma unroll
    for (int k = 0; k < kPiecesPerThread; ++k) {
      const float weight = expf(piece_lse[k] - new_max);  // 0 past the last piece
      sum.x += weight * partial[k].x;
      sum.y += weight * partial[k].y;
      sum.z += weight * partial[k].z;
      sum.w += weight * partial[k].w;
    }
  }

  lane_sums[piece_lane][vector] = sum;
  __syncthreads();
  if (threadIdx.x < kPiecesColumns) {
    const int column = threadIdx.x;
    float total = 0.0f;
    if (any_nan) {
      total = NAN;
    } else if (max_lse != -INFINITY) {  // else no piece saw a key: the row is empty (0)
#pragma unroll
      for (int lane = 0; lane < kPieceLanes; ++lane) {
        total += reinterpret_cast<const float*>(&lane_sums[lane][column / kVectorWidth])
            [column % kVectorWidth];
      }
      total /= weight_sum;
    }
    out[column] = from_float<T>(total);
    if (column == 0 && first_column == 0) {
      *lse = any_nan ? NAN : max_lse == -INFINITY ? INFINITY : max_lse + logf(weight_sum);
    }
  }
}

template <typename T>
void launch_combine_kernel(const MlaDecodeParams& params, int64_t rows, cudaStream_t stream) {
  if (rows >= kManyRows) {
    const dim3 grid((params.rows_per_kv + kWarps - 1) / kWarps, params.num_heads_kv, params.batch);
    combine_kernel<T, kWarps><<<grid, kThreads, 0, stream>>>(params);
  } else if (rows >= kFewRows) {
    const dim3 grid(params.rows_per_kv, params.num_heads_kv, params.batch);
    combine_kernel<T, 1><<<grid, kThreads, 0, stream>>>(params);
  } else {
    const dim3 grid(params.rows_per_kv * kPiecesColumnParts, params.num_heads_kv,
                    params.batch);
    combine_pieces_kernel<T><<<grid, kThreads, 0, stream>>>(params);
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
