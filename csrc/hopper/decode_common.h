// Device code shared by the two schedules of the Hopper decode kernel (decode_hopper.cu, split S;
// decode_seesaw.cu, seesaw): the partition walk, the page-load cursor and TMA issue, the Q tile
// copy, the softmax arithmetic and the epilogue that writes a sequence's piece.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "barrier.h"
#include "cp_async.h"
#include "mla_params.h"
#include "tma.h"
#include "traits.h"

namespace jax_flashmla {
namespace hopper {

// One scheduler partition (see SchedulerField in mla_params.h).
struct Partition {
  int begin_seq;
  int begin_token;
  int end_seq;
  int end_token;
  int begin_split;
};

// Reads partition `part`; returns false when it has no work (uniform over the CTA).
__device__ __forceinline__ bool read_partition(const MlaDecodeParams& p, int part, Partition& pt) {
  const int32_t* md = p.sched_metadata + part * kSchedulerMetadataSize;
  pt.begin_seq = md[kBeginSeq];
  pt.begin_token = md[kBeginToken];
  pt.end_seq = min(md[kEndSeq], p.batch - 1);
  pt.end_token = md[kEndToken];
  pt.begin_split = md[kBeginSplitIndex];
  return pt.begin_seq < p.batch && pt.begin_seq <= pt.end_seq;
}

__device__ __forceinline__ int clamped_len(const MlaDecodeParams& p, int s) {
  const int len = __ldg(p.seqlens + s);
  return min(max(len, 0), p.max_pages_per_seq * kPageSize);
}

// Token range [lo, hi) of sequence s inside the partition. hi is additionally clamped to the
// sequence's clamped length so that no page beyond the block table's capacity is ever touched.
__device__ __forceinline__ int seq_lo(const Partition& pt, int s) {
  return s == pt.begin_seq ? pt.begin_token : 0;
}
__device__ __forceinline__ int seq_hi(const MlaDecodeParams& p, const Partition& pt, int s) {
  const int len = clamped_len(p, s);
  return s == pt.end_seq ? min(pt.end_token, len) : len;
}

// Block-table entry of (sequence s, page), and whether it names a page of the pool.
__device__ __forceinline__ int block_table_row(const MlaDecodeParams& p, int s, int page) {
  return __ldg(p.block_table + static_cast<size_t>(s) * p.max_pages_per_seq + page);
}
__device__ __forceinline__ bool readable(const MlaDecodeParams& p, int row) {
  return row >= 0 && row < p.num_pages;
}

// Position of the next page to load in the CTA's flat page stream (the pages of all its
// sequences, in order). Kept identically by every thread that issues loads. The page's
// block-table entry is read when the cursor reaches the page rather than when its load is
// issued: the issue sits between a warpgroup's wgmmas, where its other warps wait for the
// leader, and a step of the cursor can be placed elsewhere (the seesaw does).
struct LoadCursor {
  int seq;
  int page;
  int page_end;
  int row;  // block-table entry of (seq, page) while a page remains
};
static_assert(sizeof(LoadCursor) == 16, "the seesaw kernel keeps two cursors in 32 bytes of smem");

// Skips sequences with no page left; afterwards page < page_end iff a page remains, and then
// row is its block-table entry.
__device__ __forceinline__ void cursor_settle(LoadCursor& c, const MlaDecodeParams& p,
                                              const Partition& pt) {
  while (c.page >= c.page_end && c.seq < pt.end_seq) {
    ++c.seq;
    c.page = 0;  // seq_lo of a sequence after begin_seq
    c.page_end = (seq_hi(p, pt, c.seq) + kPageSize - 1) / kPageSize;
  }
  if (c.page < c.page_end) c.row = block_table_row(p, c.seq, c.page);
}

__device__ __forceinline__ LoadCursor cursor_begin(const MlaDecodeParams& p, const Partition& pt) {
  LoadCursor c{pt.begin_seq, seq_lo(pt, pt.begin_seq) / kPageSize,
               (seq_hi(p, pt, pt.begin_seq) + kPageSize - 1) / kPageSize, 0};
  cursor_settle(c, p, pt);
  return c;
}

__device__ __forceinline__ void cursor_advance(LoadCursor& c, const MlaDecodeParams& p,
                                               const Partition& pt) {
  ++c.page;
  cursor_settle(c, p, pt);
}

__device__ __forceinline__ bool cursor_has_page(const LoadCursor& c) {
  return c.page < c.page_end;
}

// Full barrier of load group `group` of `stage`.
__device__ __forceinline__ uint32_t group_barrier(uint32_t bar_addr, int stage, int group) {
  return bar_addr + (stage * kLoadGroups + group) * 8;
}

// Arms the full barriers of the load groups in `groups` (a mask of group_bit) of `stage` and
// issues their loads for the cursor's page, one TMA instruction per group. A page whose
// block-table entry lies outside [0, num_pages) is never read: plain arrivals complete the
// phases, and the consumers see the same entry and skip its math. Every call's mask is a
// compile-time constant once inlined, so the loops disappear and a group costs the leader one
// arrive.expect_tx and one TMA instruction (kernel-notes.md, v1.8).
__device__ __forceinline__ void issue_groups(const KvTensorMaps& maps, const MlaDecodeParams& p,
                                             const LoadCursor& c, int stage, uint32_t groups,
                                             uint32_t k_addr, uint32_t bar_addr, int kvh,
                                             uint64_t policy) {
  const int row = c.row;
  const uint32_t dst = k_addr + stage * kTileBytes;
  if (readable(p, row)) {
#pragma unroll
    for (int group = 0; group < kLoadGroups; ++group) {
      if (!(groups & group_bit(group))) continue;
      const uint32_t bar = group_barrier(bar_addr, stage, group);
      const uint32_t box_dst = dst + group * kBoxesPerWarpgroupV * kBoxBytes;
      if (group == kGroupRope) {
        mbar_arrive_expect_tx(bar, kBoxBytes);
        tma_load_4d(box_dst, &maps.rope, bar, kHeadDimV, kvh, 0, row, policy);
      } else {
        mbar_arrive_expect_tx(bar, kBoxesPerWarpgroupV * kBoxBytes);
        tma_load_5d(box_dst, &maps.v_half, bar, 0, kvh, 0, group * kBoxesPerWarpgroupV, row,
                    policy);
      }
    }
  } else {
#pragma unroll
    for (int group = 0; group < kLoadGroups; ++group) {
      if (groups & group_bit(group)) mbar_arrive(group_barrier(bar_addr, stage, group));
    }
  }
}

// Every page load is evict-first, also when several 64-row query tiles per KV head read the same
// pages: the sibling CTAs read a page at about the same time and still hit it in L2, and keeping
// the pages at normal priority measured 3-5% slower on those multi-tile rows (kernel-notes.md).
__device__ __forceinline__ uint64_t page_load_policy() { return l2_policy_evict_first(); }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));  // ex2(-inf) = +0
  return y;
}

template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (kBf16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// Multiplies the rows of an fp32 accumulator fragment (d[4j + e] is on row e / 2 of the
// thread's two) by factor[row]. Skipped when every factor of the warp is exactly 1 (no row
// maximum moved), as on most pages of a long sequence. Warp-uniform branch.
template <int N>
__device__ __forceinline__ void scale_rows(float (&d)[N], const float (&factor)[2]) {
  if (__any_sync(0xffffffffu, factor[0] != 1.f || factor[1] != 1.f)) {
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) d[4 * j + e] *= factor[e >> 1];
    }
  }
}

// Starts copying the 64 x 576 Q tile of (sequence s, KV head kvh, tile_m) into smem with cp.async,
// 128B-swizzled like a TMA box: element (r, c) at box c/64, byte r*128 + ((c%64/8) ^ (r%8))*16 +
// (c%8)*2. Rows past rows_per_kv are zero-filled (their S rows are never written out). Thread
// `worker` of `workers` copies every workers-th 16-byte chunk. The copies are asynchronous: the
// caller overlaps them with other work and completes them with finish_q_load before the first
// wgmma reads Q.
__device__ __forceinline__ void start_q_load(const MlaDecodeParams& p, int s, int kvh, int tile_m,
                                             uint32_t q_addr, int worker, int workers) {
  constexpr int kChunksPerRow = kHeadDimQK / 8;     // 72 16-byte chunks
  constexpr int kChunks = kBlockM * kChunksPerRow;  // 4608
  const uint4* q = reinterpret_cast<const uint4*>(p.q);
  // Rolled: the copies need no registers to land in, and this runs where O's 128 accumulator
  // registers are live.
#pragma unroll 1
  for (int idx = worker; idx < kChunks; idx += workers) {
    const int r = idx / kChunksPerRow;
    const int c8 = idx - r * kChunksPerRow;
    const int row = tile_m * kBlockM + r;
    const uint4* src = q;  // any valid address: a zero-fill copy reads no byte of it
    int src_bytes = 0;
    if (row < p.rows_per_kv) {
      const int tq = row / p.heads_per_kv;
      const int hh = row - tq * p.heads_per_kv;
      const size_t q_row =
          (static_cast<size_t>(s) * p.seqlen_q + tq) * p.num_heads_q + kvh * p.heads_per_kv + hh;
      src = q + q_row * kChunksPerRow + c8;
      src_bytes = 16;
    }
    const int box = c8 >> 3;
    const int ch = c8 & 7;
    cp_async_16(q_addr + box * kBoxBytes + r * 128 + ((ch ^ (r & 7)) << 4), src, src_bytes);
  }
  cp_async_commit();
}

// Completes start_q_load: this thread's copies landed, are made visible to the async proxy
// (wgmma reads Q from there), and the barrier extends that to every thread's copies.
__device__ __forceinline__ void finish_q_load() {
  cp_async_wait_all();
  fence_proxy_async_smem();
  __syncthreads();
}

__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}

// Zeroes the rows [first, 64) (tokens past the sequence end) of `boxes` consecutive K boxes at
// shared address `box_base`, by the 128 threads of one warpgroup: those rows hold garbage (NaN
// in tests) and 0 * NaN = NaN in P V even where P is 0. The caller makes the stores visible to
// its wgmmas (fence.proxy.async + a barrier of the warpgroup).
__device__ __forceinline__ void zero_tail_rows(uint32_t box_base, int boxes, int first, int wtid) {
  constexpr int kChunksPerBox = kBlockN * 8;  // 16-byte chunks: 8 per 128-byte row
#pragma unroll 1
  for (int idx = wtid; idx < boxes * kChunksPerBox; idx += kWarpgroupThreads) {
    const int box = idx / kChunksPerBox;
    const int row = (idx >> 3) & (kBlockN - 1);
    if (row >= first) {
      asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(
                       box_base + box * kBoxBytes + row * 128 + (idx & 7) * 16),
                   "r"(0u)
                   : "memory");
    }
  }
}

// Where a CTA's query rows are: accumulator rows r = 16*warp + g + 8*i, i = 0, 1, of the tile.
struct RowInfo {
  int row_in_kv[2];  // row index among the KV head's rows_per_kv query rows
  int t_q[2];        // query token of the row
};

__device__ __forceinline__ RowInfo row_info(const MlaDecodeParams& p, int tile_m, int warp, int g) {
  RowInfo ri;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    ri.row_in_kv[i] = tile_m * kBlockM + warp * 16 + g + 8 * i;
    ri.t_q[i] = ri.row_in_kv[i] / p.heads_per_kv;
  }
  return ri;
}

// Writes one sequence's piece for this thread's two rows and its 256 output columns
// (col_base .. col_base + 255, 8-column chunks j at col_base + 8j + 2*q4): normalised bf16/fp16
// into out + lse when the sequence is not split, fp32 into the combine workspace otherwise.
// `l` is the full row sum, `m` the running maximum of raw scores.
template <bool kBf16>
__device__ __forceinline__ void write_piece(const MlaDecodeParams& p, const Partition& pt, int s,
                                            int kvh, const RowInfo& ri, const float (&o)[128],
                                            const float (&l)[2], const float (&m)[2],
                                            const bool (&nan_row)[2], int col_base, int q4,
                                            bool writes_lse) {
  using Elem = std::conditional_t<kBf16, __nv_bfloat16, __half>;
  const int split_begin = __ldg(p.num_splits + s);
  const bool split = __ldg(p.num_splits + s + 1) - split_begin > 1;
  const int slot = split_begin + (s == pt.begin_seq ? pt.begin_split : 0);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = ri.row_in_kv[i];
    if (row >= p.rows_per_kv) continue;
    float lse_val;
    float inv;
    if (nan_row[i]) {
      lse_val = NAN;
      inv = NAN;
    } else if (l[i] > 0.f) {
      lse_val = m[i] * p.softmax_scale + logf(l[i]);
      inv = 1.f / l[i];
    } else {  // the row saw no key in this piece
      lse_val = split ? -INFINITY : INFINITY;
      inv = 0.f;
    }
    const int tq = ri.t_q[i];
    const int head = kvh * p.heads_per_kv + (row - tq * p.heads_per_kv);
    if (!split) {
      Elem* out_row = reinterpret_cast<Elem*>(p.out) +
                      ((static_cast<size_t>(s) * p.seqlen_q + tq) * p.num_heads_q + head) *
                          kHeadDimV +
                      col_base + 2 * q4;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<uint32_t*>(out_row + 8 * j) =
            pack2<kBf16>(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      }
      if (writes_lse && q4 == 0)
        p.lse[(static_cast<size_t>(s) * p.num_heads_q + head) * p.seqlen_q + tq] = lse_val;
    } else {
      const int64_t acc_row = workspace_row(p, slot, kvh, row);
      float* acc = p.o_accum + acc_row * kHeadDimV + col_base + 2 * q4;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(acc + 8 * j) =
            make_float2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      }
      if (writes_lse && q4 == 0) p.lse_accum[acc_row] = lse_val;
    }
  }
}

}  // namespace hopper
}  // namespace jax_flashmla
