#!/usr/bin/env bash
# One call on the GPU machine (device tool): build, run the whole test suite with the CUDA paths, benchmark.
# Carried paths: .device-debs (../shared/gpu/fetch-debs.sh), .whl (Python wheels the machine lacks), and
# .shared-gpu (a copy of ../shared/gpu, used when ../shared did not travel).
# Usage: scripts/gpu_run.sh [all|test|bench]      results under $OUT (default /tmp/mqa-out)
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/mqa-out}
mkdir -p "$OUT"
if [ -f ../shared/gpu/gpu-env.sh ]; then
  echo "gpu_run: ../shared arrived"; env_sh=../shared/gpu/gpu-env.sh
else
  echo "gpu_run: ../shared did not arrive; using the carried copy .shared-gpu"; env_sh=.shared-gpu/gpu-env.sh
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
# shellcheck disable=SC1090
source "$env_sh" .device-debs
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
set -e
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMQA_PYTHON="$(command -v python3)" > "$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j16 > "$OUT/build.log" 2>&1 || { grep -E 'error' -A5 "$OUT/build.log" | head -60; exit 1; }
set +e
rc=0
if [ "$what" = all ] || [ "$what" = test ]; then
  ctest --test-dir build-gpu --output-on-failure -j4 > "$OUT/ctest.log" 2>&1; rc=$?
  grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/ctest.log" | grep -v Skipped | tail -30
  build-gpu/tests/mqa_reference_test build-gpu/reference_cases --gtest_brief=1 > "$OUT/reference.log" 2>&1
  grep -cE "^\[       OK \].*cuda_" "$OUT/reference.log" >/dev/null
  echo "reference: $(grep -E '^\[  PASSED|^\[  FAILED' "$OUT/reference.log" | head -3 | tr '\n' ' ')"
  build-gpu/tests/mqa_reference_test build-gpu/reference_cases --gtest_filter='*cuda*' --gtest_brief=1 2>&1 | tail -3
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  # Twice, so the spread between two identical runs shows what counts as noise.
  for pass in 1 2; do
    mkdir -p "$OUT/pass$pass"
    python3 bench/run_layer_bench.py --build build-gpu --out "$OUT/pass$pass" --devices cuda > "$OUT/bench$pass.txt" 2>&1
    sed -n '/== layer forward/,$p' "$OUT/bench$pass.txt"
  done
fi
exit $rc
