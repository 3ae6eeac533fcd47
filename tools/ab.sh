#!/usr/bin/env bash
# Same-run A/B of kernel variants on one GPU. A variant is nvcc flags and/or environment settings
# and/or another source tree, one argument each: "-DJFM_SWITCH=0 -DOTHER=1",
# "@JAX_FLASHMLA_HOPPER_CLUSTER=1" (words starting with @ are environment assignments for the
# timing run), "src=DIR" (build DIR, relative to the repository, instead of the repository), ""
# for the tree as it is. Each distinct (source, flags) is built once, all builds in parallel; then
# every variant times the same rows, in rotating order, REPEATS times, so that clock drift spreads
# over all of them. Only our kernel is timed (no XLA reference: this compares variants with each
# other).
#
#   ROWS="--table custom --batch 128 --seqlen 4096 --heads 128 --seqlen-q 2" \
#     tools/ab.sh LOGDIR "" "-DJFM_SOME_SWITCH=0" "@JAX_FLASHMLA_HOPPER_SCHEDULE=split"
#
# Against the last commit (the GPU machine gets the working tree, not the history, so export the
# commit before sending: a folder that is neither tracked nor ignored travels with it):
#   git archive HEAD | tar -x -C ab-base     # here, after mkdir ab-base
#   tools/ab.sh LOGDIR "src=ab-base" ""       # there
#
# Environment: ROWS (bench arguments, default: the multi-tile rows of the standard table),
# REPEATS (default 2), BENCH_LIMIT (seconds per timing run, default 240). Logs and one JSON per
# timing run go to LOGDIR; the summary table is printed at the end. Build i is installed in
# /tmp/ab-build-i/site for further use (e.g. tests). Cells: chained ms per call, and in brackets
# the kernel ms from a profiler trace where the bench got one.
set -u
logs=$(mkdir -p "${1:?usage: tools/ab.sh LOGDIR VARIANT...}" && cd "$1" && pwd)
shift
[ "$#" -gt 0 ] || { echo "give at least one variant" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
rows=${ROWS:---table custom --batch 128 --seqlen 4096 8192 --heads 64 128 --seqlen-q 2}
export PYTHONUNBUFFERED=1

variants=("$@")
flags=()  # per variant: its source folder, '|', its nvcc flags (';'-separated for CMake)
envs=()   # per variant: its environment assignments
for v in "${variants[@]}"; do
  f="" e="" src="."
  for word in $v; do
    case $word in
      @*) e="$e ${word#@}" ;;
      src=*) src=${word#src=} ;;
      *) f="${f:+$f;}$word" ;;
    esac
  done
  flags+=("$src|$f")
  envs+=("$e")
done
builds=()  # distinct flag sets
build_of() {  # flag set -> build index (empty if not built)
  for b in "${!builds[@]}"; do [ "${builds[$b]}" = "$1" ] && echo "$b" && return; done
}
for f in "${flags[@]}"; do
  [ -n "$(build_of "$f")" ] || builds+=("$f")
done
build() {  # build index
  local b=$1
  local src=${builds[$b]%%|*} nvcc_flags=${builds[$b]#*|}
  if (cd "$repo/$src" && timeout 600 python3 -m pip install --no-build-isolation --no-deps \
        --no-compile --target "/tmp/ab-build-$b/site" -C "build-dir=/tmp/ab-build-$b/cmake" \
        -C "cmake.define.JAX_FLASHMLA_EXTRA_CUDA_FLAGS=$nvcc_flags" . > "$logs/build-$b.log" 2>&1)
  then
    echo "built $b: '${builds[$b]}'"
  else
    echo "build $b failed"
    tail -30 "$logs/build-$b.log"
  fi
}
for b in "${!builds[@]}"; do build "$b" & done
wait

cd /tmp || exit 1
n=${#variants[@]}
for r in $(seq 1 "${REPEATS:-2}"); do
  for k in $(seq 0 $((n - 1))); do
    i=$(( (k + r - 1) % n ))  # rotate which variant runs first
    site="/tmp/ab-build-$(build_of "${flags[$i]}")/site"
    [ -d "$site/jax_flashmla" ] || continue
    # shellcheck disable=SC2086
    env ${envs[$i]} PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" timeout "${BENCH_LIMIT:-240}" \
      python3 -m jax_flashmla.bench $rows --kernels hopper --no-reference \
      --json "$logs/bench-$i-$r.json" > "$logs/bench-$i-$r.log" 2>&1 || echo "bench $i/$r: exit $?"
  done
done

python3 - "$logs" "${variants[@]}" <<'EOF'
import json, pathlib, sys
logs, variants = pathlib.Path(sys.argv[1]), sys.argv[2:]
table = {}
for i, _ in enumerate(variants):
    for f in sorted(logs.glob(f"bench-{i}-*.json")):
        for row in json.loads(f.read_text())["rows"]:
            key = (row["batch"], row["seqlen_k"], row["heads_q"], row["seqlen_q"])
            kernel = row.get("hopper_kernel_ms")  # from a profiler trace (bench.py)
            table.setdefault(key, {}).setdefault(i, []).append(
                f"{row['hopper_ms']:.4f}" + (f" ({kernel:.4f})" if kernel else ""))
print("| b | s_k | h_q | s_q | " + " | ".join(f"'{v}' ms" for v in variants) + " |")
print("|---|---|---|---|" + "---|" * len(variants))
for key in sorted(table):
    cells = [" / ".join(table[key].get(i, [])) or "—"
             for i in range(len(variants))]
    print("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
EOF
