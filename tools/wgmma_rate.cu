// Tensor-core ceilings of the seesaw kernel's wgmma mix, without its softmax, barriers and page
// loads: how fast can the SMs run the instructions a page needs; does S with Q read from shared
// memory (m64n64k16, both operands in shared memory) lose throughput that Q in registers would
// not; how long a gap between a page's S and its P V the other warpgroup hides; and what bulk
// copies at the page-load rate cost on top. kernel-notes.md ("Session 10") has the numbers.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Icsrc \
//     -o /tmp/wgmma_rate tools/wgmma_rate.cu && /tmp/wgmma_rate        (needs an sm_90 GPU)
//
// One CTA per SM, two warpgroups (a third warp would cap registers at 168: 16K per SM
// sub-partition, three warps on one of them). Per iteration each warpgroup does what the seesaw
// asks of it per page: S of one 64 x 64 page (36 x m64n64k16, k = 576) and its 256 columns of
// P V for the two pages of a pair (8 x m64n256k16), then waits for them. Operands are zeros
// (wgmma timing does not depend on values). Reported: TFLOPS by CUDA events, best of three.
// coupled_kernel adds the seesaw's hand-offs between the warpgroups; lone_scores_kernel times one
// warpgroup's scores alone; softmax_under_wgmma_kernel times one warpgroup's softmax while the
// other runs wgmmas (cycles per page, from the SM clock).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "hopper/barrier.h"
#include "hopper/p_tile.h"
#include "hopper/traits.h"
#include "hopper/wgmma.h"

namespace jh = jax_flashmla::hopper;

namespace {

constexpr int kPagesPerRun = 512;
// Page loads are stood in for by bulk copies of a zeroed buffer: 4 x 36 KB per iteration (the two
// 72 KB pages of a pair), into the K tile and a scratch tile (overwriting K with the same zeros).
constexpr int kCopySlots = 4;
constexpr int kCopyBytes = 36 * 1024;
constexpr int kSmemQ = 0;
constexpr int kSmemK = jh::kTileBytes;
constexpr int kSmemP = 2 * jh::kTileBytes;
constexpr int kSmemScratch = kSmemP + 8192;
constexpr int kSmemBar = kSmemScratch + jh::kTileBytes;
constexpr int kSmemBytes = kSmemBar + 64 + 1024;  // + alignment slack

enum ScoreForm { kScoresFromSmem, kScoresFromRegisters, kNoScores };
enum ValueForm { kValuesMixed, kValuesFromRegisters, kNoValues };

// m64n64k16 with A (Q) from registers and B (K) K-major in shared memory.
__device__ __forceinline__ void qk64_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                        int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " JFM_WGMMA_D32_REGISTERS
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : JFM_WGMMA_D32_OPERANDS
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// The 1024-aligned base of dynamic shared memory, with everything below the barriers zeroed.
__device__ __forceinline__ uint32_t zeroed_shared_base(uint8_t* smem_raw) {
  const uint32_t raw = jh::smem_addr(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  for (int i = threadIdx.x; i < (kSmemBar + 64) / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(smem_raw + (base - raw))[i] = 0;
  return base;
}

__device__ __forceinline__ void zero_accumulators(float (&s)[32], float (&o)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
}

// A zero A fragment the compiler cannot see is constant (constants would be rematerialised into
// fresh registers per wgmma).
__device__ __forceinline__ void opaque_zeros(uint32_t (&a)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a[i] = 0;
    asm volatile("" : "+r"(a[i]));
  }
}

// Stores the accumulators' sum, so that the wgmmas writing them are not optimised away.
__device__ __forceinline__ void keep_alive(const float (&s)[32], const float (&o)[128],
                                           float* sink) {
  if (threadIdx.x != 0) return;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) sum += s[i];
#pragma unroll
  for (int i = 0; i < 128; ++i) sum += o[i];
  sink[blockIdx.x] = sum;
}

// Busy-waits `cycles` SM cycles: stands in for work between wgmmas (a softmax).
__device__ __forceinline__ void spin(int cycles) {
  const long long until = clock64() + cycles;
  while (clock64() < until) {
  }
}

// Byte offset of k16 step `step` of S (0..35) in a 64-row tile of Q or K: box step / 4, 32 bytes
// (16 columns) per step within the box.
__device__ __forceinline__ uint32_t score_step_offset(int step) {
  return (step / 4) * jh::kBoxBytes + (step % 4) * 32;
}

// S of one page (36 x m64n64k16, K from shared memory, Q from shared memory or as the A fragment
// a_q) as one commit group.
template <ScoreForm kScores>
__device__ __forceinline__ void issue_scores(float (&s)[32], uint64_t desc_base,
                                             const uint32_t (&a_q)[4]) {
  static_assert(kScores != kNoScores, "no scores to issue");
#pragma unroll
  for (int step = 0; step < 36; ++step) {
    const uint32_t off = score_step_offset(step);
    const uint64_t desc_k = jh::desc_advance(desc_base, kSmemK + off);
    if constexpr (kScores == kScoresFromSmem) {
      jh::Wgmma<true>::qk64(s, jh::desc_advance(desc_base, kSmemQ + off), desc_k, step != 0);
    } else {
      qk64_rs(s, a_q, desc_k, step != 0);
    }
  }
  jh::wgmma_commit();
}

// S of one page as two independent accumulator chains, issued alternately (steps 0-17 into s,
// 18-35 into s2), one commit group: if each wgmma waited for the previous one on its accumulator,
// one chain of short m64n64k16 would run at the chain's latency and two would run faster.
__device__ __forceinline__ void issue_scores_two_chains(float (&s)[32], float (&s2)[32],
                                                        uint64_t desc_base) {
#pragma unroll
  for (int i = 0; i < 18; ++i) {
#pragma unroll
    for (int chain = 0; chain < 2; ++chain) {
      const int step = i + 18 * chain;
      const uint32_t off = score_step_offset(step);
      jh::Wgmma<true>::qk64(chain == 0 ? s : s2, jh::desc_advance(desc_base, kSmemQ + off),
                            jh::desc_advance(desc_base, kSmemK + off), i != 0);
    }
  }
  jh::wgmma_commit();
}

// A warpgroup's 256 columns of P V for one page (4 x m64n256k16), P from the P tile or from
// registers, not committed.
template <bool kPFromSmem>
__device__ __forceinline__ void issue_page_values(float (&o)[128], const uint32_t (&a)[4],
                                                  uint32_t v_addr, uint64_t desc_p) {
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    const uint64_t desc_v = jh::make_smem_desc(v_addr + v * 2048, jh::kBoxBytes, 1024);
    if constexpr (kPFromSmem) {
      jh::Wgmma<true>::pv256_ss(o, jh::desc_advance(desc_p, v * 32), desc_v);
    } else {
      jh::Wgmma<true>::pv256_rs(o, a, desc_v);
    }
  }
}

template <ScoreForm kScores, ValueForm kValues>
__global__ void __launch_bounds__(256, 1)
    rate_kernel(const uint8_t* copy_src, size_t copy_span, int softmax_cycles, float* sink) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = zeroed_shared_base(smem_raw);
  const int tid = threadIdx.x;
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const uint32_t bar = base + kSmemBar;
  if (tid == 0) {
    for (int slot = 0; slot < kCopySlots; ++slot) jh::mbar_init(bar + 8 * slot, 1);
    jh::mbar_init_fence();
  }
  __syncthreads();

  const uint64_t desc_base_all = jh::make_smem_desc(base, 16, 1024);
  const uint64_t desc_p = jh::make_smem_desc(base + kSmemP, 16, 1024);
  float s[32];
  float o[128];
  uint32_t a[4];    // P V's A fragment (P)
  uint32_t a_q[4];  // S's A fragment (Q), when from registers
  zero_accumulators(s, o);
  opaque_zeros(a);
  opaque_zeros(a_q);
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  // Each warpgroup's loop is straight-line code of its own (a wgmma under a condition that
  // ptxas cannot prove uniform would be serialised), and nothing is in flight across its back
  // edge; the two warpgroups overlap each other's waits, as in the decode kernels.
  const bool copier = copy_src != nullptr && tid == 128;  // WG1's leader, as in the kernels
  const uint8_t* src = copy_src + blockIdx.x * copy_span;
  size_t offset = 0;
  auto pages = [&](auto first_p_from_smem) {
    for (int page = 0; page < kPagesPerRun; ++page) {
      if (copier) {
#pragma unroll
        for (int slot = 0; slot < kCopySlots; ++slot) {
          if (page > 0) jh::mbar_wait(bar + 8 * slot, (page - 1) & 1);
          jh::mbar_arrive_expect_tx(bar + 8 * slot, kCopyBytes);
          const uint32_t dst = base + (slot < 2 ? kSmemK : kSmemScratch) + (slot % 2) * kCopyBytes;
          bulk_copy(dst, src + offset, kCopyBytes, bar + 8 * slot);
          offset = (offset + kCopyBytes) % copy_span;
        }
      }
      // Opaque per page, so that ptxas derives each descriptor from one register instead of
      // hoisting all 36 (72 registers) out of the loop.
      uint64_t desc_base = desc_base_all;
      asm volatile("" : "+l"(desc_base));
      jh::wgmma_fence();
      if constexpr (kScores != kNoScores) issue_scores<kScores>(s, desc_base, a_q);
      if (softmax_cycles > 0) {  // a gap such as the softmax between a page's S and its P V
        jh::wgmma_wait<0>();
        spin(softmax_cycles);
        jh::wgmma_fence();  // after the loop, as ptxas would otherwise insert it (C7519)
      }
      if constexpr (kValues != kNoValues) {  // the two pages of a pair, on the same V boxes
        const uint32_t v_addr = base + kSmemK + wg * 4 * jh::kBoxBytes;
        issue_page_values<decltype(first_p_from_smem)::value>(o, a, v_addr, desc_p);
        issue_page_values<false>(o, a, v_addr, desc_p);
        jh::wgmma_commit();
      }
      jh::wgmma_wait<0>();
      jh::fence_regs(s);
      jh::fence_regs(o);
    }
    if (copier) {
#pragma unroll
      for (int slot = 0; slot < kCopySlots; ++slot)
        jh::mbar_wait(bar + 8 * slot, (kPagesPerRun - 1) & 1);
    }
  };
  if (wg == 0) {
    pages(std::integral_constant<bool, kValues == kValuesMixed>());
  } else {
    pages(std::false_type());
  }
  keep_alive(s, o, sink);
}

// Warpgroup 0 alone runs S page after page, as one accumulator chain or two (WG1 idles): the
// rate one warpgroup's scores get when the other warpgroup issues nothing, and whether a chain of
// dependent m64n64k16 is held back by its own latency (on an H100 it is not: 880 TFLOPS either
// way, kernel-notes.md, session 11).
template <int kChains>
__global__ void __launch_bounds__(256, 1) lone_scores_kernel(float* sink) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = zeroed_shared_base(smem_raw);
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);
  __syncthreads();
  float s[32], s2[32], o[128];
  zero_accumulators(s, o);
#pragma unroll
  for (int i = 0; i < 32; ++i) s2[i] = 0.f;
  if (wg == 0) {
    for (int page = 0; page < kPagesPerRun; ++page) {
      uint64_t desc = jh::make_smem_desc(base, 16, 1024);
      asm volatile("" : "+l"(desc));
      jh::wgmma_fence();
      if constexpr (kChains == 1) {
        uint32_t unused[4] = {0, 0, 0, 0};
        issue_scores<kScoresFromSmem>(s, desc, unused);
      } else {
        issue_scores_two_chains(s, s2, desc);
      }
      jh::wgmma_wait<0>();
      jh::fence_regs(s);
      jh::fence_regs(s2);
    }
  }
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] += s2[i];
  keep_alive(s, o, sink);
}

// The seesaw's coupling without its arithmetic or page loads: per pair the same wgmmas as the
// kernel (WG0: S of page c, P_c V_c,L and P_d V_d,L from shared memory; WG1: S of page d, both
// P V from registers), the named barriers A, B and D where the kernel has them, and a spin of
// `softmax_cycles` where each warpgroup's softmax is. Compared with rate_kernel's free-running
// warpgroups, it shows what the schedule's hand-offs cost by themselves.
__global__ void __launch_bounds__(256, 1) coupled_kernel(int softmax_cycles, float* sink) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = zeroed_shared_base(smem_raw);
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0);
  __syncthreads();
  constexpr int kBarrierA = 2, kBarrierB = 3, kBarrierD = 4;  // 1: the start below
  const uint64_t desc_p = jh::make_smem_desc(base + kSmemP, 16, 1024);
  const uint32_t v_half = base + kSmemK + wg * 4 * jh::kBoxBytes;
  float s[32];
  float o[128];
  uint32_t a[4];
  zero_accumulators(s, o);
  opaque_zeros(a);
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  auto opaque_desc = [&] {  // see rate_kernel
    uint64_t desc = jh::make_smem_desc(base, 16, 1024);
    asm volatile("" : "+l"(desc));
    return desc;
  };
  if (wg == 0) {
    jh::wgmma_fence();
    issue_scores<kScoresFromSmem>(s, opaque_desc(), a);  // the first pair's S_c
    asm volatile("bar.arrive %0, 256;\n" ::"r"(kBarrierD) : "memory");
    jh::wgmma_wait<0>();
    for (int pair = 0; pair < kPagesPerRun; ++pair) {
      jh::fence_regs(s);
      spin(softmax_cycles);  // softmax of page c
      asm volatile("bar.arrive %0, 256;\n" ::"r"(kBarrierA) : "memory");
      jh::wgmma_fence();
      issue_page_values<true>(o, a, v_half, desc_p);  // P_c V_c,L
      jh::wgmma_commit();
      asm volatile("bar.sync %0, 256;\n" ::"r"(kBarrierB) : "memory");
      jh::wgmma_wait<0>();
      jh::fence_regs(o);
      jh::wgmma_fence();
      issue_page_values<true>(o, a, v_half + jh::kTileBytes / 2, desc_p);  // P_d V_d,L
      jh::wgmma_commit();
      // The next pair's S_c (one spare at the end).
      issue_scores<kScoresFromSmem>(s, opaque_desc(), a);
      asm volatile("bar.arrive %0, 256;\n" ::"r"(kBarrierD) : "memory");
      jh::wgmma_wait<0>();
      jh::fence_regs(o);
    }
  } else {
    for (int pair = 0; pair < kPagesPerRun; ++pair) {
      asm volatile("bar.sync %0, 256;\n" ::"r"(kBarrierD) : "memory");
      jh::wgmma_fence();
      issue_scores<kScoresFromSmem>(s, opaque_desc(), a);  // S_d, behind S_c
      jh::wgmma_wait<0>();
      jh::fence_regs(s);
      asm volatile("bar.sync %0, 256;\n" ::"r"(kBarrierA) : "memory");
      spin(softmax_cycles);  // softmax of page d
      asm volatile("bar.arrive %0, 256;\n" ::"r"(kBarrierB) : "memory");
      jh::wgmma_fence();
      issue_page_values<false>(o, a, v_half, desc_p);  // P_c V_c,R
      issue_page_values<false>(o, a, v_half + jh::kTileBytes / 2, desc_p);  // P_d V_d,R
      jh::wgmma_commit();
      jh::wgmma_wait<0>();
      jh::fence_regs(o);
    }
    asm volatile("bar.sync %0, 256;\n" ::"r"(kBarrierD) : "memory");  // the spare S_c's D
  }
  keep_alive(s, o, sink);
}

// What a softmax costs one warpgroup while the other keeps the tensor cores busy. Warpgroup 0
// times kSoftmaxReps softmax steps of one 64 x 64 page, each depending on the last, as the seesaw
// runs them (row maxima over the quad, 32 exponentials and the row sums, P packed to bf16 and
// stored as a P tile with stmatrix, fence.proxy.async). Warpgroup 1 meanwhile idles, runs S page
// after page (36 x m64n64k16 with Q and K in shared memory as in the kernel, or Q from registers),
// runs P V (m64n256k16, P from registers), or runs dependent FMAs (no tensor-core work: what
// sharing the issue slots costs by itself), for longer than warpgroup 0's timing.
constexpr int kSoftmaxReps = 256;
constexpr int kBusyGroups = 1024;  // ~1M cycles of tensor-core work, several times the timed part
enum Busy { kBusyNone, kBusyScores, kBusyScoresQInRegisters, kBusyValues, kBusyAlu };
// How the softmax step is done: as the kernel does it; its exponentials by a polynomial on the
// FMA pipe (all, or every other one) instead of the MUFU; without the P tile's stores and fence;
// without the shuffles of the row maxima.
enum SoftmaxForm {
  kSoftmaxAsKernel,
  kExpPolynomial,
  kExpHalfPolynomial,
  kSoftmaxNoStores,
  kSoftmaxNoShuffles
};

// 2^x on the FMA and integer pipes (no MUFU), for the x <= 0 of a softmax: round x to n, a degree-5
// polynomial for 2^(x - n) on [-0.5, 0.5] (Taylor, relative error < 4e-6), n added to the
// exponent bits. x is clamped at -126 (the result is then ~1e-38, not 0: a kernel would have to
// map -inf to 0 itself).
__device__ __forceinline__ float exp2_polynomial(float x) {
  constexpr float kRoundingShift = 12582912.f;  // 1.5 * 2^23: x + it rounds x to an integer
  x = fmaxf(x, -126.f);
  const float shifted = x + kRoundingShift;
  const float f = x - (shifted - kRoundingShift);
  float p = 1.3333558e-3f;
  p = fmaf(p, f, 9.6181291e-3f);
  p = fmaf(p, f, 5.5504109e-2f);
  p = fmaf(p, f, 2.4022651e-1f);
  p = fmaf(p, f, 6.9314718e-1f);
  p = fmaf(p, f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(shifted) << 23));
}

template <Busy kBusy, SoftmaxForm kForm>
__global__ void __launch_bounds__(256, 1) softmax_under_wgmma_kernel(long long* cycles,
                                                                     float* sink) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = zeroed_shared_base(smem_raw);
  const int tid = threadIdx.x;
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int warp = (tid % 128) / 32;
  const int lane = tid % 32;
  __syncthreads();
  float s[32];
  float o[128];
  uint32_t a[4];
  zero_accumulators(s, o);
  opaque_zeros(a);
  if (wg == 1) {
    asm volatile("bar.arrive 1, 256;\n" ::: "memory");  // start: warpgroup 0 times from here
    const uint32_t v_half = base + kSmemK + 4 * jh::kBoxBytes;
    // A fixed count that outlasts warpgroup 0's timing (a flag read per iteration could differ
    // between the warps, and a wgmma that not all four warps issue is undefined).
    for (int group = 0; kBusy != kBusyNone && group < kBusyGroups; ++group) {
      uint64_t desc = jh::make_smem_desc(base, 16, 1024);
      asm volatile("" : "+l"(desc));
      jh::wgmma_fence();
      if constexpr (kBusy == kBusyScores) {
        issue_scores<kScoresFromSmem>(s, desc, a);
      } else if constexpr (kBusy == kBusyScoresQInRegisters) {
        issue_scores<kScoresFromRegisters>(s, desc, a);
      } else if constexpr (kBusy == kBusyAlu) {  // dependent FMAs, no tensor-core work
#pragma unroll 1
        for (int i = 0; i < 256; ++i) {
#pragma unroll
          for (int j = 0; j < 32; ++j) s[j] = fmaf(s[j], 0.999f, 1e-3f);
        }
      } else {
        issue_page_values<false>(o, a, v_half, desc);
        issue_page_values<false>(o, a, v_half, desc);
        jh::wgmma_commit();
      }
      jh::wgmma_wait<0>();
      jh::fence_regs(s);
      jh::fence_regs(o);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = static_cast<float>((tid * 7 + i * 13) % 61) * 0.25f;
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    const uint32_t p_tile = base + kSmemP;
    const float scale_log2 = 0.0625f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    const long long begin = clock64();
    for (int rep = 0; rep < kSoftmaxReps; ++rep) {
      jh::fence_regs(s);  // a fresh page's scores, as far as the compiler knows
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[4 * j + e]);
      }
      float offset[2], alpha[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (kForm != kSoftmaxNoShuffles) {
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        }
        const float m_new = fmaxf(m_run[i], mx[i]);
        alpha[i] = exp2f((m_run[i] - m_new) * scale_log2);
        offset[i] = m_new * scale_log2;
        m_run[i] = m_new;
      }
      float rsum[2] = {0.f, 0.f};
      uint32_t packed[jh::kPFragRegs];
#pragma unroll
      for (int j = 0; j < jh::kPFragRegs; ++j) {
        float pv[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = fmaf(s[2 * j + e], scale_log2, -offset[(j & 1)]);
          float y;
          if (kForm == kExpPolynomial || (kForm == kExpHalfPolynomial && e == 1)) {
            y = exp2_polynomial(x);
          } else {
            asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
          }
          pv[e] = y;
          rsum[j & 1] += y;
        }
        __nv_bfloat162 v = __floats2bfloat162_rn(pv[0], pv[1]);
        packed[j] = *reinterpret_cast<uint32_t*>(&v);
      }
      if (kForm != kSoftmaxNoStores) jh::store_p_tile(p_tile, packed, warp, lane);
      if (kForm != kSoftmaxNoStores) {
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      } else {
#pragma unroll
        for (int j = 0; j < jh::kPFragRegs; ++j) rsum[j & 1] += __uint_as_float(packed[j]) * 1e-30f;
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) l_run[i] = l_run[i] * alpha[i] + rsum[i];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] += l_run[i & 1] * 1e-9f;  // the next page depends on this
    }
    const long long end = clock64();
    if (tid == 0) cycles[blockIdx.x] = (end - begin) / kSoftmaxReps;
  }
  keep_alive(s, o, sink);
}

// Times `launch` (three runs, the best) for `flop` floating-point operations and prints TFLOPS.
template <typename Launch>
void time_case(const char* name, int gap_cycles, double flop, Launch&& launch) {
  cudaEvent_t begin, end;
  cudaEventCreate(&begin);
  cudaEventCreate(&end);
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    cudaEventRecord(begin);
    launch();
    cudaEventRecord(end);
    const cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
      std::printf("%s: %s\n", name, cudaGetErrorString(err));
      std::exit(1);
    }
    float ms = 0.f;
    cudaEventElapsedTime(&ms, begin, end);
    const double tflops = flop / (ms * 1e-3) / 1e12;
    if (tflops > best) best = tflops;
  }
  cudaEventDestroy(begin);
  cudaEventDestroy(end);
  std::printf("%-40s gap %4d cycles: %4.0f TFLOPS\n", name, gap_cycles, best);
}

template <ScoreForm kScores, ValueForm kValues>
void run_case(const char* name, const uint8_t* copy_src, size_t copy_span, int sms, float* sink,
              int softmax_cycles = 0) {
  auto kernel = rate_kernel<kScores, kValues>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  const double flop_s = kScores == kNoScores ? 0.0 : 36.0 * 2 * 64 * 64 * 16;
  const double flop_pv = kValues == kNoValues ? 0.0 : 8.0 * 2 * 64 * 256 * 16;
  const double flop = 2.0 * kPagesPerRun * (flop_s + flop_pv) * sms;  // two warpgroups per SM
  time_case(name, softmax_cycles, flop, [&] {
    kernel<<<sms, 256, kSmemBytes>>>(copy_src, copy_span, softmax_cycles, sink);
  });
}

// Runs softmax_under_wgmma_kernel three times and prints warpgroup 0's cycles per page (the mean
// over the SMs of the best run).
template <SoftmaxForm kForm, Busy kBusy>
void softmax_case(long long* cycles, float* sink, int sms) {
  static const char* const kFormNames[] = {"as the kernel", "exponentials by polynomial",
                                           "every other one by polynomial", "no P tile stores",
                                           "no shuffles"};
  static const char* const kBusyNames[] = {"idles", "runs S (Q, K in smem)",
                                           "runs S (Q in registers)", "runs P V (P in registers)",
                                           "runs FMAs (no wgmma)"};
  auto kernel = softmax_under_wgmma_kernel<kBusy, kForm>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  long long best = -1;
  for (int rep = 0; rep < 3; ++rep) {
    kernel<<<sms, 256, kSmemBytes>>>(cycles, sink);
    const cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
      std::printf("softmax case: %s\n", cudaGetErrorString(err));
      std::exit(1);
    }
    long long host[1024];
    cudaMemcpy(host, cycles, sms * sizeof(long long), cudaMemcpyDeviceToHost);
    long long sum = 0;
    for (int i = 0; i < sms; ++i) sum += host[i];
    if (best < 0 || sum / sms < best) best = sum / sms;
  }
  std::printf("softmax of one page, %-29s other warpgroup %-26s %5lld cycles\n",
              kFormNames[kForm], kBusyNames[kBusy], best);
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  const int sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs\n", prop.name, sms);
  float* sink = nullptr;
  cudaMalloc(&sink, sms * sizeof(float));
  const size_t hbm_span = 8u << 20;   // per CTA: 132 x 8 MB, far beyond L2
  const size_t l2_span = 128u << 10;  // per CTA: 16.5 MB in all, L2-resident
  uint8_t* src = nullptr;
  cudaMalloc(&src, sms * hbm_span);
  cudaMemset(src, 0, sms * hbm_span);

  run_case<kScoresFromSmem, kNoValues>("S only, Q from smem", nullptr, 0, sms, sink);
  run_case<kScoresFromRegisters, kNoValues>("S only, Q from registers", nullptr, 0, sms, sink);
  run_case<kNoScores, kValuesMixed>("P V only (WG0's first from smem)", nullptr, 0, sms, sink);
  run_case<kNoScores, kValuesFromRegisters>("P V only, P from registers", nullptr, 0, sms, sink);
  for (int gap : {0, 300, 600, 900, 1200})
    run_case<kScoresFromSmem, kValuesMixed>("page mix", nullptr, 0, sms, sink, gap);
  run_case<kScoresFromSmem, kValuesMixed>("page mix, copies from L2", src, l2_span, sms, sink);
  run_case<kScoresFromSmem, kValuesMixed>("page mix, copies from HBM", src, hbm_span, sms, sink);
  run_case<kScoresFromSmem, kNoValues>("S only, copies from L2", src, l2_span, sms, sink);
  run_case<kScoresFromRegisters, kNoValues>("S only, Q from registers, copies from L2", src,
                                            l2_span, sms, sink);
  const double lone_flop = 36.0 * 2 * 64 * 64 * 16 * kPagesPerRun * sms;
  cudaFuncSetAttribute(lone_scores_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       kSmemBytes);
  cudaFuncSetAttribute(lone_scores_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       kSmemBytes);
  time_case("S only, one warpgroup, one chain", 0, lone_flop,
            [&] { lone_scores_kernel<1><<<sms, 256, kSmemBytes>>>(sink); });
  time_case("S only, one warpgroup, two chains", 0, lone_flop,
            [&] { lone_scores_kernel<2><<<sms, 256, kSmemBytes>>>(sink); });
  cudaFuncSetAttribute(coupled_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  const double pair_flop = 2.0 * (36.0 * 2 * 64 * 64 * 16 + 8.0 * 2 * 64 * 256 * 16);
  for (int gap : {0, 300, 600, 900, 1200}) {
    time_case("seesaw coupling (barriers A, B, D)", gap, pair_flop * kPagesPerRun * sms,
              [&] { coupled_kernel<<<sms, 256, kSmemBytes>>>(gap, sink); });
  }
  long long* cycles = nullptr;
  cudaMalloc(&cycles, sms * sizeof(long long));
  softmax_case<kSoftmaxAsKernel, kBusyNone>(cycles, sink, sms);
  softmax_case<kSoftmaxAsKernel, kBusyScores>(cycles, sink, sms);
  softmax_case<kSoftmaxAsKernel, kBusyScoresQInRegisters>(cycles, sink, sms);
  softmax_case<kSoftmaxAsKernel, kBusyValues>(cycles, sink, sms);
  softmax_case<kSoftmaxAsKernel, kBusyAlu>(cycles, sink, sms);
  softmax_case<kExpPolynomial, kBusyNone>(cycles, sink, sms);
  softmax_case<kExpPolynomial, kBusyScores>(cycles, sink, sms);
  softmax_case<kExpPolynomial, kBusyScoresQInRegisters>(cycles, sink, sms);
  softmax_case<kExpPolynomial, kBusyValues>(cycles, sink, sms);
  softmax_case<kExpPolynomial, kBusyAlu>(cycles, sink, sms);
  softmax_case<kExpHalfPolynomial, kBusyNone>(cycles, sink, sms);
  softmax_case<kExpHalfPolynomial, kBusyScores>(cycles, sink, sms);
  softmax_case<kExpHalfPolynomial, kBusyValues>(cycles, sink, sms);
  softmax_case<kSoftmaxNoStores, kBusyNone>(cycles, sink, sms);
  softmax_case<kSoftmaxNoStores, kBusyScores>(cycles, sink, sms);
  softmax_case<kSoftmaxNoStores, kBusyValues>(cycles, sink, sms);
  softmax_case<kSoftmaxNoShuffles, kBusyNone>(cycles, sink, sms);
  softmax_case<kSoftmaxNoShuffles, kBusyScores>(cycles, sink, sms);
  softmax_case<kSoftmaxNoShuffles, kBusyValues>(cycles, sink, sms);
  cudaFree(cycles);
  cudaFree(src);
  cudaFree(sink);
  return 0;
}
