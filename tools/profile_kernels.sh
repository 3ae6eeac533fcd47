#!/usr/bin/env bash
# Nsight Compute profile of one decode call per kernel family, to see what limits them: achieved
# DRAM bandwidth and tensor-pipe use (SpeedOfLight), where warps stall (WarpStateStats), and the
# shared-memory and L2 traffic (MemoryWorkloadAnalysis). Clocks are left as the card has them.
#
#   tools/profile_kernels.sh LOGDIR [batch seqlen_k heads_q seqlen_q]   (default 128 4096 128 2)
set -u
logs=$(mkdir -p "${1:?usage: tools/profile_kernels.sh LOGDIR [b s_k h_q s_q]}" && cd "$1" && pwd)
shape=("${2:-128}" "${3:-4096}" "${4:-128}" "${5:-2}")
cd /tmp || exit 1
for kernel in hopper portable; do
  timeout "${PROFILE_LIMIT:-240}" ncu --clock-control none --kernel-name regex:mla_decode \
    --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section LaunchStats \
    python3 - "$kernel" "${shape[@]}" > "$logs/ncu-$kernel.txt" 2>&1 <<'PY'
import sys

import jax

import jax_flashmla
from jax_flashmla.bench import Shape, make_problem

kernel, batch, seqlen_k, heads, seqlen_q = sys.argv[1], *map(int, sys.argv[2:])
problem = make_problem(Shape(batch, seqlen_k, heads, seqlen_q))
q, k_cache, table = problem.copies[0]
metadata, splits = jax_flashmla.get_mla_metadata(problem.cache_seqlens, seqlen_q * heads, 1)
decode = jax.jit(lambda *a: jax_flashmla.flash_mla_with_kvcache(
    *a, 512, metadata, splits, causal=True, implementation=kernel))
for _ in range(2):  # the first launch warms up; ncu skips it
    jax.block_until_ready(decode(q, k_cache, table, problem.cache_seqlens))
PY
  echo "== $kernel (exit $?)"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Stall|Warp Cycles Per Issued" \
    "$logs/ncu-$kernel.txt" | head -30
done
