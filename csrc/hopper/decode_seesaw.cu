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
// One pair (m = running row maxima of raw scores, identical in both warpgroups at pair ends;
// exp in base 2 with the softmax scale folded in):
//   WG0: [S_c done] m_c = max(m, rowmax S_c), P_c -> own P tile; arrive A | O_L *= e^(m - m_c),
//        O_L += P_c V_c,L | sync B | O_L *= e^(m_c - m_d), O_L += P_d V_d,L |
//        next pair's S_c (arrive D once queued)
//   WG1: [S_d done] sync A | m_d = max(m_c, rowmax S_d), P_c e^(m_c - m_d) from WG0's P tile into
//        registers, P_d -> page d's RoPE box; arrive B | O_R *= e^(m - m_d), O_R += P_c V_c,R,
//        then P_d V_d,R (both P from registers) | sync D | next pair's S_d
// So on the tensor cores: S_c, S_d (under WG0's softmax), P_c V_c,L (under WG1's softmax),
// P_c V_c,R, then P_d V_d,R and P_d V_d,L, the next S_c and S_d. P_c V_c,R comes first so that
// page c's last boxes are re-armed one P V earlier: the next S_c waits for them (measured 3-6%
// faster than P_d V_d,R first, which had WG1 wait for WG0 to scale P_c into shared memory).
// The next pair's scores are issued at the end of the pair, right behind its last P·V, and
// waited for there (nothing is in flight across the loop's back edge, where ptxas could not
// prove the branches uniform). WG0 issues the next S_c in two commit groups: the boxes of its
// own V half (loaded long ago), then, once the P_d V_d,L before them is done and page d's boxes
// are re-armed, the rest (the boxes WG1 frees last). D makes WG1's S_d queue behind S_c, so that
// S_c finishes first and WG0's softmax overlaps S_d; without D both finish late (measured: no
// faster).
// WG1's half of P_c is P_c times e^(m_c - m_d), rounded once more where the maximum moved (as
// FlashMLA does; measured accuracy equal to the split-S schedule's, kernel-notes.md). WG0's P·V
// read P from shared memory (wgmma SS), WG1's from registers (RS): 247 registers, no spill. Row
// sums are kept per warpgroup (each rescaled with its own O) and added in the epilogue.
//
// Pipeline ordering and synchronisation:
//   * full barrier [stage][load group] (V half 0, V half 1, RoPE box), count 1, parity (k / 2) & 1
//     for the k-th page of the CTA's flat page stream (stage k % 2), as in decode_hopper.cu. A
//     page's owner waits all three groups for S, the other warpgroup waits its V half before
//     its P·V. The next pair's pages use the same stages as this pair's (k + 2, k + 3): the
//     pair body is compiled once per stage of c, so every shared-memory address in it is a
//     compile-time offset.
//   * a stage is re-armed load group by load group as soon as its last reader is done, by the
//     leader thread of the warpgroup that reads it last: page c's V half 0 by WG0 after
//     P_c V_c,L; page c's V half 1 and RoPE box by WG1 after P_c V_c,R (with P_d V_d,R still in
//     flight); page d's V half 1 by WG1 after P_d V_d,R; page d's V half 0 and RoPE box (P_d)
//     by WG0 after P_d V_d,L, while its next S_c is in flight. Causality makes the single
//     releaser safe: the other warpgroup's reads of a group precede the hand-off that the
//     releaser waited for (page c's RoPE box: S_c, before A). Each leader advances its copy of
//     the load cursor once per page, c before d.
//   * named barriers A (kFirstPageReadyId: m_c, P_c), B (kSecondPageReadyId: m_d, P_d) and
//     D (kScoresQueuedId: the next S_c is queued): the producer arrives, the consumer syncs, 256
//     threads each. A warpgroup cannot arrive twice at one before the other synced it: each is
//     used once per pair, and every arrival of the next pair follows a sync of this pair's
//     barrier that the other warpgroup reaches only after its own sync (A: after B; B: after A;
//     D: after B). The same argument keeps the row-max slots (one per pair position) and the P
//     tiles from being overwritten while still read: WG1 reads WG0's P tile before it arrives
//     at B, and WG0 rewrites it only after B. In the PTX memory model a bar.arrive synchronises
//     with the bar.sync that completes the barrier, which orders the accesses before it with the
//     other warpgroup's after it (fence.proxy.async first where wgmmas read them);
//     compute-sanitizer's racecheck does not model bar.arrive and reports these hand-offs.
//   * a warpgroup-wide barrier (id 1 + wg) precedes every release and every P·V from a P tile
//     the warpgroup wrote, so that all of its threads passed their wgmma wait or their stores
//     first; it also publishes the zeroing of V rows a P·V must not multiply (tokens past the
//     sequence end; every row of an unreadable page, whose P is 0 but whose stage holds stale
//     data), done by each warpgroup in its own V half before its P·V, after fence.proxy.async.
//   * Q: the next sequence's copies start, each warpgroup copying half the chunks, once the
//     warpgroup knows both scores of the last pair are done (WG0 after B and its P_c V_c,L,
//     WG1 after its last P·V; WG0 after A for a half pair, where WG1 reads no Q).
//     finish_q_load completes them.
//
// Shared memory: Q 72 KB + 2 x 72 KB K stages + WG0's P tile 8 KB + row maxima / sums 1 KB +
// barriers + the two load cursors = 230,480 B (+1 KB alignment slack).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "decode_common.h"
#include "p_tile.h"
#include "smem_matrix.h"
#include "schedules.h"
#include "wgmma.h"

namespace jax_flashmla {
namespace hopper {
namespace {

constexpr int kPageScores = kBlockN / 2;  // fp32 registers per thread for a 64 x 64 S

// Issues steps [kFirstStep, kEndStep) of S = Q K^T for the 64 tokens of the page in K stage
// kStage (k = 576: 9 boxes of 4 k16 steps, one step per box here) as one commit group, each load
// group as soon as its TMA landed, in the order: half kOwnHalf of V, the RoPE box, the other
// half. The caller waits for the commit group. Every operand address is a compile-time offset
// from the shared-memory base, so the descriptors are one uniform register plus immediates (with
// the stage a runtime value, ptxas rebuilt each in ordinary registers: ~8 instructions and ~6
// live registers per wgmma).
template <bool kBf16, int kStage, int kOwnHalf, int kFirstStep = 0, int kEndStep = kNumBoxesQK>
__device__ __forceinline__ void issue_page_scores(float (&s)[kPageScores], uint64_t desc_base,
                                                  uint32_t bar_addr, uint32_t parity) {
  static_assert(kFirstStep == 0 || kFirstStep == kBoxesPerWarpgroupV,
                "a commit group starts at the first box of a load group");
  if constexpr (kFirstStep == 0) {
#pragma unroll
    for (int i = 0; i < kPageScores; ++i) s[i] = 0.f;
  }
  fence_regs(s);
#pragma unroll
  for (int step = kFirstStep; step < kEndStep; ++step) {
    const int box = step < kBoxesPerWarpgroupV       ? kOwnHalf * kBoxesPerWarpgroupV + step
                    : step == kBoxesPerWarpgroupV    ? seesaw::kRopeBox
                                                     : (1 - kOwnHalf) * kBoxesPerWarpgroupV +
                                                        step - kBoxesPerWarpgroupV - 1;
    if (first_box_of_group(box)) {
      mbar_wait(group_barrier(bar_addr, kStage, load_group_of_box(box)), parity);
      // The wait is a loop between wgmmas: fence here, as ptxas would otherwise insert it.
      wgmma_fence();
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t off = box * kBoxBytes + kk * 32;
      Wgmma<kBf16>::qk64(s, desc_advance(desc_base, kSmemQ + off),
                         desc_advance(desc_base, kSmemK + kStage * kTileBytes + off),
                         (step | kk) != 0 ? 1 : 0);
    }
  }
  wgmma_commit();
}

// Calls body(std::integral_constant<int, stage>()) for a K stage known only at run time, so that
// the body's shared-memory offsets are compile-time constants. `stage` must be warp-uniform in a
// way ptxas can see (e.g. from __shfl_sync): wgmmas in a branch it considers divergent are
// serialised (C7520).
template <typename Body>
__device__ __forceinline__ void with_stage(int stage, Body&& body) {
  static_assert(kNumKStages == 2, "one branch per K stage");
  if (stage == 0) {
    body(std::integral_constant<int, 0>());
  } else {
    body(std::integral_constant<int, 1>());
  }
}

// Scores of an unreadable page (either warpgroup's): all masked, its rows are poisoned instead.
// Its load groups were completed by plain arrivals; the RoPE group is waited all the same, so that
// every phase of every group is consumed before the group is re-armed (the V halves are waited
// before their P V).
template <int kStage>
__device__ __forceinline__ void unreadable_page_scores(float (&s)[kPageScores], uint32_t bar_addr,
                                                       uint32_t parity) {
#pragma unroll
  for (int i = 0; i < kPageScores; ++i) s[i] = -INFINITY;
  mbar_wait(group_barrier(bar_addr, kStage, kGroupRope), parity);
}

// WG0: S of a pair's first page into s, announcing to WG1 (barrier D) once it is queued, so that
// WG1's scores of the second page queue behind it. `while_in_flight` runs as soon as every
// earlier wgmma group of the warpgroup (a P V) is done, with the first V half's part of the scores
// in flight (those boxes were loaded long ago; the rest may still be waiting for their TMA): it
// must not touch s. `once_queued` runs once every wgmma of the scores is issued, while they run.
template <bool kBf16, int kStage, typename Release, typename Queued>
__device__ __forceinline__ void first_page_scores(float (&s)[kPageScores], bool readable_page,
                                                  uint64_t desc_base, uint32_t bar_addr,
                                                  uint32_t parity, Release&& while_in_flight,
                                                  Queued&& once_queued) {
  if (readable_page) {
    issue_page_scores<kBf16, kStage, 0, 0, kBoxesPerWarpgroupV>(s, desc_base, bar_addr, parity);
    wgmma_wait<1>();
    while_in_flight();
    issue_page_scores<kBf16, kStage, 0, kBoxesPerWarpgroupV>(s, desc_base, bar_addr, parity);
    named_barrier_arrive(seesaw::kScoresQueuedId, kThreads);  // D
    once_queued();
    wgmma_wait<0>();
    fence_regs(s);
  } else {
    unreadable_page_scores<kStage>(s, bar_addr, parity);
    named_barrier_arrive(seesaw::kScoresQueuedId, kThreads);  // D
    wgmma_wait<0>();
    while_in_flight();
    once_queued();
  }
}

// WG1: S of a pair's second page into s, queued behind WG0's first page (barrier D).
template <bool kBf16, int kStage>
__device__ __forceinline__ void second_page_scores(float (&s)[kPageScores], bool readable_page,
                                                   uint64_t desc_base, uint32_t bar_addr,
                                                   uint32_t parity) {
  named_barrier_sync(seesaw::kScoresQueuedId, kThreads);  // D
  if (readable_page) {
    issue_page_scores<kBf16, kStage, 1>(s, desc_base, bar_addr, parity);
    wgmma_wait<0>();
    fence_regs(s);
  } else {
    unreadable_page_scores<kStage>(s, bar_addr, parity);
  }
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

// The two 16-bit values of a packed pair, as fp32 (exact).
template <bool kBf16>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  if constexpr (kBf16) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
}

// Loads the warp's rows of P tile `tile` as a wgmma A fragment (pack_p's layout), times
// factor[row]. A factor of exactly 1 (the usual case: the row maxima did not move) leaves P as it
// was stored, and where it is 1 on all of the warp's rows the products are skipped (they are on
// warpgroup 1's way to its P V); otherwise the product is rounded again.
template <bool kBf16>
__device__ __forceinline__ void load_scaled_p_tile(uint32_t tile, const float (&factor)[2],
                                                   int warp, int lane,
                                                   uint32_t (&a)[kPFragRegs]) {
  const bool scale = __any_sync(0xffffffffu, factor[0] != 1.f || factor[1] != 1.f);
#pragma unroll
  for (int v = 0; v < kPFragRegs / 4; ++v) {
    uint32_t step[4];
    ldmatrix_x4(step, p_tile_row(tile, warp, lane, v));
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (scale) {
        const float2 pair = unpack2<kBf16>(step[r]);
        a[4 * v + r] = pack2<kBf16>(pair.x * factor[r & 1], pair.y * factor[r & 1]);
      } else {
        a[4 * v + r] = step[r];
      }
    }
  }
}

// O[:, this warpgroup's 256 columns] += P V for one page (4 k16 steps of m64n256k16, P from
// registers, V = this warpgroup's four V boxes read MN-major), not committed.
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

// O[:, this warpgroup's 256 columns] += P V with P from a P tile, not committed. It may follow a
// P V group still in flight on the same O: both are m64n256k16, and the hardware keeps wgmmas of
// one shape on one accumulator in order.
template <bool kBf16>
__device__ __forceinline__ void issue_pv_from_tile(float (&o)[128], uint32_t p_tile,
                                                   uint32_t v_addr) {
  wgmma_fence();  // o may have been rescaled by ordinary instructions
  fence_regs(o);
  const uint64_t desc_p = make_smem_desc(p_tile, 16, 1024);
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    // A: tokens 16v.. of the K-major P tile (+32 bytes per k16 step); B as in issue_pv.
    Wgmma<kBf16>::pv256_ss(o, desc_advance(desc_p, v * 32),
                           make_smem_desc(v_addr + v * 2048, kBoxBytes, 1024));
  }
}

// Waits for this warpgroup's V half of the page in `stage`, then, if `zero`, zeroes its rows
// from `first_past_end` on (made visible to the wgmmas by the fence here and a warpgroup
// barrier).
__device__ __forceinline__ void prepare_v_half(uint32_t stage_addr, uint32_t bar_addr, int stage,
                                               uint32_t parity, int wg, int wtid, bool zero,
                                               int first_past_end) {
  mbar_wait(group_barrier(bar_addr, stage, kGroupVHalf0 + wg), parity);
  if (zero) {
    zero_tail_rows(stage_addr + wg * kBoxesPerWarpgroupV * kBoxBytes, kBoxesPerWarpgroupV,
                   first_past_end, wtid);
    fence_proxy_async_smem();
    named_barrier_sync(1 + wg, kWarpgroupThreads);
  }
}

template <bool kBf16>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_seesaw_kernel(const __grid_constant__ KvTensorMaps kv_maps,
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
    prefetch_tensor_map(&kv_maps.v_half);
    prefetch_tensor_map(&kv_maps.rope);
#pragma unroll
    for (int i = 0; i < kNumKStages * kLoadGroups; ++i) mbar_init(bar_addr + i * 8, 1);
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
          issue_groups(kv_maps, p, cur, st, kWholePage, k_addr, bar_addr, kvh,
                       page_load_policy());
        cursor_advance(cur, p, pt);
      }
    }
  }
  // The warpgroup is done with the load groups `groups` of `stage` (every thread passed its
  // wgmma wait or its stores): once all of its threads are here, the leader re-arms them for the
  // cursor's page.
  auto release = [&](int stage, uint32_t groups) {
    named_barrier_sync(1 + wg, kWarpgroupThreads);
    if (leader && cursor_has_page(cur))
      issue_groups(kv_maps, p, cur, stage, groups, k_addr, bar_addr, kvh, page_load_policy());
  };
  auto next_page = [&]() {
    if (leader && cursor_has_page(cur)) cursor_advance(cur, p, pt);
  };

  const int row0 = warp * 16 + g;  // this thread's rows in the tile: row0 and row0 + 8
  constexpr uint32_t kRow8 = 8 * 4;  // byte distance of row0 + 8 from row0 in an fp32 row array
  // Row maxima [pair position][row] (fp32): this thread's slot of the first position.
  const uint32_t max_first = base_addr + seesaw::kSmemRowMax + row0 * 4;
  const uint32_t first_p_tile = base_addr + seesaw::kSmemFirstP;  // WG0's P of page c
  constexpr uint32_t kToSecond = kBlockM * 4;  // from a pair-position-0 slot to its position 1
  const bool causal = p.causal && p.seqlen_q > 1;
  const float scale_log2 = p.scale_log2;
  const int cap = p.max_pages_per_seq * kPageSize;
  // K-major operands of S (Q, K): one descriptor, advanced by compile-time offsets.
  const uint64_t desc_base = make_smem_desc(base_addr, 16, 1024);
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
    // NaN rows: a malformed length, or a visible token on an unreadable page. Pages come in
    // order, so a row is poisoned iff its key limit passes the first token of the piece's first
    // unreadable page: one running minimum per pair, decided per row in the epilogue (a per-row
    // update with branches here sat on both warpgroups' way from their scores to their softmax).
    int first_unreadable = INT_MAX;

    const int page_begin = lo / kPageSize;
    const int page_end = (hi + kPageSize - 1) / kPageSize;
    // Scores of this warpgroup's page of the current pair (WG0: the first page, WG1: the second).
    // Each pair's are computed at the end of the previous pair (or here, for the first), so that
    // they queue on the tensor cores right behind that pair's last P V.
    float sp[kPageScores];
    if (page_begin < page_end) {
      const bool pair = page_begin + 1 < page_end;
      with_stage(__shfl_sync(0xffffffffu, k & 1, 0), [&](auto stage_of_c) {
        constexpr int kStageC = decltype(stage_of_c)::value;
        if (wg == 0) {
          first_page_scores<kBf16, kStageC>(sp, readable(p, block_table_row(p, s, page_begin)),
                                            desc_base, bar_addr, (k >> 1) & 1, [] {}, [] {});
        } else if (pair) {
          second_page_scores<kBf16, kStageC ^ 1>(
              sp, readable(p, block_table_row(p, s, page_begin + 1)), desc_base, bar_addr,
              ((k + 1) >> 1) & 1);
        } else {
          named_barrier_sync(seesaw::kScoresQueuedId, kThreads);  // D
        }
      });
    }
    for (int first = page_begin; first < page_end; first += 2) {
      const bool pair = first + 1 < page_end;
      const bool last_pair = first + 2 >= page_end;
      const bool next_pair_full = first + 3 < page_end;  // the next pair has two pages
      const int base_c = first * kPageSize;
      const int base_d = base_c + kPageSize;
      const bool ok_c = readable(p, block_table_row(p, s, first));
      const bool ok_d = pair && readable(p, block_table_row(p, s, first + 1));
      first_unreadable =
          min(first_unreadable, !ok_c ? base_c : pair && !ok_d ? base_d : INT_MAX);
      const uint32_t parity_c = (k >> 1) & 1;
      const uint32_t parity_d = ((k + 1) >> 1) & 1;
      // The page holding the piece's end has garbage rows past it (zeroed before P V).
      const bool tail_c = !pair && base_c + kPageSize > hi;
      const bool tail_d = pair && base_d + kPageSize > hi;
      // P V runs on every page, also unreadable ones (P = 0 there): a wgmma under a condition
      // between the releases makes ptxas serialise all of them (C7520). The V rows it reads
      // must then be finite: past the end of a tail page, and all rows of an unloaded page (a
      // stale or never-written stage), are zeroed first.
      const int zero_from_c = ok_c ? hi - base_c : 0;
      const int zero_from_d = ok_d ? hi - base_d : 0;

      // The pair body is compiled once per stage of page c, so that every shared-memory address
      // in it is a compile-time offset from the base (fewer instructions and live registers).
      // k is the same in every thread; the broadcast lets ptxas see that (with_stage). The next
      // pair's pages use the same stages (with the other parity).
      with_stage(__shfl_sync(0xffffffffu, k & 1, 0), [&](auto stage_of_c) {
        constexpr int kStageC = decltype(stage_of_c)::value;
        constexpr int kStageD = kStageC ^ 1;
        const uint32_t kst_c = k_addr + kStageC * kTileBytes;
        const uint32_t kst_d = k_addr + kStageD * kTileBytes;
        const uint32_t p_box_d = kst_d + seesaw::kRopeBox * kBoxBytes;  // P_d for WG0 after S_d
        if (wg == 0) {
          // ---- softmax of page c (over WG1's scores of page d), m_c and P_c to WG1 (A) ----
          if (base_c + kPageSize > tile_lim) mask_scores(sp, base_c, lim, q4);
          float mx[2];
          page_row_max(sp, mx);
          float m_c[2], alpha[2], offset[2], rsum[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            m_c[i] = fmaxf(m_run[i], mx[i]);
            alpha[i] = rescale_factor(m_run[i], m_c[i], scale_log2);
            offset[i] = max_offset(m_c[i], scale_log2);
          }
          exponentiate(sp, offset, scale_log2, rsum);  // sp = P_c (relative to m_c)
          {
            uint32_t pc[kPFragRegs];
            pack_p<kBf16>(sp, pc);
            store_p_tile(first_p_tile, pc, warp, lane);
          }
          fence_proxy_async_smem();  // the P tile is read by wgmmas (async proxy)
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
          if (tail_c || !ok_c) {
            prepare_v_half(kst_c, bar_addr, kStageC, parity_c, wg, wtid, true, zero_from_c);
          } else {
            named_barrier_sync(1 + wg, kWarpgroupThreads);  // the whole P tile is stored
          }
          issue_pv_from_tile<kBf16>(o, first_p_tile, kst_c + v_half);  // O_L += P_c V_c,L
          wgmma_commit();
          // ---- m_d from WG1 (B) ----
          named_barrier_sync(seesaw::kSecondPageReadyId, kThreads);  // B
          const float m_d[2] = {ld_shared_f32(max_first + kToSecond),
                                ld_shared_f32(max_first + kToSecond + kRow8)};
          float beta[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            beta[i] = rescale_factor(m_c[i], m_d[i], scale_log2);
            l_run[i] *= beta[i];
            m_run[i] = m_d[i];
          }
          wgmma_wait<0>();  // P_c V_c,L done
          fence_regs(o);
          release(kStageC, group_bit(kGroupVHalf0));  // page c's V half 0 -> page c + 2
          if (last_pair && more_seqs && pair) {  // S_c and S_d (before B) are done
            start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);  // this WG's half
          }
          scale_rows(o, beta);
          if (pair) {
            // ---- O_L += P_d V_d,L, then (behind it) the next pair's S_c ----
            prepare_v_half(kst_d, bar_addr, kStageD, parity_d, wg, wtid, tail_d || !ok_d,
                           zero_from_d);
            issue_pv_from_tile<kBf16>(o, p_box_d, kst_d + v_half);
            wgmma_commit();
            // The cursor moves on to page d + 2 here, with P_d V_d,L queued: the leader's other
            // warps wait for it at its next wgmma, and that is the next pair's scores, which wait
            // for page c + 2's boxes anyway.
            next_page();
            // Page d's V half 0 and RoPE box (P_d) are free once P_d V_d,L is done.
            auto release_page_d = [&] {
              fence_regs(o);
              release(kStageD, group_bit(kGroupVHalf0) | group_bit(kGroupRope));  // -> page d + 2
            };
            if (!last_pair) {
              // The cursor moves on once the scores are queued, off the way to them.
              first_page_scores<kBf16, kStageC>(sp, readable(p, block_table_row(p, s, first + 2)),
                                                desc_base, bar_addr, parity_c ^ 1,
                                                release_page_d, next_page);
            } else {
              wgmma_wait<0>();
              release_page_d();
              next_page();
            }
          } else {
            next_page();  // half pair: page c's cursor step
          }
        } else {
          // ---- page d (scores done): softmax over WG0's P_c V_c,L, m_d and P_d to WG0 (B) ----
          float mx[2] = {-INFINITY, -INFINITY};
          if (pair) {
            if (base_d + kPageSize > tile_lim) mask_scores(sp, base_d, lim, q4);
            page_row_max(sp, mx);
          }
          named_barrier_sync(seesaw::kFirstPageReadyId, kThreads);  // A
          const float m_c[2] = {ld_shared_f32(max_first), ld_shared_f32(max_first + kRow8)};
          float m_d[2], gamma[2], offset[2], beta[2];
          float rsum[2] = {0.f, 0.f};
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            m_d[i] = fmaxf(m_c[i], mx[i]);
            gamma[i] = rescale_factor(m_run[i], m_d[i], scale_log2);
            offset[i] = max_offset(m_d[i], scale_log2);
            beta[i] = rescale_factor(m_c[i], m_d[i], scale_log2);
          }
          // WG0's P_c, relative to m_d like P_d: read before B, after which WG0 may overwrite its
          // P tile with the next pair's.
          uint32_t pc[kPFragRegs];
          load_scaled_p_tile<kBf16>(first_p_tile, beta, warp, lane, pc);
          uint32_t pd[kPFragRegs];
          if (pair) {
            exponentiate(sp, offset, scale_log2, rsum);
            pack_p<kBf16>(sp, pd);
            store_p_tile(p_box_d, pd, warp, lane);
            fence_proxy_async_smem();  // read by WG0's wgmmas (async proxy)
          }
          if (q4 == 0) {
            st_shared_f32(max_first + kToSecond, m_d[0]);
            st_shared_f32(max_first + kToSecond + kRow8, m_d[1]);
          }
          named_barrier_arrive(seesaw::kSecondPageReadyId, kThreads);  // B
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            l_run[i] = l_run[i] * gamma[i] + rsum[i];
            m_run[i] = m_d[i];
          }
          scale_rows(o, gamma);  // O_R now relative to m_d, for both pages' P V
          // ---- O_R += P_c V_c,R, then P_d V_d,R (both P from registers) ----
          // P_c's first, so that page c's last boxes are re-armed one P V earlier: the next S_c
          // waits for them. Each branch waits for its own wgmmas: one in flight across the merge
          // would make ptxas serialise them all (C7520).
          prepare_v_half(kst_c, bar_addr, kStageC, parity_c, wg, wtid, tail_c || !ok_c,
                         zero_from_c);
          issue_pv<kBf16>(o, pc, kst_c + v_half);
          wgmma_commit();
          if (pair) {
            prepare_v_half(kst_d, bar_addr, kStageD, parity_d, wg, wtid, tail_d || !ok_d,
                           zero_from_d);
            issue_pv<kBf16>(o, pd, kst_d + v_half);
            wgmma_commit();
            wgmma_wait<1>();  // P_c V_c,R done
            release(kStageC, group_bit(kGroupVHalf1) | group_bit(kGroupRope));  // -> page c + 2
            next_page();
            wgmma_wait<0>();
            fence_regs(o);
            release(kStageD, group_bit(kGroupVHalf1));  // V half 1 -> page d + 2
            next_page();
          } else {
            wgmma_wait<0>();
            fence_regs(o);
            release(kStageC, group_bit(kGroupVHalf1) | group_bit(kGroupRope));  // -> page c + 2
            next_page();
          }
          // The next sequence's Q: S_c (before A) and S_d were its last readers. Here rather
          // than right after A: P's registers are free now.
          if (last_pair && more_seqs) start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);
          // ---- the next pair's S_d, queued behind WG0's S_c ----
          if (next_pair_full) {
            second_page_scores<kBf16, kStageD>(sp, readable(p, block_table_row(p, s, first + 3)),
                                               desc_base, bar_addr, parity_d ^ 1);
          } else if (!last_pair) {
            // D (the next pair is a half pair)
            named_barrier_sync(seesaw::kScoresQueuedId, kThreads);
          }
        }
      });
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
    // A piece without pages read no Q: start the next one now, behind the output stores. (Also
    // when page_begin > page_end: a partition may begin past a too-long length's capacity.)
    if (page_begin >= page_end && more_seqs)
      start_q_load(p, s + 1, kvh, tile_m, q_addr, tid, kThreads);
    const bool poisoned[2] = {malformed || first_unreadable < lim[0],
                              malformed || first_unreadable < lim[1]};
    write_piece<kBf16>(p, pt, s, kvh, row_info(p, tile_m, warp, g), o, l_run, m_run, poisoned,
                       wg * kColsPerWarpgroup, q4, wg == 0);
  }
}

}  // namespace

cudaError_t launch_seesaw(const KvTensorMaps& kv_maps, const MlaDecodeParams& params, bool bf16,
                          dim3 grid, cudaStream_t stream) {
  auto kernel = bf16 ? mla_decode_seesaw_kernel<true> : mla_decode_seesaw_kernel<false>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, seesaw::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, seesaw::kSmemBytes, stream>>>(kv_maps, params);
  return cudaGetLastError();
}

}  // namespace hopper
}  // namespace jax_flashmla
