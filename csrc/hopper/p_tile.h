// The seesaw's P tiles in shared memory (decode_seesaw.cu) and how a warp moves its rows of one in
// and out; tools/wgmma_rate.cu stores its softmax probe's P through the same functions.
#pragma once

#include <cstdint>

#include "smem_matrix.h"
#include "traits.h"

namespace jax_flashmla {
namespace hopper {

constexpr int kPFragRegs = kBlockN / 4;  // 32-bit registers per thread for a 64 x 64 P

// P tiles in shared memory, the A operand of a P V wgmma from shared memory: 64 rows x 64 tokens,
// K-major, 128B-swizzled like a TMA box (element (r, t) at r * 128 + ((t / 8) ^ (r % 8)) * 16 +
// (t % 8) * 2). A warp moves its 16 rows with one stmatrix / ldmatrix .x4 per k16 step v: the
// four 8 x 8 matrices are the step's fragment registers (rows 0-7 / 8-15 of the warp's, tokens
// 16v.. / 16v + 8.., i.e. register r of the step is on row r % 2, as the seesaw's pack_p packs
// them), and lane l gives the address of row l % 8 of matrix l / 8. Within a warp the 8 rows of a
// matrix hit 8 distinct 16-byte slots.
__device__ __forceinline__ uint32_t p_tile_row(uint32_t tile, int warp, int lane, int v) {
  const int matrix = lane >> 3;
  const int row_in_8 = lane & 7;
  const int chunk = 2 * v + (matrix >> 1);
  return tile + (warp * 16 + (matrix & 1) * 8 + row_in_8) * 128 + ((chunk ^ row_in_8) << 4);
}

// Stores a packed P fragment (register k holds the pair of columns 2k, 2k + 1 of the thread's
// accumulator layout, as pack_p packs it) into a P tile.
__device__ __forceinline__ void store_p_tile(uint32_t tile, const uint32_t (&a)[kPFragRegs],
                                             int warp, int lane) {
#pragma unroll
  for (int v = 0; v < kPFragRegs / 4; ++v) {
    const uint32_t step[4] = {a[4 * v], a[4 * v + 1], a[4 * v + 2], a[4 * v + 3]};
    stmatrix_x4(p_tile_row(tile, warp, lane, v), step);
  }
}

}  // namespace hopper
}  // namespace jax_flashmla
