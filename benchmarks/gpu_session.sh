#!/usr/bin/env bash
# What a GPU session records for BENCHMARKS.md sections 2 and 3, in one call on the device machine:
#   build (sm_90a), the full test suite, bench_gpu.py --check, the two JSON runs, memcheck and racecheck.
#
#   bash benchmarks/gpu_session.sh $OUT                      # every step
#   STEPS="build tests" bash benchmarks/gpu_session.sh $OUT  # some of them, in this order
#
# Earlier H100 sessions took ~95 s to build, ~170 s for the tests, ~15 s for each JSON run and ~150 s for the
# two sanitizers; with --check that comes near the device tool's 10-minute limit per call, so the sanitizers
# can go in a second call (STEPS="memcheck racecheck"; the in-place build stays while the machine is held).
# Each step's output goes to $OUT/<step>.log; $OUT/summary.txt gets a line per step (exit status, seconds).
# A failed build stops the run; any other failure is recorded and the next step runs.
set -u
OUT=${1:?usage: gpu_session.sh OUT_DIR}
STEPS=${STEPS:-build tests check bench fused memcheck racecheck}
mkdir -p "$OUT"
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

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__)' >>"$OUT/gpu.txt" 2>&1
for step in $STEPS; do
  case $step in
  build) run_step build python3 setup.py -q build_ext --inplace || exit 1 ;;
  tests) run_step tests python3 -m pytest -q -n 8 tests ;;
  check) run_step check python3 benchmarks/bench_gpu.py --check ;;
  bench) run_step bench python3 benchmarks/bench_gpu.py --json "$OUT/gpu_bench.json" ;;
  fused) run_step fused python3 benchmarks/bench_fused_gpu.py --json "$OUT/fused_gpu.json" ;;
  memcheck | racecheck)
    run_step "$step" compute-sanitizer --tool "$step" --error-exitcode 1 python3 benchmarks/bench_gpu.py --small ;;
  *) echo "unknown step $step (build tests check bench fused memcheck racecheck)" && exit 2 ;;
  esac
done
