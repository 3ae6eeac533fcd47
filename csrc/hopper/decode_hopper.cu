// Hopper (sm_90a) MLA paged-decode kernel: TMA page loads, wgmma tensor-core math. This file is
// the split-S schedule, used for rows of one 64-row tile (the seesaw schedule is in
// decode_seesaw.cu; launch.cu picks one, see schedules.h).
//
// Contract: csrc/mla_params.h. Grid (ceil(rows_per_kv / 64), h_kv, num_sm_parts); each CTA owns
// one 64-row query tile of one KV head and walks the (sequence, page range) list of its
// scheduler partition. 256 threads = two warpgroups (WG0, WG1), both consumers.
//
// Per sequence:
//   Q tile (64 x 576) -> smem by cp.async, stored 128B-swizzled (9 boxes of 64 cols). The next
//   sequence's Q is started as soon as the current one's last S has completed (see below).
// Per page k of the CTA's flat page stream (pages of all its sequences, in order):
//   stage = k % 2, the TMA destination of that page; 3 mbarriers per stage, one per load group
//   (V half 0, V half 1, RoPE box: traits.h), so S can start on the first V half while the
//   rest is still landing.
//   Split S: warpgroup w computes S for tokens 32w..32w+31 (wgmma m64n32k16 x 36, Q and K both
//   K-major in smem), writes its half-row maxima to smem [barrier X], takes the max of both
//   halves (identical in both warpgroups), runs the fp32 online softmax on its half (exp2, scale
//   folded in; O is rescaled only when a row maximum of the warp moved), writes its half of P
//   (16-bit, swizzled like a TMA box) to smem [fence.proxy.async, barrier Y], and accumulates
//   its 256 columns of O += P V with wgmma m64n256k16, A = P from smem, B = V = the first 512
//   columns of the same smem K tile read as an MN-major operand (no second load). Row sums stay
//   per half and are added once in the epilogue.
//   After a warpgroup's P V has completed, its leader thread counts a release of the stage; the
//   second release (either warpgroup's leader) issues the TMA of page k + 2 into that stage.
//
// Pipeline ordering and synchronisation (who waits for what):
//   * full barrier [stage][load group], count 1: the issuing leader arrives with expect_tx (the
//     group's bytes) and the TMA completes the transactions; consumers wait with parity
//     (k / 2) & 1 (k-th page is the (k/2)-th use of its stage). A page whose block-table entry is
//     out of range is not loaded: the leader arrives without tx, and the consumers skip its math.
//   * release counter [stage] (smem u32, atomicAdd): both warpgroups add 1 after finishing page
//     k; the one that sees an odd old value is second and issues page k + 2. A stage is thus
//     re-armed only after both consumers passed its wait, so a barrier never runs a phase
//     ahead of a waiter.
//   * a warpgroup-wide named barrier (id 1 + wg) precedes the release, so every thread's wgmma
//     reads of the stage have completed (each thread did wgmma.wait_group 0) and the tail
//     zeroing stores are done.
//   * barriers X and Y (named barrier 3, all 256 threads), once each per loaded page:
//     X orders the row-max writes before the reads; Y orders the P stores (and the V tail
//     zeros) before both warpgroups' P V wgmmas. Reuse: a warpgroup reaches X of page k + 1
//     only after its P V of page k completed, so P / row maxima are never overwritten while
//     still read; a single buffer of each suffices.
//   * tail zeroing: on the page holding the sequence end, tokens past the end are garbage
//     (NaN in tests) and 0 * NaN = NaN in P V, so each warpgroup zeroes those rows of its own
//     four V boxes after its S is done, then fence.proxy.async (generic -> async proxy) and
//     barrier Y before its P V. The other warpgroup may read those rows for its S
//     concurrently; it masks them, so either value is harmless.
//   * Q: the next sequence's copies start only where both warpgroups' S wgmmas on the old Q
//     have completed: past barrier X of the sequence's last page, or (no readable last page)
//     past the epilogue's barrier. Each thread waits for its copies, fence.proxy.async, and a
//     __syncthreads precedes the first wgmma on the new Q (finish_q_load).
//
// Shared memory: Q 72 KB + 2 x 72 KB K stages + P 8 KB + row max / sums 1 KB + barriers
// = 230,456 B (+1 KB alignment slack = 231,480 B of the 232,448 B limit).
#include <cuda_runtime.h>

#include <cstdint>

#include "decode_common.h"
#include "schedules.h"
#include "wgmma.h"

namespace jax_flashmla {
namespace hopper {

template <bool kBf16>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_hopper_kernel(const __grid_constant__ KvTensorMaps kv_maps,
                             const __grid_constant__ MlaDecodeParams p) {
  using Mma = Wgmma<kBf16>;

  const int tid = threadIdx.x;
  const int wg = tid / kWarpgroupThreads;   // 0 or 1: which 256 output columns
  const int wtid = tid % kWarpgroupThreads;
  const int warp = wtid / 32;               // warp within the warpgroup: rows 16*warp..+15
  const int lane = tid % 32;
  const int g = lane / 4;                   // accumulator row within the warp's 16 (and +8)
  const int q4 = lane % 4;                  // accumulator column pair within each 8-col chunk
  const int tile_m = blockIdx.x;
  const int kvh = blockIdx.y;
  const int part = blockIdx.z;

  Partition pt;
  if (!read_partition(p, part, pt)) return;  // uniform: no work

  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t base_addr = (raw_addr + kSmemAlign - 1) & ~static_cast<uint32_t>(kSmemAlign - 1);
  uint8_t* smem = smem_raw + (base_addr - raw_addr);
  const uint32_t q_addr = base_addr + kSmemQ;
  const uint32_t k_addr = base_addr + kSmemK;
  const uint32_t bar_addr = base_addr + kSmemBar;
  uint32_t* release = reinterpret_cast<uint32_t*>(smem + kSmemRelease);

  if (tid == 0) {
    prefetch_tensor_map(&kv_maps.v_half);
    prefetch_tensor_map(&kv_maps.rope);
#pragma unroll
    for (int i = 0; i < kNumKStages * kLoadGroups; ++i) mbar_init(bar_addr + i * 8, 1);
    release[0] = 0;
    release[1] = 0;
    mbar_init_fence();
  }
  __syncthreads();  // barriers initialised and visible before anyone arrives or waits

  // ---- producer state (leader threads only) and prologue: pages 0 and 1 -> stages 0, 1 ----
  const bool leader = wtid == 0;
  LoadCursor cur{0, 0, 0};
  uint64_t policy = 0;
  if (leader) {
    policy = page_load_policy();
    cur = cursor_begin(p, pt);
#pragma unroll
    for (int st = 0; st < kNumKStages; ++st) {
      if (cursor_has_page(cur)) {
        if (wg == 0)
          issue_groups(kv_maps, p, cur, st, kWholePage, k_addr, bar_addr, kvh, policy);
        cursor_advance(cur, p, pt);
      }
    }
  }

  // ---- per-thread row bookkeeping (accumulator rows r = 16*warp + g + 8*i, i = 0, 1) ----
  const RowInfo ri = row_info(p, tile_m, warp, g);
  const bool causal = p.causal && p.seqlen_q > 1;
  const float scale_log2 = p.scale_log2;
  const int cap = p.max_pages_per_seq * kPageSize;

  const uint64_t desc_q = make_smem_desc(q_addr, 16, 1024);

  int k = 0;  // index of the current page in the CTA's flat page stream
  // Q of the first sequence; each later sequence's Q is copied in while the one before finishes.
  start_q_load(p, pt.begin_seq, kvh, tile_m, q_addr, tid, kThreads);
  for (int s = pt.begin_seq; s <= pt.end_seq; ++s) {
    const int len_raw = __ldg(p.seqlens + s);
    const bool malformed = len_raw < 0 || len_raw > cap;
    const int len = min(max(len_raw, 0), cap);
    const int lo = seq_lo(pt, s);
    const int hi = s == pt.end_seq ? min(pt.end_token, len) : len;
    // Exclusive key limit of each row: tokens [lo, lim) are visible (hi bounds the piece; the
    // causal bound is bottom-right aligned). tile_lim lower-bounds lim over all rows.
    int lim[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) lim[i] = causal ? min(hi, len - p.seqlen_q + 1 + ri.t_q[i]) : hi;
    const int tile_lim = causal ? min(hi, len - p.seqlen_q + 1) : hi;

    finish_q_load();              // Q of sequence s is in smem, visible to every wgmma
    bool next_q_started = false;  // uniform over the CTA

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};  // running max of raw scores (unscaled)
    float l_run[2] = {0.f, 0.f};              // this thread's partial row sums (own 16 cols)
    bool poisoned[2] = {false, false};        // row saw a token of an unreadable page

    const int page_begin = lo / kPageSize;
    const int page_end = (hi + kPageSize - 1) / kPageSize;
    for (int page = page_begin; page < page_end; ++page, ++k) {
      const int stage = k & 1;
      const uint32_t parity = (k >> 1) & 1;
      const uint32_t kst = k_addr + stage * kTileBytes;
      const bool page_ok = readable(p, block_table_row(p, s, page));
      const int base = page * kPageSize;  // first token of the page

      if (page_ok) {
        constexpr int kSChunks = kSColsPerWarpgroup / 8;  // 8-column accumulator chunks
        const int col0 = wg * kSColsPerWarpgroup;       // this warpgroup's tokens of the page

        // ---- S = Q K^T (k = 576): 9 boxes x 4 k16-steps, each box once its TMA landed ----
        // B = token rows col0..col0+31 of each K box (row r at r*128 bytes; col0*128 is a
        // multiple of 1024, so the swizzle phase is unchanged).
        float sacc[kSColsPerWarpgroup / 2];
#pragma unroll
        for (int i = 0; i < kSColsPerWarpgroup / 2; ++i) sacc[i] = 0.f;
        const uint64_t desc_k = make_smem_desc(kst + col0 * 128, 16, 1024);
        fence_regs(sacc);
#pragma unroll
        for (int box = 0; box < kNumBoxesQK; ++box) {
          if (first_box_of_group(box)) {
            mbar_wait(group_barrier(bar_addr, stage, load_group_of_box(box)), parity);
            // The wait is a loop (control flow) between wgmmas: fence here, as ptxas would
            // otherwise inject it itself (C7519); the first one also orders the sacc writes.
            wgmma_fence();
          }
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const uint32_t off = box * kBoxBytes + kk * 32;
            Mma::qk32(sacc, desc_advance(desc_q, off), desc_advance(desc_k, off),
                      (box | kk) != 0 ? 1 : 0);
          }
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(sacc);

        // ---- zero V rows past the sequence end (own V boxes only) before P V reads them ----
        // Made visible to this warpgroup's P V by fence.proxy.async + barrier Y.
        const bool tail = base + kPageSize > hi;
        if (tail) {
          zero_tail_rows(kst + wg * kBoxesPerWarpgroupV * kBoxBytes,
                         kBoxesPerWarpgroupV, hi - base, wtid);
          fence_proxy_async_smem();
        }

        // ---- masking (only on pages that reach past some row's limit) ----
        if (base + kPageSize > tile_lim) {
#pragma unroll
          for (int j = 0; j < kSChunks; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = base + col0 + 8 * j + 2 * q4 + (e & 1);
              if (col >= lim[e >> 1]) sacc[4 * j + e] = -INFINITY;
            }
          }
        }

        // ---- row maxima of the page: own half, then the other warpgroup's through smem ----
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < kSChunks; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], sacc[4 * j + e]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // the 4 threads of a quad hold the row's columns
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        }
        // Barrier X: both halves written. Reuse hazard: the next page's writes happen after
        // barrier Y of this page, i.e. after both reads.
        float* row_max = reinterpret_cast<float*>(smem + kSmemRowMax);
        if (q4 == 0) {
#pragma unroll
          for (int i = 0; i < 2; ++i) row_max[wg * kBlockM + warp * 16 + g + 8 * i] = mx[i];
        }
        named_barrier_sync(kCtaBarrierId, kThreads);  // X
#pragma unroll
        for (int i = 0; i < 2; ++i)
          mx[i] = fmaxf(mx[i], row_max[(wg ^ 1) * kBlockM + warp * 16 + g + 8 * i]);

        // Past X both warpgroups' S wgmmas of this page have completed: on the sequence's last
        // page Q is no longer read, so the next sequence's Q copies in behind this page's
        // softmax, P V and the epilogue instead of in front of the next sequence's first S.
        if (page == page_end - 1 && s < pt.end_seq) {
          start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);
          next_q_started = true;
        }

        // ---- online softmax (fp32, exp2 with the scale folded in) ----
        float alpha[2];
        float msub[2];
        bool max_moved = false;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float m_new = fmaxf(m_run[i], mx[i]);
          max_moved = max_moved || m_new != m_run[i];
          // A row with no visible key so far keeps m = -inf; subtract 0 then so that
          // exp2(-inf - (-inf)) never happens: masked scores give exp2(-inf) = 0.
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          alpha[i] = fast_exp2((m_run[i] - m_use) * scale_log2);  // m_run = -inf -> 0
          m_run[i] = m_new;
          msub[i] = m_use * scale_log2;
        }
        float rsum[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < kSChunks; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pv = fast_exp2(fmaf(sacc[4 * j + e], scale_log2, -msub[e >> 1]));
            sacc[4 * j + e] = pv;
            rsum[e >> 1] += pv;
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) l_run[i] = l_run[i] * alpha[i] + rsum[i];
        // alpha is exactly 1 for a row whose max did not move (exp2(0) = 1): skip the 128
        // multiplies when that holds for all 16 rows of the warp, as on most pages of a long
        // sequence once its largest scores have been seen. Warp-uniform branch.
        if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
          for (int j = 0; j < 32; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[4 * j + e] *= alpha[e >> 1];
          }
        }

        // ---- P (16-bit) -> smem tile, K-major and 128B-swizzled like a TMA box: element
        // (r, c) at r*128 + ((c/8) ^ (r%8))*16 + (c%8)*2. Each thread stores column pairs;
        // within a warp the 8 rows hit 8 distinct 16-byte slots: conflict-free.
        uint8_t* p_tile = smem + kSmemP;
#pragma unroll
        for (int j = 0; j < kSChunks; ++j) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int r = warp * 16 + g + 8 * i;
            const int chunk = (col0 >> 3) + j;
            *reinterpret_cast<uint32_t*>(p_tile + r * 128 + ((chunk ^ (r & 7)) << 4) + q4 * 4) =
                pack2<kBf16>(sacc[4 * j + 2 * i], sacc[4 * j + 2 * i + 1]);
          }
        }
        fence_proxy_async_smem();                     // P (and V tail zeros) -> async proxy
        named_barrier_sync(kCtaBarrierId, kThreads);  // Y: both halves of P are in smem

        // ---- O[:, 256*wg .. +255] += P V, A = P from smem (K-major, +32 B per k-step) ----
        const uint32_t v_addr = kst + wg * kBoxesPerWarpgroupV * kBoxBytes;
        const uint64_t desc_p = make_smem_desc(base_addr + kSmemP, 16, 1024);
        wgmma_fence();  // o was rescaled by ordinary instructions
        fence_regs(o);
#pragma unroll
        for (int s2 = 0; s2 < 4; ++s2) {
#ifndef JFM_HOPPER_PV_N64
          // One m64n256k16: 4 boxes along N (LBO = 8192), tokens 16*s2.. (2048 B per step).
          Mma::pv256_ss(o, desc_advance(desc_p, s2 * 32),
                        make_smem_desc(v_addr + s2 * 2048, kBoxBytes, 1024));
#else
#pragma unroll
          for (int b4 = 0; b4 < kBoxesPerWarpgroupV; ++b4)
            Mma::pv64_ss(*reinterpret_cast<float(*)[32]>(o + 32 * b4),
                         desc_advance(desc_p, s2 * 32),
                         make_smem_desc(v_addr + b4 * kBoxBytes + s2 * 2048, kBoxBytes, 1024));
#endif
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);
      } else {
        // Unreadable page: complete our view of the stage's phase, skip the math, and poison
        // every row that would have seen one of its tokens.
#pragma unroll
        for (int group = 0; group < kLoadGroups; ++group)
          mbar_wait(group_barrier(bar_addr, stage, group), parity);
#pragma unroll
        for (int i = 0; i < 2; ++i) poisoned[i] = poisoned[i] || base < lim[i];
      }

      // ---- release the stage; the second warpgroup to release it loads page k + 2 ----
      named_barrier_sync(1 + wg, kWarpgroupThreads);  // all of this WG is done with the stage
      if (leader) {
        __threadfence_block();
        const uint32_t old = atomicAdd(&release[stage], 1u);
        if (cursor_has_page(cur)) {
          if (old & 1u) {
            __threadfence_block();
            issue_groups(kv_maps, p, cur, stage, kWholePage, k_addr, bar_addr, kvh, policy);
          }
          cursor_advance(cur, p, pt);
        }
      }
    }

    // ---- epilogue: normalise and write this sequence's piece ----
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    }
    // Each warpgroup summed only its own 32 columns of every page (with identical rescale
    // factors), so the row sum is the sum of the two. The buffer is rewritten only after the
    // next sequence's finish_q_load barrier, i.e. after both reads.
    float* row_sum = reinterpret_cast<float*>(smem + kSmemRowSum);
    if (q4 == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) row_sum[wg * kBlockM + warp * 16 + g + 8 * i] = l_run[i];
    }
    named_barrier_sync(kCtaBarrierId, kThreads);
#pragma unroll
    for (int i = 0; i < 2; ++i) l_run[i] += row_sum[(wg ^ 1) * kBlockM + warp * 16 + g + 8 * i];
    // Every thread has left the page loop, so no wgmma reads Q any more: if the last page did not
    // start the next sequence's Q (no readable page), start it now, behind the output stores.
    if (!next_q_started && s < pt.end_seq)
      start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);
    const bool nan_row[2] = {malformed || poisoned[0], malformed || poisoned[1]};
    write_piece<kBf16>(p, pt, s, kvh, ri, o, l_run, m_run, nan_row, wg * kColsPerWarpgroup, q4,
                       wg == 0);
  }
}

cudaError_t launch_split_scores(const KvTensorMaps& kv_maps, const MlaDecodeParams& params,
                                bool bf16, dim3 grid, cudaStream_t stream) {
  auto kernel = bf16 ? mla_decode_hopper_kernel<true> : mla_decode_hopper_kernel<false>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(kv_maps, params);
  return cudaGetLastError();
}

}  // namespace hopper
}  // namespace jax_flashmla
