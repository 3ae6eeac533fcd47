// Tile scheduler: splits one decode step's work (all pages of all sequences) into num_sm_parts
// balanced partitions, one per persistent CTA of the decode kernel.
//
// It runs on the device so that lengths never travel to the host (jit, CUDA graphs and
// pipelining stay intact), once per decode step; every layer of that step reuses its output.
// The walk over the batch is sequential and tiny (b + num_sm_parts steps), so one thread does it,
// on lengths the whole block first stages in shared memory: the walk then never waits on a
// global load. The prefix sum of pieces per sequence is written by the same thread on the way.
//
// jax_flashmla/_reference.py (tile_scheduler_reference) mirrors this loop step for step; the GPU
// tests require both to give identical metadata.
#include <algorithm>

#include "mla_params.h"

namespace jax_flashmla {
namespace {

constexpr int kSchedulerThreads = 256;
static_assert(kMaxBatch * sizeof(int32_t) <= 48 * 1024,
              "staged lengths must fit the default dynamic shared memory of a block");

__device__ int scheduled_len(const int32_t* seqlens, int seq) {
  return min(max(seqlens[seq], 0), kMaxSeqlenK);
}

__device__ int pages_of(int len) { return (len + kPageSize - 1) / kPageSize; }

__device__ void write_row(int32_t* row, int begin_seq, int begin_token, int begin_split,
                          int end_seq, int end_token) {
  row[kBeginSeq] = begin_seq;
  row[kBeginToken] = begin_token;
  row[kEndSeq] = end_seq;
  row[kEndToken] = end_token;
  row[kBeginSplitIndex] = begin_split;
  for (int field = kBeginSplitIndex + 1; field < kSchedulerMetadataSize; ++field) row[field] = 0;
}

__global__ void __launch_bounds__(kSchedulerThreads)
tile_scheduler_kernel(const int32_t* __restrict__ global_seqlens, int batch, int num_sm_parts,
                      int32_t* __restrict__ metadata, int32_t* __restrict__ num_splits) {
  extern __shared__ int32_t seqlens[];  // [batch]
  for (int seq = threadIdx.x; seq < batch; seq += blockDim.x) seqlens[seq] = global_seqlens[seq];
  __syncthreads();
  if (threadIdx.x != 0) return;

  int total = 0;
  for (int seq = 0; seq < batch; ++seq) {
    total += pages_of(scheduled_len(seqlens, seq)) + kFixedOverheadPages;
  }
  const int payload = (total + num_sm_parts - 1) / num_sm_parts + kFixedOverheadPages;

  int part = 0, seq = 0, page = 0, split = 0, remaining = payload;
  int begin_seq = 0, begin_token = 0, begin_split = 0;
  num_splits[0] = 0;

  // Ends the current partition with the given last sequence / token; the next one begins at
  // (seq, page, split) as they stand.
  auto close_partition = [&](int end_seq, int end_token) {
    write_row(metadata + part * kSchedulerMetadataSize, begin_seq, begin_token, begin_split,
              end_seq, end_token);
    ++part;
    begin_seq = seq;
    begin_token = page * kPageSize;
    begin_split = split;
    remaining = payload;
  };

  while (part < num_sm_parts) {
    if (seq >= batch) {
      // Partitions begun after the last sequence get begin_seq == batch: no work.
      close_partition(batch - 1, scheduled_len(seqlens, batch - 1));
      continue;
    }
    const int len = scheduled_len(seqlens, seq);
    const int rest = pages_of(len) - page;
    if (rest + kFixedOverheadPages <= remaining || part == num_sm_parts - 1) {
      // The rest of this sequence fits (the last partition takes everything left).
      remaining -= rest + kFixedOverheadPages;
      write_row(metadata + part * kSchedulerMetadataSize, begin_seq, begin_token, begin_split,
                seq, len);
      num_splits[seq + 1] = num_splits[seq] + split + 1;
      ++seq;
      page = 0;
      split = 0;
      continue;
    }
    const int take = remaining - kFixedOverheadPages;
    if (take > 0) {
      // A page-aligned prefix of this sequence ends the partition; the sequence is split.
      page += take;
      ++split;
      const int end_token = page * kPageSize;
      close_partition(seq, end_token);
    } else {
      // No room for even one page beside the fixed cost: end before this sequence. If nothing was
      // taken, begin_seq > end_seq marks the partition empty.
      close_partition(seq - 1, scheduled_len(seqlens, max(seq - 1, 0)));
    }
  }
}

}  // namespace

cudaError_t launch_tile_scheduler(const int32_t* seqlens, int batch, int num_sm_parts,
                                  int32_t* sched_metadata, int32_t* num_splits,
                                  cudaStream_t stream) {
  // batch <= kMaxBatch keeps the staged lengths within the default 48 KB of shared memory.
  const size_t shared_bytes = static_cast<size_t>(batch) * sizeof(int32_t);
  tile_scheduler_kernel<<<1, kSchedulerThreads, shared_bytes, stream>>>(
      seqlens, batch, num_sm_parts, sched_metadata, num_splits);
  return cudaGetLastError();
}

}  // namespace jax_flashmla
