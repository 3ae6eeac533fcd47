// Tile configuration and shared-memory layout of the Hopper decode kernel.
#pragma once

#include <cstdint>

#include "mla_params.h"

namespace jax_flashmla {
namespace hopper {

constexpr int kThreads = 256;           // two consumer warpgroups, no separate producer
constexpr int kWarpgroupThreads = 128;
constexpr int kBlockM = kRowsPerQueryTile;  // 64 query rows per CTA
constexpr int kBlockN = kPageSize;          // 64 tokens per page = per K tile
constexpr int kBoxCols = 64;                // TMA box / swizzle atom width: 64 x 16-bit = 128 B
constexpr int kNumBoxesQK = kHeadDimQK / kBoxCols;  // 9 boxes span the 576 columns
constexpr int kNumBoxesV = kHeadDimV / kBoxCols;    // first 8 of them are V
constexpr int kBoxesPerWarpgroupV = kNumBoxesV / 2;  // warpgroup w owns V boxes 4w..4w+3
constexpr int kColsPerWarpgroup = kHeadDimV / 2;     // 256 output columns per warpgroup
constexpr int kBoxBytes = kBlockN * kBoxCols * 2;    // 8192 (64 rows x 128 B)
constexpr int kTileBytes = kNumBoxesQK * kBoxBytes;  // 73728: one 64 x 576 tile
constexpr int kNumKStages = 2;                       // K/V page buffers (double buffering)

// A page is loaded in three groups, each one TMA instruction completing one full barrier: the two
// V halves (boxes 0-3 and 4-7, the columns each warpgroup's P V reads) and the RoPE box (box 8,
// read by S only). Group g's barrier of stage st is barrier kLoadGroups * st + g.
constexpr int kGroupVHalf0 = 0;
constexpr int kGroupVHalf1 = 1;
constexpr int kGroupRope = 2;
constexpr int kLoadGroups = 3;
static_assert(kNumBoxesQK == kNumBoxesV + 1 && kGroupRope * kBoxesPerWarpgroupV == kNumBoxesV,
              "boxes 4g..4g+3 are V half g, box 8 the RoPE box");
// The group that box b (0..8) is loaded with, and whether b is its group's first box (where a
// consumer reading the boxes in order waits for the group).
constexpr int load_group_of_box(int box) { return box / kBoxesPerWarpgroupV; }
constexpr bool first_box_of_group(int box) { return box % kBoxesPerWarpgroupV == 0; }
// Sets of groups to load, as bit masks.
constexpr uint32_t group_bit(int group) { return 1u << group; }
constexpr uint32_t kWholePage = (1u << kLoadGroups) - 1;

// Shared memory (offsets from a 1024-aligned base; every box is 1024-aligned, as the 128B
// swizzle atoms and the wgmma descriptors with base offset 0 require):
//   [0, 73728)            Q tile, 9 boxes of 64 rows x 64 cols, 128B-swizzled
//   [73728, 221184)       K stages 0 and 1, 9 boxes each (TMA destinations)
//   [221184, 229376)      P tile (64 rows x 64 tokens, 16-bit, 128B-swizzled)
//   [229376, +512)        row maxima [warpgroup][64] (fp32)
//   [229888, +512)        row sums [warpgroup][64] (fp32)
//   [230400, +48)         full barriers, [stage][load group] (u64 each)
//   [230448, +8)          release counters, one u32 per stage
constexpr int kSmemQ = 0;
constexpr int kSmemK = kSmemQ + kTileBytes;
constexpr int kSmemP = kSmemK + kNumKStages * kTileBytes;
constexpr int kSmemRowMax = kSmemP + kBoxBytes;
constexpr int kSmemRowSum = kSmemRowMax + 2 * kBlockM * 4;
constexpr int kSmemBar = kSmemRowSum + 2 * kBlockM * 4;
constexpr int kSmemRelease = kSmemBar + kNumKStages * kLoadGroups * 8;
constexpr int kSmemUsed = kSmemRelease + kNumKStages * 4;
constexpr int kSmemAlign = 1024;
constexpr int kSmemBytes = kSmemUsed + kSmemAlign;  // slack to align the dynamic base
static_assert(kSmemBytes <= 227 * 1024, "exceeds the sm_90 per-block shared memory limit");
static_assert(kSmemBar % 8 == 0, "mbarriers need 8-byte alignment");
static_assert(kSmemP % 1024 == 0, "P tile must be 1024-aligned (swizzle atom)");

// Split S: warpgroup w computes S for tokens 32w..32w+31 of each page, the two exchange row maxima
// and P through smem, and both run O += P V with P read from smem. (Both computing the whole S
// and feeding P V from registers, with no exchange, was measured slower: see kernel-notes.md.)
constexpr int kSColsPerWarpgroup = kBlockN / 2;

constexpr int kCtaBarrierId = 3;  // named barrier over all 256 threads (the exchanges)

// Seesaw schedule (decode_seesaw.cu): pages are taken in pairs; the first page's scores are
// computed by warpgroup 0, the second's by warpgroup 1. Warpgroup 0 keeps the first page's P in
// its own tile, which warpgroup 1 also reads; the second page's P goes to warpgroup 0 through that
// page's RoPE box (box 8, read by no P V, so free once the page's scores are done).
//   [0, 73728)            Q tile
//   [73728, 221184)       K stages 0 and 1
//   [221184, 229376)      warpgroup 0's P tile (first page of a pair)
//   [229376, +512)        row maxima [pair position][64] (fp32)
//   [229888, +512)        row sums [warpgroup][64] (fp32)
//   [230400, +48)         full barriers, [stage][load group]
//   [230448, +32)         the two leaders' load cursors (LoadCursor, 16 bytes each)
namespace seesaw {
constexpr int kRopeBox = kNumBoxesQK - 1;  // box 8: columns 512..575, used by S only
constexpr int kSmemFirstP = kSmemK + kNumKStages * kTileBytes;
constexpr int kSmemRowMax = kSmemFirstP + kBoxBytes;
constexpr int kSmemRowSum = kSmemRowMax + 2 * kBlockM * 4;
constexpr int kSmemBar = kSmemRowSum + 2 * kBlockM * 4;
constexpr int kSmemCursors = kSmemBar + kNumKStages * kLoadGroups * 8;
constexpr int kSmemUsed = kSmemCursors + 2 * 4 * 4;
constexpr int kSmemBytes = kSmemUsed + kSmemAlign;
static_assert(kSmemBytes <= 227 * 1024, "exceeds the sm_90 per-block shared memory limit");
static_assert(kSmemFirstP % 1024 == 0, "P tile must be 1024-aligned (swizzle atom)");
static_assert(kSmemBar % 8 == 0, "mbarriers need 8-byte alignment");
static_assert(kBlockM * kBlockN * 2 == kBoxBytes, "a page's P tile must fit its RoPE box");

// Named barriers (0 is __syncthreads, 1 + wg are the warpgroups' own).
constexpr int kFirstPageReadyId = 3;   // warpgroup 0 arrives (row maxima of the first page)
constexpr int kSecondPageReadyId = 4;  // warpgroup 1 arrives (max and P of the second page)
constexpr int kEpilogueBarrierId = 5;  // all 256 threads: row sums exchanged
constexpr int kScoresQueuedId = 7;     // warpgroup 0 arrives (first page's scores issued)
}  // namespace seesaw

}  // namespace hopper
}  // namespace jax_flashmla
