// wgmma (sm_90a warpgroup MMA) helpers: shared-memory matrix descriptors, fences and the
// instruction wrappers the Hopper decode kernel uses. Inline PTX only, no CUTLASS.
//
// ---------------------------------------------------------------------------------------------
// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format" of wgmma), 64 bits:
//   bits  0..13  start address >> 4          (shared-window byte address; our smem < 256 KB)
//   bits 16..29  leading-dimension byte offset (LBO) >> 4
//   bits 32..45  stride-dimension byte offset  (SBO) >> 4
//   bits 49..51  matrix base offset: 0, because every swizzle atom we point into starts on a
//                1024-byte boundary (the smem tiles are 1024-aligned)
//   bits 62..63  swizzle mode: 0 none, 1 = 128B, 2 = 64B, 3 = 32B. We always use 1 (128B).
//
// All tiles in this kernel are "boxes" of 64 rows x 64 16-bit elements: each row is 128 bytes,
// rows are consecutive (row r at r*128), and the 16-byte chunk c of row r sits at chunk
// position c ^ (r % 8) -- exactly the 128B swizzle that TMA's CU_TENSOR_MAP_SWIZZLE_128B writes
// when the box starts 1024-aligned. One swizzle atom = 8 rows x 128 bytes = 1024 bytes.
//
// K-major operand (Q as A and K as B for S = Q K^T, P as A for O = P V; the
// row is the M/N index, the 64 columns of a box the reduction index k):
//   * one wgmma k16 step reads 16 elements = 32 bytes of each row, inside one 128-byte row, so
//     LBO (the distance between core matrices along K) is unused for swizzled K-major layouts;
//     we set it to 1 (16 bytes) like everyone does.
//   * SBO = distance between consecutive 8-row groups along M/N = 8 * 128 = 1024 bytes.
//   * stepping k by 16 inside a box = adding 32 bytes to the start address (k16 step j of a box
//     starts at box + 32*j); the hardware applies the XOR swizzle on the final address bits, so
//     this works as long as the box itself is 1024-aligned.
//   * stepping to the next 64-column box = adding the box size (8192 bytes).
//   * a B operand of N = 32 rows starting at row 32 of a box starts 4096 bytes in: still a
//     multiple of 1024, so the swizzle phase (row % 8) is unchanged and base offset stays 0.
//
// MN-major operand (V as B for O = P V: the reduction index k is the token = the box row, the
// N index is the value column = inside the 128-byte row). imm-trans-b = 1 selects N-major B.
// The canonical 128B-swizzled MN-major layout is, in 16-byte units T (8 elements):
//     ((T, 8, n), (8, k)) : ((1, T, LBO), (8T, SBO))
//   i.e. 64 contiguous N-elements per 128-byte row, 8 k-rows per 1024-byte atom, then
//   * LBO = byte distance between consecutive 64-element chunks along N = one box = 8192 bytes
//     (PTX ISA: "MN-major, swizzled: stride from the first (swizzle-byte-size/16) rows to the
//     next (swizzle-byte-size/16) rows", rows counted in 16-byte units along MN: 8 rows =
//     128 bytes = 64 elements);
//   * SBO = byte distance between consecutive 8-row (8-token) groups along K = 1024 bytes;
//   * stepping k by 16 tokens = adding 16 * 128 = 2048 bytes to the start address.
//   With N = 256 one instruction spans 4 consecutive boxes through LBO; with N = 64 (fallback,
//   JFM_HOPPER_PV_N64) LBO is never used.
//
// ---------------------------------------------------------------------------------------------
// Accumulator fragment of wgmma.m64nNk16 with fp32 D (PTX ISA, "Register Fragments"): thread
// tid of the warpgroup, warp w = tid / 32 (owns rows 16w..16w+15), lane l, g = l / 4, q = l % 4.
// Register d[4*j + e], j = 0..N/8-1 (8-column chunk), e = 0..3:
//     row = 16*w + g + 8*(e / 2),   col = 8*j + 2*q + (e % 2).
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cstdint>

namespace jax_flashmla {
namespace hopper {

// Descriptor of a 128B-swizzled operand starting at shared byte address `smem_addr`.
__device__ __forceinline__ uint64_t make_smem_desc(uint32_t smem_addr, uint32_t lbo_bytes,
                                                   uint32_t sbo_bytes) {
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((smem_addr >> 4) & 0x3FFFu);
  desc |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16;
  desc |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32;
  desc |= static_cast<uint64_t>(1u) << 62;  // 128-byte swizzle
  return desc;
}

// Advances a descriptor's start address by `bytes` (a multiple of 16 that keeps the address
// below 256 KB, so the 14-bit field cannot carry into bit 14).
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  return desc + static_cast<uint64_t>(bytes >> 4);
}

// Must precede the first wgmma after registers it reads (accumulators, A fragments) were
// written by ordinary instructions.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N of this thread's committed wgmma groups are still pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads/writes of accumulator registers across the asynchronous
// wgmma window (the registers are "in use" by the tensor core between issue and wait).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// The fp32 accumulator fragment of an m64nN wgmma is N / 2 registers per thread: the instruction
// string names them %0 .. %(N/2 - 1) and the operand list binds them to d[0 ..] read-write.
#define JFM_WGMMA_D16_REGISTERS \
  "{%0, %1, %2, %3, %4, %5, %6, %7, " \
  "%8, %9, %10, %11, %12, %13, %14, %15}"
#define JFM_WGMMA_D32_REGISTERS \
  "{%0, %1, %2, %3, %4, %5, %6, %7, " \
  "%8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define JFM_WGMMA_D128_REGISTERS \
  "{%0, %1, %2, %3, %4, %5, %6, %7, " \
  "%8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, " \
  "%40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, " \
  "%72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, " \
  "%88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, " \
  "%104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, " \
  "%120, %121, %122, %123, %124, %125, %126, %127}"
#define JFM_WGMMA_D8_OPERANDS_AT(b)                                                  \
  "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]),         \
  "+f"(d[b + 5]), "+f"(d[b + 6]), "+f"(d[b + 7])
#define JFM_WGMMA_D32_OPERANDS_AT(b)                                                 \
  JFM_WGMMA_D8_OPERANDS_AT(b), JFM_WGMMA_D8_OPERANDS_AT(b + 8),                      \
  JFM_WGMMA_D8_OPERANDS_AT(b + 16), JFM_WGMMA_D8_OPERANDS_AT(b + 24)
#define JFM_WGMMA_D16_OPERANDS JFM_WGMMA_D8_OPERANDS_AT(0), JFM_WGMMA_D8_OPERANDS_AT(8)
#define JFM_WGMMA_D32_OPERANDS JFM_WGMMA_D32_OPERANDS_AT(0)
#define JFM_WGMMA_D128_OPERANDS                                                      \
  JFM_WGMMA_D32_OPERANDS_AT(0), JFM_WGMMA_D32_OPERANDS_AT(32),                       \
  JFM_WGMMA_D32_OPERANDS_AT(64), JFM_WGMMA_D32_OPERANDS_AT(96)

// ---- instruction wrappers: one macro per instruction form, instantiated per shape and for bf16
// and f16 (PTX has no type parameter, so the type is pasted into the instruction string) ----

// D(64xN, fp32) (+)= A(64x16, smem, K-major) * B(16xN, smem); scale_d == 0: D = A*B. B is K-major
// (TRANS_B 0, functions wgmma_m64nNk16_ss_TYPE) or MN-major (TRANS_B 1, ..._ss_mn_TYPE).
// The N / 2 accumulators are operands %0.. (REGS names them, OPS binds them); desc_a, desc_b and
// scale_d follow as operands A_OP, A_OP + 1 and A_OP + 2 (spelled out: the preprocessor cannot
// add).
#define JFM_DEFINE_WGMMA_M64NK16_SS(N, REGS, OPS, A_OP, B_OP, SCALE_OP, TRANS_B, NAME, TYPE)   \
__device__ __forceinline__ void wgmma_m64n##N##k16_##NAME##_##TYPE(float (&d)[N / 2],          \
                                                                  uint64_t desc_a,             \
                                                                  uint64_t desc_b,             \
                                                                  int scale_d) {               \
  asm volatile(                                                                                \
      "{\n"                                                                                    \
      ".reg .pred p;\n"                                                                        \
      "setp.ne.b32 p, %" #SCALE_OP ", 0;\n"                                                    \
      "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #TYPE "." #TYPE " "                    \
      REGS ", "                                                                                \
      "%" #A_OP ", %" #B_OP ", p, 1, 1, 0, " #TRANS_B ";\n"                                    \
      "}\n"                                                                                    \
      : OPS                                                                                    \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                               \
}
JFM_DEFINE_WGMMA_M64NK16_SS(32, JFM_WGMMA_D16_REGISTERS, JFM_WGMMA_D16_OPERANDS, 16, 17, 18, 0, ss,
                            bf16)
JFM_DEFINE_WGMMA_M64NK16_SS(32, JFM_WGMMA_D16_REGISTERS, JFM_WGMMA_D16_OPERANDS, 16, 17, 18, 0, ss,
                            f16)
JFM_DEFINE_WGMMA_M64NK16_SS(64, JFM_WGMMA_D32_REGISTERS, JFM_WGMMA_D32_OPERANDS, 32, 33, 34, 0, ss,
                            bf16)
JFM_DEFINE_WGMMA_M64NK16_SS(64, JFM_WGMMA_D32_REGISTERS, JFM_WGMMA_D32_OPERANDS, 32, 33, 34, 0, ss,
                            f16)
JFM_DEFINE_WGMMA_M64NK16_SS(64, JFM_WGMMA_D32_REGISTERS, JFM_WGMMA_D32_OPERANDS, 32, 33, 34, 1,
                            ss_mn, bf16)
JFM_DEFINE_WGMMA_M64NK16_SS(64, JFM_WGMMA_D32_REGISTERS, JFM_WGMMA_D32_OPERANDS, 32, 33, 34, 1,
                            ss_mn, f16)
JFM_DEFINE_WGMMA_M64NK16_SS(256, JFM_WGMMA_D128_REGISTERS, JFM_WGMMA_D128_OPERANDS, 128, 129, 130,
                            1, ss_mn, bf16)
JFM_DEFINE_WGMMA_M64NK16_SS(256, JFM_WGMMA_D128_REGISTERS, JFM_WGMMA_D128_OPERANDS, 128, 129, 130,
                            1, ss_mn, f16)
#undef JFM_DEFINE_WGMMA_M64NK16_SS

// D(64x256, fp32) += A(64x16, registers: the 4 x 32-bit A fragment) * B(16x256, smem, MN-major:
// imm-trans-b = 1). A's fragment: a[0] = (row g, cols 2q, 2q+1), a[1] = (row g+8, same cols),
// a[2] = (row g, cols 2q+8, 2q+9), a[3] = (row g+8, cols 2q+8, 2q+9) of the warp's 16 rows, i.e.
// the accumulator layout above for two adjacent 8-column chunks, packed in pairs.
#define JFM_DEFINE_WGMMA_M64N256K16_RS_MN(TYPE)                                                 \
__device__ __forceinline__ void wgmma_m64n256k16_rs_mn_##TYPE(float (&d)[128], uint32_t a0,     \
                                                         uint32_t a1, uint32_t a2, uint32_t a3, \
                                                         uint64_t desc_b) {                     \
  asm volatile(                                                                                 \
      "{\n"                                                                                     \
      ".reg .pred p;\n"                                                                         \
      "setp.ne.b32 p, %133, 0;\n"                                                               \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." #TYPE "." #TYPE " "                        \
      JFM_WGMMA_D128_REGISTERS ", "                                                             \
      "{%128, %129, %130, %131}, %132, p, 1, 1, 1;\n"                                           \
      "}\n"                                                                                     \
      : JFM_WGMMA_D128_OPERANDS                                                                 \
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));                               \
}
JFM_DEFINE_WGMMA_M64N256K16_RS_MN(bf16)
JFM_DEFINE_WGMMA_M64N256K16_RS_MN(f16)
#undef JFM_DEFINE_WGMMA_M64N256K16_RS_MN

// dtype dispatch: kBf16 selects .bf16 inputs, otherwise .f16.
template <bool kBf16>
struct Wgmma;

#define JFM_DEFINE_WGMMA_DISPATCH(IS_BF16, DT)                                                   \
  template <>                                                                                    \
  struct Wgmma<IS_BF16> {                                                                        \
    /* S = Q K^T step, 32 tokens, both K-major in smem */                                        \
    static __device__ __forceinline__ void qk32(float (&d)[16], uint64_t a, uint64_t b,          \
                                                int scale_d) {                                   \
      wgmma_m64n32k16_ss_##DT(d, a, b, scale_d);                                                 \
    }                                                                                            \
    /* S = Q K^T step, a whole 64-token page (seesaw schedule) */                              \
    static __device__ __forceinline__ void qk64(float (&d)[32], uint64_t a, uint64_t b,          \
                                                int scale_d) {                                   \
      wgmma_m64n64k16_ss_##DT(d, a, b, scale_d);                                                 \
    }                                                                                            \
    /* O += P V, P from registers (seesaw schedule) */                                           \
    static __device__ __forceinline__ void pv256_rs(float (&d)[128], const uint32_t* a,          \
                                                    uint64_t b) {                                \
      wgmma_m64n256k16_rs_mn_##DT(d, a[0], a[1], a[2], a[3], b);                                 \
    }                                                                                            \
    /* O += P V, P in smem (K-major) */                                                          \
    static __device__ __forceinline__ void pv256_ss(float (&d)[128], uint64_t a, uint64_t b) {   \
      wgmma_m64n256k16_ss_mn_##DT(d, a, b, 1);                                                   \
    }                                                                                            \
    static __device__ __forceinline__ void pv64_ss(float (&d)[32], uint64_t a, uint64_t b) {     \
      wgmma_m64n64k16_ss_mn_##DT(d, a, b, 1);                                                    \
    }                                                                                            \
  };

JFM_DEFINE_WGMMA_DISPATCH(true, bf16)
JFM_DEFINE_WGMMA_DISPATCH(false, f16)
#undef JFM_DEFINE_WGMMA_DISPATCH

}  // namespace hopper
}  // namespace jax_flashmla
