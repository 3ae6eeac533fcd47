// The contract between the FFI handlers and every decode kernel.
//
// The handler (mla_ffi.cc) validates shapes, fills one MlaDecodeParams and hands it to a kernel
// family (portable sm_80+ or Hopper sm_90a). All kernels share the tile-scheduler metadata
// layout, the workspace layout and the combine kernel, so they are interchangeable and each is
// the other's correctness twin.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace jax_flashmla {

// Fixed geometry of DeepSeek MLA: one cached token is 576 values (512 latent + 64 RoPE); V is
// the first 512 columns of the same row. Pages hold 64 tokens.
constexpr int kHeadDimQK = 576;
constexpr int kHeadDimV = 512;
constexpr int kPageSize = 64;

// Query rows (token-major: row = query_token * heads_per_kv + head) handled by one CTA.
constexpr int kRowsPerQueryTile = 64;

// The scheduler charges each sequence this many pages on top of its length, for the fixed cost
// of loading Q, writing O and combining.
constexpr int kFixedOverheadPages = 5;

// Longest sequence (and block-table capacity) supported, and the largest batch: together they keep
// the scheduler's int32 cost sums from overflowing (8192 * (2^24 / 64 + 5) < 2^31).
constexpr int kMaxSeqlenK = 1 << 24;
constexpr int kMaxBatch = 8192;

// One row of tile-scheduler metadata, int32[num_sm_parts, kSchedulerMetadataSize].
//
// Partition p covers sequences begin_seq..end_seq (inclusive), in order. For sequence s it covers
// tokens [lo, hi) with lo = (s == begin_seq ? begin_token : 0) and
// hi = (s == end_seq ? end_token : scheduled_len(s)), where scheduled_len(s) =
// min(max(seqlens[s], 0), kMaxSeqlenK). Token bounds are multiples of kPageSize except
// hi == scheduled_len(s). The scheduler does not know the block table: kernels clamp [lo, hi) to
// the table's capacity, max_pages_per_seq * kPageSize, before reading anything. A partition with begin_seq >= batch or
// begin_seq > end_seq has no work. Every sequence, zero-length ones included, is covered by at
// least one partition; a zero-length sequence by exactly one, with lo == hi == 0.
//
// The piece of sequence s inside partition p owns workspace slot
//   num_splits[s] + (s == begin_seq ? begin_split_index : 0).
// A sequence is split iff num_splits[s + 1] - num_splits[s] > 1. Pieces of a split sequence write
// fp32 partial results to their slot and the combine kernel merges them; an unsplit sequence is
// written straight to out / lse by the main kernel.
enum SchedulerField : int {
  kBeginSeq = 0,
  kBeginToken = 1,
  kEndSeq = 2,
  kEndToken = 3,
  kBeginSplitIndex = 4,
  kSchedulerMetadataSize = 8,  // fields 5..7 are reserved and zero
};

enum class ElementType : int { kBFloat16 = 0, kFloat16 = 1 };

struct MlaDecodeParams {
  ElementType dtype;

  int batch;              // b
  int seqlen_q;           // s_q: query tokens per sequence (MTP / speculative decode)
  int num_heads_q;        // h_q
  int num_heads_kv;       // h_kv; h_q % h_kv == 0
  int heads_per_kv;       // h_q / h_kv
  int rows_per_kv;        // s_q * heads_per_kv: query rows of one KV head
  int num_pages;          // rows of the page pool
  int max_pages_per_seq;  // block_table's second dimension
  int num_sm_parts;       // rows of the scheduler metadata
  int num_slots;          // workspace slots: batch + num_sm_parts

  float softmax_scale;
  float scale_log2;  // softmax_scale * log2(e): scores are exponentiated with exp2
  bool causal;       // bottom-right aligned: query token t sees keys [0, len - s_q + t]

  // All arrays are dense, row-major (XLA's default layout). Element offsets into the pool can
  // exceed 2^31: index it with 64-bit arithmetic.
  const void* q;                 // [b, s_q, h_q, 576] dtype
  const void* k_cache;           // [num_pages, 64, h_kv, 576] dtype
  const int32_t* block_table;    // [b, max_pages_per_seq]
  const int32_t* seqlens;        // [b]
  const int32_t* sched_metadata; // [num_sm_parts, kSchedulerMetadataSize]
  const int32_t* num_splits;     // [b + 1], prefix sums of pieces per sequence

  void* out;        // [b, s_q, h_q, 512] dtype
  float* lse;       // [b, h_q, s_q], natural log
  float* o_accum;   // [num_slots, h_kv, rows_per_kv, 512] workspace, normalised partial O
  float* lse_accum; // [num_slots, h_kv, rows_per_kv] workspace, partial lse (natural log)
};

// The workspace row (of o_accum / lse_accum) that holds query row `row` of KV head `kv_head` in
// piece slot `slot`: where the decode kernels write a split sequence's pieces and the combine
// reads them.
__host__ __device__ inline int64_t workspace_row(const MlaDecodeParams& p, int slot, int kv_head,
                                                 int row) {
  return (static_cast<int64_t>(slot) * p.num_heads_kv + kv_head) * p.rows_per_kv + row;
}

// Semantics every kernel implements, row by row (row = one query token of one head):
// * keys of sequence s are tokens [0, seqlens[s]); K row = all 576 values, V row = first 512.
// * causal with s_q > 1: query token t sees keys j <= seqlens[s] - s_q + t.
// * a row that sees no key: out = 0, lse = +inf.
// * a malformed sequence (seqlens[s] < 0, or > max_pages_per_seq * 64) gives out = NaN,
//   lse = NaN, and the kernel reads only pages within the table's capacity.
// * a needed page whose block-table entry lies outside [0, num_pages) is never read; its tokens
//   count as NaN, so the rows that would see them come out NaN.
// * unused page slots and the tail of the last page hold garbage (NaN in tests): it must never
//   reach an output.

// Kernel entry points. Each returns the launch's cudaError_t (cudaGetLastError()).
cudaError_t launch_tile_scheduler(const int32_t* seqlens, int batch, int num_sm_parts,
                                  int32_t* sched_metadata, int32_t* num_splits,
                                  cudaStream_t stream);

// Portable split-KV kernel, sm_80 and newer (mma.sync tensor cores, cp.async page loads).
cudaError_t launch_decode_portable(const MlaDecodeParams& params, cudaStream_t stream);

// Hopper kernel (TMA + wgmma), built for sm_90a only. `hopper_kernel_available()` says whether
// this build contains it.
bool hopper_kernel_available();
cudaError_t launch_decode_hopper(const MlaDecodeParams& params, cudaStream_t stream);
// The schedule ("split" or "seesaw", csrc/hopper/schedules.h) the Hopper kernel would use for a
// batch of `batch` sequences with `rows_per_kv` query rows per KV head, a block table of
// `max_pages_per_seq` columns, a pool of `num_pages` pages and `num_sm_parts` scheduler
// partitions, environment included.
const char* hopper_schedule_name(int batch, int rows_per_kv, int max_pages_per_seq, int num_pages,
                                 int num_sm_parts);

// Merges the pieces of split sequences into out / lse; a no-op for unsplit ones.
cudaError_t launch_combine(const MlaDecodeParams& params, cudaStream_t stream);

}  // namespace jax_flashmla
