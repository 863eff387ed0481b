#!/usr/bin/env bash
# What a GPU session records for BENCHMARKS.md sections 2 and 3, in one call on the device machine:
#   build (sm_90a), the full test suite, bench_gpu.py --check, the two JSON runs, memcheck and racecheck.
#
#   bash benchmarks/gpu_session.sh $OUT                      # every step
#   STEPS="build tests" bash benchmarks/gpu_session.sh $OUT  # some of them, in this order
#   STEPS="ab tests bench fused memcheck racecheck" bash benchmarks/gpu_session.sh $OUT
#   STEPS="probes" bash benchmarks/gpu_session.sh $OUT   # compile and run benchmarks/experiments/*.cu (seconds)
#
# The step `ab` (not in the default list) builds main and every benchmarks/experiments/*.patch applied to a copy,
# times them against each other (ab_builds.py; cases from AB_CASES, e.g. "forward:256,3000000,64,32", rounds
# from AB_ROUNDS) and picks the tree to go on with (ab_builds.py --pick: a patch only where its outputs are
# bitwise main's and it is faster). The steps after it run in that tree, so one call both times a change and
# tests the build that would land.
#
# Earlier H100 sessions took ~95 s to build, ~170 s for the tests, ~15 s for each JSON run and ~150 s for the
# two sanitizers; with --check that comes near the device tool's 10-minute limit per call, so the sanitizers
# can go in a second call (STEPS="memcheck racecheck"; the in-place build stays while the machine is held).
# Each step's output goes to $OUT/<step>.log; $OUT/summary.txt gets a line per step (exit status, seconds).
# A failed build stops the run; any other failure is recorded and the next step runs.
set -u
shopt -s nullglob  # an empty benchmarks/experiments gives empty loops, not the literal pattern
OUT=${1:?usage: gpu_session.sh OUT_DIR}
STEPS=${STEPS:-build tests check bench fused memcheck racecheck}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONPATH=$PWD

run_step() {
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s, $(date -u +%H:%M) UTC" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
  return $rc
}

build_here() { run_step build python3 setup.py -q build_ext --inplace || exit 1; }

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__)' >>"$OUT/gpu.txt" 2>&1
for step in $STEPS; do
  case $step in
  build) build_here ;;
  ab)
    patches=() cases=()
    for p in benchmarks/experiments/*.patch; do
      if patch -p1 -s --dry-run <"$p" >/dev/null 2>&1; then patches+=(--patch "$(basename "$p" .patch)=$p")
      else echo "ab: $p does not apply to main; left out" | tee -a "$OUT/summary.txt"; fi
    done
    for c in ${AB_CASES:-}; do cases+=(--case "$c"); done
    if [ ${#patches[@]} -eq 0 ]; then
      echo "ab: no patch in benchmarks/experiments; building main" | tee -a "$OUT/summary.txt"
      build_here
    elif run_step ab python3 benchmarks/ab_builds.py --build --rounds "${AB_ROUNDS:-3}" "${patches[@]}" \
      ${cases[@]+"${cases[@]}"} --json "$OUT/ab.json" --pick "$OUT/pick.txt"; then
      cd "$(cat "$OUT/pick.txt")" && export PYTHONPATH=$PWD
      echo "later steps run in $PWD" | tee -a "$OUT/summary.txt"
    else  # a patch that does not apply, build or run: go on with main
      build_here
    fi ;;
  tests) run_step tests python3 -m pytest -q -n 8 tests ;;
  check) run_step check python3 benchmarks/bench_gpu.py --check ;;
  bench) run_step bench python3 benchmarks/bench_gpu.py --json "$OUT/gpu_bench.json" ;;
  fused) run_step fused python3 benchmarks/bench_fused_gpu.py --json "$OUT/fused_gpu.json" ;;
  probes)  # the standalone probes in benchmarks/experiments (each prints its own table)
    for f in benchmarks/experiments/*.cu; do
      exe=/tmp/$(basename "$f" .cu)
      run_step "probe_$(basename "$f" .cu)" bash -c "nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 \
        -o $exe $f && $exe"
    done ;;
  memcheck | racecheck)
    run_step "$step" compute-sanitizer --tool "$step" --error-exitcode 1 python3 benchmarks/bench_gpu.py --small ;;
  *) echo "unknown step $step (build ab tests check bench fused probes memcheck racecheck)" && exit 2 ;;
  esac
done
