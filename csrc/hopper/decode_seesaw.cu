// Hopper (sm_90a) MLA paged-decode kernel, seesaw schedule: the two warpgroups work out of
// phase, so one's softmax runs while the other's wgmmas keep the tensor cores busy.
//
// Contract, grid and CTA shape as in decode_hopper.cu (split S). Pages of a sequence's piece are
// taken in pairs (c, d); an odd piece ends with a half pair (c alone). Warpgroup w keeps O's
// columns 256w..256w+255 for every page, so each P·V is split by columns; the scores are not
// split: WG0 computes the whole S of page c, WG1 the whole S of page d (wgmma m64n64k16, N = 64
// reads Q and K at the shared-memory rate the tensor cores need; the split-S schedule's N = 32
// does not).
//
// One pair (m = running row maxima of raw scores, identical in both warpgroups at pair ends):
//   WG0: S_c | m_c = max(m, rowmax S_c), P_c | store P_c, m_c; arrive A | O_L *= e^(m - m_c),
//        O_L += P_c V_c,L | sync B | O_L *= e^(m_c - m_d) | O_L += P_d V_d,L
//   WG1: S_d | sync A | m_d = max(m_c, rowmax S_d), P_d | store P_d, m_d; arrive B |
//        O_R *= e^(m - m_c), O_R += P_c V_c,R | O_R *= e^(m_c - m_d), O_R += P_d V_d,R
// (exp in base 2 with the softmax scale folded in). WG1's scores overlap WG0's softmax, WG0's
// first P·V overlaps WG1's softmax, and WG1's P·V overlaps WG0's rescale: the tensor cores
// always have queued work from one warpgroup while the other does CUDA-core work. Both P·V
// take P from registers (wgmma RS); P crosses to the other warpgroup through the page's RoPE
// box (box 8, read only by that page's S, so free once S is done) in the register-fragment
// order: thread t of one warpgroup writes exactly what thread t of the other reads. Row sums
// are kept per warpgroup (WG0 sums the c pages, WG1 the d pages, each rescaled with its own O)
// and added in the epilogue.
//
// Pipeline ordering and synchronisation:
//   * full barrier [stage][box], count 1, parity (k / 2) & 1 for the k-th page of the CTA's flat
//     page stream (stage k % 2), as in decode_hopper.cu. A page's owner waits all nine boxes
//     for S, the other warpgroup waits its four V boxes before its P·V.
//   * a stage is re-armed box group by box group as soon as its last reader is done, by the
//     leader thread of the warpgroup that reads it last: warpgroup w's four V boxes after w's
//     P·V of the page, the RoPE box (holding P) after the non-owner has P in registers. The
//     owner's scores read its own V half first, then the RoPE box, then the other half (other
//     orders measured no faster; kernel-notes.md). Causality makes the single releaser safe:
//     the other warpgroup's reads of a group (the owner's S) precede the hand-off that the
//     releaser waited for. Each leader advances its copy of the load cursor once per page.
//   * named barriers A (kFirstPageReadyId) and B (kSecondPageReadyId): the producer
//     arrives, the consumer syncs, 256 threads each. A warpgroup cannot arrive twice at one
//     before the other synced it: between two A's, WG0 syncs B (which WG1 arrives after its
//     A), and a half pair ends the sequence with the epilogue barrier. The same argument keeps
//     the row-max slots (one per pair position) from being overwritten while still read. In
//     the PTX memory model a bar.arrive synchronises with the bar.sync that completes the
//     barrier, which orders the P and row-max stores before the other warpgroup's loads;
//     compute-sanitizer's racecheck does not model bar.arrive and reports these hand-offs.
//   * a warpgroup-wide barrier (id 1 + wg) precedes every release, so that all of the
//     warpgroup's threads passed their wgmma wait (or their P load) first; it also publishes
//     the zeroing of V rows a P·V must not multiply (tokens past the sequence end; every row of
//     an unreadable page, whose P is 0 but whose stage holds stale data), done by each
//     warpgroup in its own V half before its P·V, after fence.proxy.async.
//   * Q: the next sequence's copies start, each warpgroup copying half the chunks, once the
//     warpgroup knows both scores of the last pair are done (WG0 after B, WG1 after A; after
//     S_c for a half pair, where WG1 reads no Q). finish_q_load completes them.
//
// Shared memory: Q 72 KB + 2 x 72 KB K stages + row maxima / sums 1 KB + barriers + the two
// load cursors = 222,376 B (+1 KB alignment slack).
#include <cuda_runtime.h>

#include <cstdint>

#include "decode_common.h"
#include "schedules.h"
#include "wgmma.h"

namespace jax_flashmla {
namespace hopper {
namespace {

constexpr int kPageScores = kBlockN / 2;  // fp32 registers per thread for a 64 x 64 S
constexpr int kPFragRegs = kBlockN / 4;   // 32-bit registers per thread for a 64 x 64 P

// S = Q K^T for the 64 tokens of a page (k = 576, 9 boxes x 4 k16 steps), each box as soon as
// its TMA landed; the warpgroup's own V half first, then the RoPE box, then the other half.
template <bool kBf16>
__device__ __forceinline__ void page_scores(float (&s)[kPageScores], uint64_t desc_q,
                                            uint32_t stage_addr, uint32_t bars, uint32_t parity,
                                            int own_half) {
  const uint64_t desc_k = make_smem_desc(stage_addr, 16, 1024);
#pragma unroll
  for (int i = 0; i < kPageScores; ++i) s[i] = 0.f;
  fence_regs(s);
#pragma unroll
  for (int step = 0; step < kNumBoxesQK; ++step) {
    const int box = step < kBoxesPerWarpgroupV       ? own_half * kBoxesPerWarpgroupV + step
                    : step == kBoxesPerWarpgroupV    ? seesaw::kRopeBox
                                                     : (1 - own_half) * kBoxesPerWarpgroupV +
                                                        step - kBoxesPerWarpgroupV - 1;
    mbar_wait(bars + box * 8, parity);
    // The wait is a loop between wgmmas: fence here, as ptxas would otherwise insert it.
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t off = box * kBoxBytes + kk * 32;
      Wgmma<kBf16>::qk64(s, desc_advance(desc_q, off), desc_advance(desc_k, off),
                         (step | kk) != 0 ? 1 : 0);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(s);
}

// Scores of an unreadable page: all masked (its rows are poisoned instead).
__device__ __forceinline__ void masked_scores(float (&s)[kPageScores]) {
#pragma unroll
  for (int i = 0; i < kPageScores; ++i) s[i] = -INFINITY;
}

// Masks the columns at or past each row's key limit (only called on pages that need it).
__device__ __forceinline__ void mask_scores(float (&s)[kPageScores], int base, const int (&lim)[2],
                                            int q4) {
#pragma unroll
  for (int j = 0; j < kPageScores / 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (base + 8 * j + 2 * q4 + (e & 1) >= lim[e >> 1]) s[4 * j + e] = -INFINITY;
    }
  }
}

// Row maxima of the page over the quad of threads that holds each row.
__device__ __forceinline__ void page_row_max(const float (&s)[kPageScores], float (&mx)[2]) {
  mx[0] = mx[1] = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPageScores / 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[4 * j + e]);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
  }
}

// The value subtracted from a row's scaled scores: a row with no visible key so far keeps
// m = -inf; subtract 0 then, so that exp2(-inf - (-inf)) never happens (masked scores give
// exp2(-inf) = 0).
__device__ __forceinline__ float max_offset(float m, float scale_log2) {
  return (m == -INFINITY ? 0.f : m) * scale_log2;
}

// Rescale factor from reference max `from` to reference max `to` (to >= from): exactly 1 when
// the max did not move (the difference is taken before scaling, so it is exactly 0), 0 when
// `from` is -inf.
__device__ __forceinline__ float rescale_factor(float from, float to, float scale_log2) {
  return fast_exp2((from - (to == -INFINITY ? 0.f : to)) * scale_log2);
}

// P = exp2(S * scale - offset) in place; returns this thread's part of the row sums.
__device__ __forceinline__ void exponentiate(float (&s)[kPageScores], const float (&offset)[2],
                                             float scale_log2, float (&rsum)[2]) {
  rsum[0] = rsum[1] = 0.f;
#pragma unroll
  for (int j = 0; j < kPageScores / 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pv = fast_exp2(fmaf(s[4 * j + e], scale_log2, -offset[e >> 1]));
      s[4 * j + e] = pv;
      rsum[e >> 1] += pv;
    }
  }
}

// Packs P (accumulator layout) into the wgmma A fragment of its four k16 steps: step v covers
// tokens 16v..16v+15, i.e. accumulator chunks 2v and 2v + 1. Register r of a step is on row
// r % 2 of the thread's two.
template <bool kBf16>
__device__ __forceinline__ void pack_p(const float (&s)[kPageScores], uint32_t (&a)[kPFragRegs]) {
#pragma unroll
  for (int v = 0; v < 4; ++v) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int idx = 4 * (2 * v + (r >> 1)) + 2 * (r & 1);
      a[4 * v + r] = pack2<kBf16>(s[idx], s[idx + 1]);
    }
  }
}

// P hand-off through a RoPE box, in fragment order: 16-byte vector v of thread t at
// (v * 128 + t) * 16, so each warp's access is 512 contiguous bytes (no bank conflicts).
__device__ __forceinline__ void store_p(uint32_t box, const uint32_t (&a)[kPFragRegs], int wtid) {
#pragma unroll
  for (int v = 0; v < kPFragRegs / 4; ++v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(
                     box + (v * kWarpgroupThreads + wtid) * 16),
                 "r"(a[4 * v]), "r"(a[4 * v + 1]), "r"(a[4 * v + 2]), "r"(a[4 * v + 3])
                 : "memory");
  }
}
// Loads a page's P; an unreadable page has none (its P V multiplies zeros then).
__device__ __forceinline__ void load_p(bool readable_page, uint32_t box,
                                       uint32_t (&a)[kPFragRegs], int wtid) {
  if (!readable_page) {
#pragma unroll
    for (int i = 0; i < kPFragRegs; ++i) a[i] = 0u;
    return;
  }
#pragma unroll
  for (int v = 0; v < kPFragRegs / 4; ++v) {
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a[4 * v]), "=r"(a[4 * v + 1]), "=r"(a[4 * v + 2]), "=r"(a[4 * v + 3])
                 : "r"(box + (v * kWarpgroupThreads + wtid) * 16)
                 : "memory");
  }
}

// O[:, this warpgroup's 256 columns] += P V for one page (4 k16 steps of m64n256k16, P from
// registers, V = this warpgroup's four V boxes read MN-major), committed as one group.
template <bool kBf16>
__device__ __forceinline__ void issue_pv(float (&o)[128], uint32_t (&a)[kPFragRegs],
                                         uint32_t v_addr) {
  wgmma_fence();  // o and a were written by ordinary instructions
  fence_regs(o);
  fence_regs(a);
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    // 4 boxes along N (LBO = one box), tokens 16v.. (2048 bytes per k16 step).
    Wgmma<kBf16>::pv256_rs(o, a + 4 * v, make_smem_desc(v_addr + v * 2048, kBoxBytes, 1024));
  }
}

// Waits for this warpgroup's V half of a page, then, if `zero`, zeroes its rows from
// `first_past_end` on (made visible to the wgmmas by the fence here and a warpgroup barrier).
__device__ __forceinline__ void prepare_v_half(uint32_t stage_addr, uint32_t bars,
                                               uint32_t parity, int wg, int wtid, bool zero,
                                               int first_past_end) {
#pragma unroll
  for (int b = 0; b < kBoxesPerWarpgroupV; ++b)
    mbar_wait(bars + (wg * kBoxesPerWarpgroupV + b) * 8, parity);
  if (zero) {
    zero_tail_rows(stage_addr + wg * kBoxesPerWarpgroupV * kBoxBytes, kBoxesPerWarpgroupV,
                   first_past_end, wtid);
    fence_proxy_async_smem();
    named_barrier_sync(1 + wg, kWarpgroupThreads);
  }
}

template <bool kBf16>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_seesaw_kernel(const __grid_constant__ CUtensorMap kv_map,
                             const __grid_constant__ MlaDecodeParams p) {
  const int tid = threadIdx.x;
  // 0 or 1: which 256 output columns, which page of a pair. Broadcast from lane 0 so that the
  // compiler knows it is warp-uniform: the two warpgroups run different code, and wgmmas in a
  // branch it considers divergent would be serialised (ptxas C7520).
  const int wg = __shfl_sync(0xffffffffu, tid / kWarpgroupThreads, 0);
  const int wtid = tid % kWarpgroupThreads;
  const int warp = wtid / 32;              // warp within the warpgroup: rows 16*warp..+15
  const int lane = tid % 32;
  const int g = lane / 4;
  const int q4 = lane % 4;
  const int tile_m = blockIdx.x;
  const int kvh = blockIdx.y;

  Partition pt;
  if (!read_partition(p, blockIdx.z, pt)) return;  // uniform: no work

  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t base_addr = (raw_addr + kSmemAlign - 1) & ~static_cast<uint32_t>(kSmemAlign - 1);
  uint8_t* smem = smem_raw + (base_addr - raw_addr);
  const uint32_t q_addr = base_addr + kSmemQ;
  const uint32_t k_addr = base_addr + kSmemK;
  const uint32_t bar_addr = base_addr + seesaw::kSmemBar;

  if (tid == 0) {
    prefetch_tensor_map(&kv_map);
#pragma unroll
    for (int i = 0; i < kNumKStages * kNumBoxesQK; ++i) mbar_init(bar_addr + i * 8, 1);
    mbar_init_fence();
  }
  __syncthreads();  // barriers initialised and visible before anyone arrives or waits

  // Load cursors (leader threads only) and the prologue: pages 0 and 1 -> stages 0 and 1.
  // Each leader's load cursor lives in shared memory: only the leader touches it, a few times
  // per page, and registers are the scarce resource here.
  const bool leader = wtid == 0;
  LoadCursor& cur = reinterpret_cast<LoadCursor*>(smem + seesaw::kSmemCursors)[wg];
  if (leader) {
    cur = cursor_begin(p, pt);
#pragma unroll
    for (int st = 0; st < kNumKStages; ++st) {
      if (cursor_has_page(cur)) {
        if (wg == 0)
          issue_boxes(&kv_map, p, cur, st, 0, kNumBoxesQK, k_addr, bar_addr, kvh,
                      page_load_policy());
        cursor_advance(cur, p, pt);
      }
    }
  }
  // Re-arms `count` boxes from `first` of `stage` for the cursor's page (leader only).
  auto reload = [&](int stage, int first, int count) {
    if (leader && cursor_has_page(cur))
      issue_boxes(&kv_map, p, cur, stage, first, count, k_addr, bar_addr, kvh,
                  page_load_policy());
  };
  auto next_page = [&]() {
    if (leader && cursor_has_page(cur)) cursor_advance(cur, p, pt);
  };

  const int row0 = warp * 16 + g;  // this thread's rows in the tile: row0 and row0 + 8
  constexpr uint32_t kRow8 = 8 * 4;  // byte distance of row0 + 8 from row0 in an fp32 row array
  // Row maxima [pair position][row] (fp32): this thread's slot of the first position.
  const uint32_t max_first = base_addr + seesaw::kSmemRowMax + row0 * 4;
  constexpr uint32_t kToSecond = kBlockM * 4;  // from a pair-position-0 slot to its position 1
  const bool causal = p.causal && p.seqlen_q > 1;
  const float scale_log2 = p.scale_log2;
  const int cap = p.max_pages_per_seq * kPageSize;
  const uint64_t desc_q = make_smem_desc(q_addr, 16, 1024);
  const uint32_t v_half = wg * kBoxesPerWarpgroupV * kBoxBytes;  // this warpgroup's V boxes

  int k = 0;  // flat stream index of the current pair's first page
  start_q_load(p, pt.begin_seq, kvh, tile_m, q_addr, tid, kThreads);
  for (int s = pt.begin_seq; s <= pt.end_seq; ++s) {
    const int len_raw = __ldg(p.seqlens + s);
    const bool malformed = len_raw < 0 || len_raw > cap;
    const int len = min(max(len_raw, 0), cap);
    const int lo = seq_lo(pt, s);
    const int hi = s == pt.end_seq ? min(pt.end_token, len) : len;
    // Exclusive key limit of each row (tokens [lo, lim) visible; causal is bottom-right
    // aligned); tile_lim lower-bounds lim over all rows.
    int lim[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int t_q = (tile_m * kBlockM + row0 + 8 * i) / p.heads_per_kv;
      lim[i] = causal ? min(hi, len - p.seqlen_q + 1 + t_q) : hi;
    }
    const int tile_lim = causal ? min(hi, len - p.seqlen_q + 1) : hi;

    finish_q_load();  // Q of sequence s is in smem, visible to every wgmma
    const bool more_seqs = s < pt.end_seq;

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};  // this warpgroup's share of the row sums (own pages)
    // NaN rows: a malformed length, or a visible token on an unreadable page.
    bool poisoned[2] = {malformed, malformed};

    const int page_begin = lo / kPageSize;
    const int page_end = (hi + kPageSize - 1) / kPageSize;
    for (int first = page_begin; first < page_end; first += 2) {
      const bool pair = first + 1 < page_end;
      const bool last_pair = first + 2 >= page_end;
      const int base_c = first * kPageSize;
      const int base_d = base_c + kPageSize;
      const bool ok_c = readable(p, block_table_row(p, s, first));
      const bool ok_d = pair && readable(p, block_table_row(p, s, first + 1));
#pragma unroll
      for (int i = 0; i < 2; ++i)
        poisoned[i] = poisoned[i] || (!ok_c && base_c < lim[i]) ||
                      (pair && !ok_d && base_d < lim[i]);
      const int stage_c = k & 1;
      const int stage_d = stage_c ^ 1;
      const uint32_t parity_c = (k >> 1) & 1;
      const uint32_t parity_d = ((k + 1) >> 1) & 1;
      const uint32_t kst_c = k_addr + stage_c * kTileBytes;
      const uint32_t kst_d = k_addr + stage_d * kTileBytes;
      const uint32_t bars_c = bar_addr + stage_c * kNumBoxesQK * 8;
      const uint32_t bars_d = bar_addr + stage_d * kNumBoxesQK * 8;
      const uint32_t p_box_c = kst_c + seesaw::kRopeBox * kBoxBytes;  // P_c after S_c
      const uint32_t p_box_d = kst_d + seesaw::kRopeBox * kBoxBytes;
      // The page holding the piece's end has garbage rows past it (zeroed before P V).
      const bool tail_c = !pair && base_c + kPageSize > hi;
      const bool tail_d = pair && base_d + kPageSize > hi;
      // P V runs on every page, also unreadable ones (P = 0 there): a wgmma under a condition
      // between the releases makes ptxas serialise all of them (C7520). The V rows it reads
      // must then be finite: past the end of a tail page, and all rows of an unloaded page (a
      // stale or never-written stage), are zeroed first.
      const int zero_from_c = ok_c ? hi - base_c : 0;
      const int zero_from_d = ok_d ? hi - base_d : 0;

      if (wg == 0) {
        // ---- page c: scores, softmax, hand P_c and m_c to WG1, own half of P_c V_c ----
        float sc[kPageScores];
        if (ok_c) {
          page_scores<kBf16>(sc, desc_q, kst_c, bars_c, parity_c, 0);
        } else {
          masked_scores(sc);
        }
        if (base_c + kPageSize > tile_lim) mask_scores(sc, base_c, lim, q4);
        float mx[2];
        page_row_max(sc, mx);
        float m_c[2], alpha[2], offset[2], rsum[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          m_c[i] = fmaxf(m_run[i], mx[i]);
          alpha[i] = rescale_factor(m_run[i], m_c[i], scale_log2);
          offset[i] = max_offset(m_c[i], scale_log2);
        }
        exponentiate(sc, offset, scale_log2, rsum);
        uint32_t pc[kPFragRegs];
        pack_p<kBf16>(sc, pc);
        if (ok_c) store_p(p_box_c, pc, wtid);
        if (q4 == 0) {
          st_shared_f32(max_first, m_c[0]);
          st_shared_f32(max_first + kRow8, m_c[1]);
        }
        named_barrier_arrive(seesaw::kFirstPageReadyId, kThreads);  // A
        if (!pair && more_seqs) {  // half pair: WG1 reads no Q; S_c, the last reader, is done
          start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);  // this WG's half
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) l_run[i] = l_run[i] * alpha[i] + rsum[i];
        scale_rows(o, alpha);
        if (tail_c || !ok_c) prepare_v_half(kst_c, bars_c, parity_c, wg, wtid, true, zero_from_c);
        issue_pv<kBf16>(o, pc, kst_c + v_half);
        wgmma_commit();
        if (pair) {
          // ---- page d: WG1's max and P, then own half of P_d V_d ----
          named_barrier_sync(seesaw::kSecondPageReadyId, kThreads);  // B
          const float m_d[2] = {ld_shared_f32(max_first + kToSecond),
                                ld_shared_f32(max_first + kToSecond + kRow8)};
          wgmma_wait<0>();  // P_c V_c,L done (P_c's registers are free again)
          fence_regs(o);
          fence_regs(pc);
          if (last_pair && more_seqs) {  // S_c (own) and S_d (before B) are done
            start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);  // this WG's half
          }
          uint32_t pd[kPFragRegs];
          load_p(ok_d, p_box_d, pd, wtid);
          named_barrier_sync(1 + wg, kWarpgroupThreads);
          reload(stage_c, 0, kBoxesPerWarpgroupV);  // page c's V half 0 -> page c + 2
          next_page();
          reload(stage_d, seesaw::kRopeBox, 1);  // page d's RoPE box (P_d is in registers) -> d + 2
          float beta[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            beta[i] = rescale_factor(m_c[i], m_d[i], scale_log2);
            l_run[i] *= beta[i];
            m_run[i] = m_d[i];
          }
          scale_rows(o, beta);
          prepare_v_half(kst_d, bars_d, parity_d, wg, wtid, tail_d || !ok_d, zero_from_d);
          issue_pv<kBf16>(o, pd, kst_d + v_half);
          wgmma_commit();
          wgmma_wait<0>();  // P_d V_d,L done
          fence_regs(o);
          named_barrier_sync(1 + wg, kWarpgroupThreads);
          reload(stage_d, 0, kBoxesPerWarpgroupV);  // page d's V half 0 -> page d + 2
          next_page();
        } else {
          wgmma_wait<0>();
          fence_regs(o);
          named_barrier_sync(1 + wg, kWarpgroupThreads);
          reload(stage_c, 0, kBoxesPerWarpgroupV);
          next_page();
#pragma unroll
          for (int i = 0; i < 2; ++i) m_run[i] = m_c[i];
        }
      } else {
        // ---- page d: scores while WG0 does page c's softmax ----
        float sd[kPageScores];
        float mx[2] = {-INFINITY, -INFINITY};
        if (pair) {
          if (ok_d) {
            page_scores<kBf16>(sd, desc_q, kst_d, bars_d, parity_d, 1);
          } else {
            masked_scores(sd);
          }
          if (base_d + kPageSize > tile_lim) mask_scores(sd, base_d, lim, q4);
          page_row_max(sd, mx);
        }
        named_barrier_sync(seesaw::kFirstPageReadyId, kThreads);  // A
        const float m_c[2] = {ld_shared_f32(max_first), ld_shared_f32(max_first + kRow8)};
        // O_R goes to m_c for P_c V_c,R and then to m_d for P_d V_d,R: P_c stays as WG0
        // rounded it (its largest entry exactly 1), as the split-S schedule's P does. Scaling
        // P_c to m_d instead would round it twice, heavy entries included.
        float m_d[2], alpha[2], beta[2], offset[2];
        float rsum[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          m_d[i] = fmaxf(m_c[i], mx[i]);
          alpha[i] = rescale_factor(m_run[i], m_c[i], scale_log2);
          beta[i] = rescale_factor(m_c[i], m_d[i], scale_log2);
          offset[i] = max_offset(m_d[i], scale_log2);
        }
        uint32_t pd[kPFragRegs];
        if (pair) {  // first P_d and m_d, which WG0 waits for, then P_c
          exponentiate(sd, offset, scale_log2, rsum);
          pack_p<kBf16>(sd, pd);
          if (ok_d) store_p(p_box_d, pd, wtid);
          if (q4 == 0) {
            st_shared_f32(max_first + kToSecond, m_d[0]);
            st_shared_f32(max_first + kToSecond + kRow8, m_d[1]);
          }
          named_barrier_arrive(seesaw::kSecondPageReadyId, kThreads);  // B
        }
        uint32_t pc[kPFragRegs];
        load_p(ok_c, p_box_c, pc, wtid);
        if (last_pair && more_seqs) {  // S_c (before A) and S_d (own) are done
          start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);  // this WG's half
        }
        // P_c is in registers: page c's RoPE box can take page c + 2's.
        fence_proxy_async_smem();
        named_barrier_sync(1 + wg, kWarpgroupThreads);
        reload(stage_c, seesaw::kRopeBox, 1);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          l_run[i] = l_run[i] * alpha[i] * beta[i] + rsum[i];
          m_run[i] = m_d[i];
        }
        scale_rows(o, alpha);
        prepare_v_half(kst_c, bars_c, parity_c, wg, wtid, tail_c || !ok_c, zero_from_c);
        if (pair) prepare_v_half(kst_d, bars_d, parity_d, wg, wtid, tail_d || !ok_d, zero_from_d);
        issue_pv<kBf16>(o, pc, kst_c + v_half);
        wgmma_commit();
        wgmma_wait<0>();  // unconditional: a wait under `if (pair)` would serialise (C7520)
        fence_regs(o);
        if (pair) {
          scale_rows(o, beta);
          issue_pv<kBf16>(o, pd, kst_d + v_half);
          wgmma_commit();
        }
        // Both pages' V halves are released only once both P V are done: releasing page c's
        // between them puts the leader's load code under the in-flight P_d V_d, and ptxas then
        // serialises every wgmma of the kernel (C7518).
        wgmma_wait<0>();
        fence_regs(o);
        named_barrier_sync(1 + wg, kWarpgroupThreads);
        reload(stage_c, kBoxesPerWarpgroupV, kBoxesPerWarpgroupV);  // V half 1 -> page c + 2
        next_page();
        if (pair) {
          reload(stage_d, kBoxesPerWarpgroupV, kBoxesPerWarpgroupV);  // -> page d + 2
          next_page();
        }
      }
      k += pair ? 2 : 1;
    }

    // ---- epilogue: add the two warpgroups' row sums, normalise, write the piece ----
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    }
    // Row sums [warpgroup][row] (fp32). Rewritten only after the next sequence's finish_q_load
    // barrier, i.e. after both reads.
    const uint32_t sum_own = base_addr + seesaw::kSmemRowSum + (wg * kBlockM + row0) * 4;
    const uint32_t sum_other = base_addr + seesaw::kSmemRowSum + ((wg ^ 1) * kBlockM + row0) * 4;
    if (q4 == 0) {
      st_shared_f32(sum_own, l_run[0]);
      st_shared_f32(sum_own + kRow8, l_run[1]);
    }
    named_barrier_sync(seesaw::kEpilogueBarrierId, kThreads);
    l_run[0] += ld_shared_f32(sum_other);
    l_run[1] += ld_shared_f32(sum_other + kRow8);
    // A piece without pages read no Q: start the next one now, behind the output stores.
    if (page_begin == page_end && more_seqs)
      start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);
    write_piece<kBf16>(p, pt, s, kvh, row_info(p, tile_m, warp, g), o, l_run, m_run, poisoned,
                       wg * kColsPerWarpgroup, q4, wg == 0);
  }
}

}  // namespace

cudaError_t launch_seesaw(const CUtensorMap& kv_map, const MlaDecodeParams& params, bool bf16,
                          dim3 grid, cudaStream_t stream) {
  auto kernel = bf16 ? mla_decode_seesaw_kernel<true> : mla_decode_seesaw_kernel<false>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, seesaw::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, seesaw::kSmemBytes, stream>>>(kv_map, params);
  return cudaGetLastError();
}

}  // namespace hopper
}  // namespace jax_flashmla
