// Portable split-KV MLA decode kernel for sm_80 and newer (mma.sync tensor cores, cp.async).
//
// One CTA = one 64-row query tile of one KV head inside one scheduler partition. It walks the
// partition's (sequence, token range) pieces in order. Per piece:
//   1. cp.async the 64 x 576 Q tile into shared memory (zero rows past rows_per_kv).
//   2. Stream the piece's keys in tiles of kTileN tokens through a two-stage cp.async ring; each
//      tile lies inside one 64-token page (piece bounds are page aligned), so one block-table
//      lookup per tile. Tokens past the piece end are zero-filled (src-size 0) so garbage never
//      enters shared memory; tiles of an out-of-range page are zero-filled too and flagged, and
//      every row that can see such a tile is forced to NaN in the epilogue.
//   3. S = Q K^T (m16n8k16 mma), online softmax in fp32 (exp2, scale folded in), P through shared
//      memory, O += P V with V = the first 512 columns of the same K tile read via ldmatrix.trans.
//   4. Epilogue: unsplit sequences write out/lse directly; split ones write the normalised fp32
//      partial O and the partial lse into their workspace slot (the combine kernel merges them).
//
// Warp layout (8 warps): warp w owns query rows [16*(w%4), 16*(w%4)+16). For S it owns keys
// [16*(w/4), +16) of each tile; for O it owns V columns [256*(w/4), +256). The two warps that
// share a row group ("partners") exchange row maxima and P through shared memory and sync with a
// 64-thread named barrier.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cp_async.h"
#include "mla_params.h"
#include "smem_matrix.h"

namespace jax_flashmla {
namespace {

// ---------------------------------------------------------------------------------------------
// Geometry.
constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kNumWarps = kThreads / kWarpSize;
constexpr int kRowGroups = 4;                           // 16-row groups in a 64-row Q tile
constexpr int kColHalves = kNumWarps / kRowGroups;      // warps sharing one row group
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaK = 16;

constexpr int kTileN = 32;                              // keys per K tile
constexpr int kStages = 2;                              // cp.async ring depth
constexpr int kKeysPerWarp = kTileN / kColHalves;       // S columns per warp
constexpr int kSNBlocks = kKeysPerWarp / kMmaN;         // n8 blocks of S per warp (2)
constexpr int kSKSteps = kHeadDimQK / kMmaK;            // k16 steps of Q K^T (36)
constexpr int kSAccSets = 2;                            // independent S accumulator chains
constexpr int kOCols = kHeadDimV / kColHalves;          // O columns per warp (256)
constexpr int kONBlocks = kOCols / kMmaN;               // n8 blocks of O per warp (32)
constexpr int kPVKSteps = kTileN / kMmaK;               // k16 steps of P V (2)

// Shared-memory layout. Q/K rows are padded by 8 elements (16 bytes) so that the 8 row addresses
// of one ldmatrix 8x8 matrix land in distinct 4-bank groups (row stride = 292 words = 4 mod 32).
constexpr int kElemBytes = 2;
constexpr int kSmemPad = 8;
constexpr int kRowStride = kHeadDimQK + kSmemPad;       // elements
constexpr int kRowStrideBytes = kRowStride * kElemBytes;
constexpr int kPStride = kTileN + kSmemPad;             // elements; 80 bytes = 20 words
constexpr int kPStrideBytes = kPStride * kElemBytes;
constexpr int kChunkBytes = 16;                         // one cp.async
constexpr int kChunkElems = kChunkBytes / kElemBytes;
constexpr int kChunksPerRow = kHeadDimQK / kChunkElems; // 72
constexpr int kQChunksPerThread = kRowsPerQueryTile * kChunksPerRow / kThreads;  // 18
constexpr int kKChunksPerThread = kTileN * kChunksPerRow / kThreads;             // 9

constexpr int kSmemQBytes = kRowsPerQueryTile * kRowStrideBytes;
constexpr int kSmemKStageBytes = kTileN * kRowStrideBytes;
constexpr int kSmemPBytes = kRowsPerQueryTile * kPStrideBytes;
constexpr int kSmemRedBytes = kColHalves * kRowsPerQueryTile * static_cast<int>(sizeof(float));
constexpr int kSmemQOffset = 0;
constexpr int kSmemKOffset = kSmemQOffset + kSmemQBytes;
constexpr int kSmemPOffset = kSmemKOffset + kStages * kSmemKStageBytes;
constexpr int kSmemMaxOffset = kSmemPOffset + kSmemPBytes;
constexpr int kSmemSumOffset = kSmemMaxOffset + kSmemRedBytes;
constexpr int kSmemBytes = kSmemSumOffset + kSmemRedBytes;

// Softmax sentinels (log2 domain). Running maxima start at kInitMax; masked scores are far below
// it, so exp2(masked - max) underflows to exactly 0 and no inf - inf can occur.
constexpr float kInitMax = -1.0e30f;
constexpr float kMaskedScore = -3.0e38f;
constexpr float kLn2 = 0.69314718055994530942f;

constexpr int kFirstPairBarrier = 1;  // named barriers 1..4 (0 is __syncthreads)
constexpr int kMaxCachedDevices = 64;

static_assert(kNumWarps == kRowGroups * kColHalves, "warp layout");
static_assert(kRowGroups * kMmaM == kRowsPerQueryTile, "row groups cover the Q tile");
static_assert(kPageSize % kTileN == 0, "a K tile must not straddle pages");
static_assert(kRowsPerQueryTile * kChunksPerRow % kThreads == 0, "Q chunks split evenly");
static_assert(kTileN * kChunksPerRow % kThreads == 0, "K chunks split evenly");
static_assert(kSKSteps % kSAccSets == 0, "S accumulator chains");
static_assert(kONBlocks % 2 == 0 && kSNBlocks == 2, "x4 ldmatrix covers two n8 blocks");
static_assert(kSmemKOffset % 128 == 0 && kSmemPOffset % 16 == 0, "alignment");

// ---------------------------------------------------------------------------------------------
// Element-type traits.
template <typename T>
struct ElemTraits;

template <>
struct ElemTraits<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct ElemTraits<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Barrier for the two partner warps of one row group (64 threads).
__device__ __forceinline__ void pair_barrier(int row_group) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(kFirstPairBarrier + row_group),
               "r"(kColHalves * kWarpSize)
               : "memory");
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int clampi(int v, int lo, int hi) { return min(max(v, lo), hi); }

// ---------------------------------------------------------------------------------------------
// Tile loaders (all 256 threads take part; each issues a fixed number of 16-byte copies).

// Q rows of sequence s for this CTA's tile; rows past rows_per_kv are zero-filled.
template <typename T>
__device__ __forceinline__ void load_q_tile(const MlaDecodeParams& p, uint32_t sq, int s,
                                            int tile_row0, int g, int tid) {
  const T* q = static_cast<const T*>(p.q);
#pragma unroll 2
  for (int i = 0; i < kQChunksPerThread; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kChunksPerRow;
    const int col = c % kChunksPerRow;
    const int r = tile_row0 + row;
    const T* src = q;
    int bytes = 0;
    if (r < p.rows_per_kv) {
      const int t = r / p.heads_per_kv;
      const int h = g * p.heads_per_kv + r % p.heads_per_kv;
      src = q + ((static_cast<int64_t>(s) * p.seqlen_q + t) * p.num_heads_q + h) * kHeadDimQK +
            col * kChunkElems;
      bytes = kChunkBytes;
    }
    cp_async_16(sq + row * kRowStrideBytes + col * kChunkBytes, src, bytes);
  }
}

// K tile [t0, t0 + kTileN) of sequence s into one stage. Tokens >= hi and every token of a page
// whose block id is outside [0, num_pages) are zero-filled without touching global memory.
// Returns true when the tile's page is out of range (its tokens count as NaN).
template <typename T>
__device__ __forceinline__ bool load_k_tile(const MlaDecodeParams& p, uint32_t sk, int s, int t0,
                                            int hi, int g, int tid) {
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const int blk = p.block_table[static_cast<int64_t>(s) * p.max_pages_per_seq + t0 / kPageSize];
  const bool page_ok = blk >= 0 && blk < p.num_pages;
  const int64_t token_stride = static_cast<int64_t>(p.num_heads_kv) * kHeadDimQK;
  const T* tile_base =
      k_cache + (static_cast<int64_t>(page_ok ? blk : 0) * kPageSize + t0 % kPageSize) *
                    token_stride +
      static_cast<int64_t>(g) * kHeadDimQK;
#pragma unroll
  for (int i = 0; i < kKChunksPerThread; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kChunksPerRow;
    const int col = c % kChunksPerRow;
    const bool valid = page_ok && (t0 + row < hi);
    const T* src = valid ? tile_base + row * token_stride + col * kChunkElems : k_cache;
    cp_async_16(sk + row * kRowStrideBytes + col * kChunkBytes, src, valid ? kChunkBytes : 0);
  }
  return !page_ok;
}

// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_portable_kernel(const MlaDecodeParams p) {
  using Traits = ElemTraits<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sq = smem_addr(smem + kSmemQOffset);
  const uint32_t sk = smem_addr(smem + kSmemKOffset);
  const uint32_t sp = smem_addr(smem + kSmemPOffset);
  float* red_max = reinterpret_cast<float*>(smem + kSmemMaxOffset);  // [kColHalves][64]
  float* red_sum = reinterpret_cast<float*>(smem + kSmemSumOffset);  // [kColHalves][64]

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int rg = warp % kRowGroups;  // row group
  const int ch = warp / kRowGroups;  // key half for S, column half for O
  const int quad_row = lane / 4;     // mma C-fragment row within 8
  const int quad_col = lane % 4;     // mma C-fragment column pair
  const int tile_row0 = blockIdx.x * kRowsPerQueryTile;
  const int g = blockIdx.y;

  // ---- partition bounds (garbage-tolerant) ----
  const int32_t* meta = p.sched_metadata + static_cast<int64_t>(blockIdx.z) * kSchedulerMetadataSize;
  const int begin_seq_raw = meta[kBeginSeq];
  const int end_seq_raw = meta[kEndSeq];
  if (begin_seq_raw >= p.batch || begin_seq_raw > end_seq_raw) return;  // uniform: whole CTA
  const int begin_seq = max(begin_seq_raw, 0);
  const int end_seq = min(end_seq_raw, p.batch - 1);
  const int begin_token = meta[kBeginToken];
  const int end_token = meta[kEndToken];
  const int begin_split = meta[kBeginSplitIndex];
  const int64_t capacity = static_cast<int64_t>(max(p.max_pages_per_seq, 0)) * kPageSize;

  // ---- per-thread rows: this thread holds C-fragment rows lr[0], lr[1] of the Q tile ----
  int lr[2], grow[2], qtok[2], qhead[2];
  bool row_valid[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    lr[j] = rg * kMmaM + quad_row + j * (kMmaM / 2);
    grow[j] = tile_row0 + lr[j];
    row_valid[j] = grow[j] < p.rows_per_kv;
    qtok[j] = grow[j] / p.heads_per_kv;
    qhead[j] = g * p.heads_per_kv + grow[j] % p.heads_per_kv;
  }

  // ---- per-lane ldmatrix addresses ----
  // A operand (16x16, row-major): lanes 0-15 -> rows 0-15 at k+0, lanes 16-31 -> rows 0-15 at k+8.
  const uint32_t q_frag_addr =
      sq + (rg * kMmaM + lane % 16) * kRowStrideBytes + (lane / 16) * kChunkBytes;
  const uint32_t p_frag_addr =
      sp + (rg * kMmaM + lane % 16) * kPStrideBytes + (lane / 16) * kChunkBytes;
  // B operand of S (K rows = keys, non-transposed): matrices (keys 0-7,k0) (keys 0-7,k8)
  // (keys 8-15,k0) (keys 8-15,k8) -> b0,b1 of n-block 0 then b0,b1 of n-block 1.
  const uint32_t k_frag_off = (ch * kKeysPerWarp + lane % 8 + (lane / 16) * 8) * kRowStrideBytes +
                              ((lane / 8) % 2) * kChunkBytes;
  // B operand of P V (V rows = keys = k dim, transposed): matrices (keys 0-7,n0) (keys 8-15,n0)
  // (keys 0-7,n8) (keys 8-15,n8) -> b0,b1 of n-block 0 then b0,b1 of n-block 1.
  const uint32_t v_frag_off = (lane % 8 + ((lane / 8) % 2) * 8) * kRowStrideBytes +
                              (ch * kOCols + (lane / 16) * 8) * kElemBytes;

  for (int s = begin_seq; s <= end_seq; ++s) {
    const int len = p.seqlens[s];
    const bool malformed = len < 0 || static_cast<int64_t>(len) > capacity;
    const int clen = len < 0 ? 0 : static_cast<int>(min(static_cast<int64_t>(len), capacity));
    // Piece bounds [lo, hi). The contract makes lo page aligned; rounding it down to a tile
    // boundary only matters for garbage metadata and keeps every tile inside one page.
    int lo = clampi(s == begin_seq ? begin_token : 0, 0, clen);
    const int hi = clampi(s == end_seq ? end_token : clen, lo, clen);
    lo -= lo % kTileN;
    const int split_base = p.num_splits[s];
    const bool split = p.num_splits[s + 1] - split_base > 1;
    const int slot =
        clampi(split_base + (s == begin_seq ? begin_split : 0), 0, max(p.num_slots - 1, 0));
    const int n_tiles = malformed ? 0 : (hi - lo + kTileN - 1) / kTileN;

    // Visible-key end per row: keys in [lo, key_end) are seen (bottom-right causal mask).
    int key_end[2];
    bool row_nan[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      key_end[j] = p.causal ? min(hi, len - p.seqlen_q + qtok[j] + 1) : hi;
      row_nan[j] = malformed;
    }
    // Smallest key_end over all rows: tiles ending at or below it need no mask.
    const int mask_from = p.causal ? min(hi, len - p.seqlen_q + 1) : hi;

    // Barrier: every warp has finished reading sQ, both K stages, sP and the reduction buffers
    // for the previous sequence before the loads below overwrite them.
    __syncthreads();
    bool pending_bad = false;
    if (n_tiles > 0) {
      load_q_tile<T>(p, sq, s, tile_row0, g, tid);
      pending_bad = load_k_tile<T>(p, sk, s, lo, hi, g, tid);
      cp_async_commit();  // group: Q + K tile 0
    }

    float o[kONBlocks][4];
#pragma unroll
    for (int nb = 0; nb < kONBlocks; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
    float row_max[2] = {kInitMax, kInitMax};
    float row_sum[2] = {0.f, 0.f};  // this thread's share of the row sum (its own columns)

    for (int it = 0; it < n_tiles; ++it) {
      const int t0 = lo + it * kTileN;
      const int stage = it % kStages;
      const bool tile_bad = pending_bad;
      // Wait for this thread's copies of tile `it` (the only outstanding group), then barrier:
      // (a) everyone's copies of tile `it` are visible; (b) every warp is done with tile it-1,
      // so its stage (== the next tile's stage), sP and red_max may be overwritten.
      cp_async_wait_all();
      __syncthreads();
      // Prefetch tile it+1 into the other stage; it lands while this tile is computed.
      if (it + 1 < n_tiles) {
        pending_bad = load_k_tile<T>(p, sk + ((it + 1) % kStages) * kSmemKStageBytes, s,
                                     t0 + kTileN, hi, g, tid);
        cp_async_commit();
      }
      const uint32_t k_stage = sk + stage * kSmemKStageBytes;

      // ---- S = Q K^T for 16 rows x 16 keys, two independent accumulator chains ----
      float sacc[kSAccSets][kSNBlocks][4];
#pragma unroll
      for (int a = 0; a < kSAccSets; ++a)
#pragma unroll
        for (int nb = 0; nb < kSNBlocks; ++nb)
          sacc[a][nb][0] = sacc[a][nb][1] = sacc[a][nb][2] = sacc[a][nb][3] = 0.f;
#pragma unroll 6
      for (int ks = 0; ks < kSKSteps; ks += kSAccSets) {
#pragma unroll
        for (int a = 0; a < kSAccSets; ++a) {
          uint32_t qa[4], kb[4];
          ldmatrix_x4(qa, q_frag_addr + (ks + a) * kMmaK * kElemBytes);
          ldmatrix_x4(kb, k_stage + k_frag_off + (ks + a) * kMmaK * kElemBytes);
          Traits::mma(sacc[a][0], qa, kb[0], kb[1]);
          Traits::mma(sacc[a][1], qa, kb[2], kb[3]);
        }
      }
      // score[nb][e]: element e of n-block nb; rows: e < 2 -> lr[0], e >= 2 -> lr[1].
      float score[kSNBlocks][4];
#pragma unroll
      for (int nb = 0; nb < kSNBlocks; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) score[nb][e] = (sacc[0][nb][e] + sacc[1][nb][e]) * p.scale_log2;

      // ---- masking: piece end (zero-filled tail) and causal limit, only where needed ----
      if (t0 + kTileN > mask_from) {
#pragma unroll
        for (int nb = 0; nb < kSNBlocks; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = t0 + ch * kKeysPerWarp + nb * kMmaN + quad_col * 2 + (e % 2);
            if (key >= key_end[e / 2]) score[nb][e] = kMaskedScore;
          }
      }
      // A bad page's tokens count as NaN: a row that sees any key of this tile becomes NaN.
      if (tile_bad) {
#pragma unroll
        for (int j = 0; j < 2; ++j) row_nan[j] = row_nan[j] || key_end[j] > t0;
      }

      // ---- row max over this warp's 16 keys, then across the partner warp ----
      float tile_max[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float mx = fmaxf(fmaxf(score[0][2 * j], score[0][2 * j + 1]),
                         fmaxf(score[1][2 * j], score[1][2 * j + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        tile_max[j] = mx;
        if (quad_col == 0) red_max[ch * kRowsPerQueryTile + lr[j]] = mx;
      }
      // Partner's maxima are written; the previous tile's reads of red_max finished before the
      // __syncthreads above.
      pair_barrier(rg);
      float alpha[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float other = red_max[(1 - ch) * kRowsPerQueryTile + lr[j]];
        const float m_new = fmaxf(row_max[j], fmaxf(tile_max[j], other));
        alpha[j] = fast_exp2(row_max[j] - m_new);
        row_max[j] = m_new;
      }

      // ---- P = exp2(S - m) (fp32 sum, dtype tile for the P V product) ----
      float psum[2] = {0.f, 0.f};
#pragma unroll
      for (int nb = 0; nb < kSNBlocks; ++nb) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float p0 = fast_exp2(score[nb][2 * j] - row_max[j]);
          const float p1 = fast_exp2(score[nb][2 * j + 1] - row_max[j]);
          psum[j] += p0 + p1;
          const int col = ch * kKeysPerWarp + nb * kMmaN + quad_col * 2;
          *reinterpret_cast<uint32_t*>(smem + kSmemPOffset + lr[j] * kPStrideBytes +
                                       col * kElemBytes) = Traits::pack(p0, p1);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) row_sum[j] = row_sum[j] * alpha[j] + psum[j];
#pragma unroll
      for (int nb = 0; nb < kONBlocks; ++nb) {
        o[nb][0] *= alpha[0];
        o[nb][1] *= alpha[0];
        o[nb][2] *= alpha[1];
        o[nb][3] *= alpha[1];
      }
      // Partner's half of P is in sP.
      pair_barrier(rg);

      // ---- O += P V: 16 rows x 256 columns, k = kTileN keys ----
#pragma unroll
      for (int kk = 0; kk < kPVKSteps; ++kk) {
        uint32_t pa[4];
        ldmatrix_x4(pa, p_frag_addr + kk * kMmaK * kElemBytes);
        const uint32_t v_addr = k_stage + v_frag_off + kk * kMmaK * kRowStrideBytes;
#pragma unroll
        for (int nb = 0; nb < kONBlocks; nb += 2) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, v_addr + nb * kMmaN * kElemBytes);
          Traits::mma(o[nb], pa, vb[0], vb[1]);
          Traits::mma(o[nb + 1], pa, vb[2], vb[3]);
        }
      }
    }

    // ---- epilogue: full row sums (quad, then partner warp) ----
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float l = row_sum[j];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      row_sum[j] = l;
      if (quad_col == 0) red_sum[ch * kRowsPerQueryTile + lr[j]] = l;
    }
    // Partner's sums are written (red_sum's previous readers finished before this sequence's
    // __syncthreads).
    pair_barrier(rg);

    const float nan_value = __int_as_float(0x7fc00000);
    const float inf_value = __int_as_float(0x7f800000);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (!row_valid[j]) continue;
      const float l = row_sum[j] + red_sum[(1 - ch) * kRowsPerQueryTile + lr[j]];
      const bool seen = key_end[j] > lo;  // the piece shows this row at least one key
      float scale_o, lse;
      if (row_nan[j]) {
        scale_o = nan_value;
        lse = nan_value;
      } else if (!seen) {
        scale_o = 0.f;
        lse = split ? -inf_value : inf_value;
      } else {
        scale_o = 1.f / l;
        lse = (row_max[j] + log2f(l)) * kLn2;
      }
      const int col0 = ch * kOCols + quad_col * 2;
      if (split) {
        const int64_t row_index = workspace_row(p, slot, g, grow[j]);
        float* dst = p.o_accum + row_index * kHeadDimV + col0;
#pragma unroll
        for (int nb = 0; nb < kONBlocks; ++nb) {
          // NaN rows must be NaN even where O is 0 (0 * NaN = NaN), empty rows exactly 0.
          const float2 v = make_float2(o[nb][2 * j] * scale_o, o[nb][2 * j + 1] * scale_o);
          *reinterpret_cast<float2*>(dst + nb * kMmaN) = v;
        }
        if (ch == 0 && quad_col == 0) p.lse_accum[row_index] = lse;
      } else {
        const int64_t q_index =
            (static_cast<int64_t>(s) * p.seqlen_q + qtok[j]) * p.num_heads_q + qhead[j];
        T* dst = static_cast<T*>(p.out) + q_index * kHeadDimV + col0;
#pragma unroll
        for (int nb = 0; nb < kONBlocks; ++nb) {
          *reinterpret_cast<uint32_t*>(dst + nb * kMmaN) =
              Traits::pack(o[nb][2 * j] * scale_o, o[nb][2 * j + 1] * scale_o);
        }
        if (ch == 0 && quad_col == 0) {
          p.lse[(static_cast<int64_t>(s) * p.num_heads_q + qhead[j]) * p.seqlen_q + qtok[j]] = lse;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Per-device cache: 0 = unknown, 1 = fits and attribute set, -1 = does not fit.
std::atomic<int> g_smem_state[2][kMaxCachedDevices];

template <typename T>
cudaError_t prepare_kernel(int dtype_index) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::atomic<int>* state =
      device < kMaxCachedDevices ? &g_smem_state[dtype_index][device] : nullptr;
  if (state != nullptr) {
    const int known = state->load(std::memory_order_acquire);
    if (known == 1) return cudaSuccess;
    if (known == -1) return cudaErrorInvalidConfiguration;
  }
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (optin < kSmemBytes) {
    if (state != nullptr) state->store(-1, std::memory_order_release);
    return cudaErrorInvalidConfiguration;
  }
  err = cudaFuncSetAttribute(mla_decode_portable_kernel<T>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  if (state != nullptr) state->store(1, std::memory_order_release);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_typed(const MlaDecodeParams& params, cudaStream_t stream, int dtype_index) {
  if (params.batch <= 0 || params.num_sm_parts <= 0 || params.rows_per_kv <= 0 ||
      params.num_heads_kv <= 0) {
    return cudaSuccess;  // nothing to compute
  }
  if (params.heads_per_kv <= 0 || params.seqlen_q <= 0 || params.num_slots <= 0 ||
      params.num_sm_parts > 65535 || params.num_heads_kv > 65535) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = prepare_kernel<T>(dtype_index);
  if (err != cudaSuccess) return err;
  const dim3 grid((params.rows_per_kv + kRowsPerQueryTile - 1) / kRowsPerQueryTile,
                  params.num_heads_kv, params.num_sm_parts);
  mla_decode_portable_kernel<T><<<grid, kThreads, kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_decode_portable(const MlaDecodeParams& params, cudaStream_t stream) {
  switch (params.dtype) {
    case ElementType::kBFloat16:
      return launch_typed<__nv_bfloat16>(params, stream, 0);
    case ElementType::kFloat16:
      return launch_typed<__half>(params, stream, 1);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_flashmla
