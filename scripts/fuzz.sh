#!/usr/bin/env bash
# libFuzzer targets of tests/fuzz (wire conversion, safetensors reader, server configuration).
#
#   scripts/fuzz.sh replay         build, then run every committed input of tests/fuzz/corpus once (CI: seconds)
#   scripts/fuzz.sh run SECONDS    build, then fuzz each target for SECONDS into build/fuzz/corpus/<target>
#                                  (seeded from the committed corpus); crashes go to build/fuzz/artifacts/
#   scripts/fuzz.sh build          configure and build only
#
# Builds in build/fuzz with Debian 12's clang 16 (its default clang 14 cannot compile core: it refuses lambdas
# that capture structured bindings, which clang 16 accepts in C++17 as an extension). The whole tree gets
# -fsanitize=fuzzer-no-link,address,undefined (coverage and sanitizers inside the libraries under test); only
# the fuzz executables get -fsanitize=fuzzer. Installs clang-16 and libFuzzer's runtime (libclang-rt-16-dev)
# when missing, and the project's dependencies (scripts/setup.sh) when there is no venv yet. MQA_BUILD_JOBS
# overrides the job count (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-replay}
case "$mode" in
  replay|build) ;;
  run) seconds=${2:?usage: scripts/fuzz.sh run SECONDS} ;;
  *) echo "usage: scripts/fuzz.sh replay | run SECONDS | build" >&2; exit 2 ;;
esac

TARGETS=(wire safetensors config)
BUILD=build/fuzz

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
for p in clang-16 libclang-rt-16-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "fuzz: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ ! -x .venv/bin/python ]; then bash scripts/setup.sh; fi

# -O1 -g1 without NDEBUG: asserts stay on, stacks have lines, and the objects that include LibTorch's headers
# build in reasonable time. UBSan reports abort (no recovery), so libFuzzer records them as crashes.
# MQA_CUDA_CODE=OFF: nvcc takes none of these flags and no fuzzer reaches a kernel.
san="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B "$BUILD" -G Ninja -Wno-dev \
  -DCMAKE_C_COMPILER=clang-16 -DCMAKE_CXX_COMPILER=clang++-16 \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DCMAKE_CXX_FLAGS="$san" -DCMAKE_C_FLAGS="$san" \
  -DMQA_BUILD_FUZZERS=ON -DMQA_BUILD_TESTS=OFF -DMQA_BUILD_BENCH=OFF -DMQA_CUDA_CODE=OFF >"$BUILD.configure.log" ||
  { cat "$BUILD.configure.log"; exit 1; }
nice -n 10 cmake --build "$BUILD" --target mqa_fuzzers -j "${MQA_BUILD_JOBS:-2}"
[ "$mode" = build ] && exit 0

# LibTorch, gRPC and protobuf are not instrumented; their process-lifetime singletons are not leaks of ours, so
# leak checking stays off (ASan's memory errors and UBSan's reports still end the run).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:handle_abort=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [ -z "${ASAN_SYMBOLIZER_PATH:-}" ] && command -v llvm-symbolizer >/dev/null; then
  export ASAN_SYMBOLIZER_PATH=$(command -v llvm-symbolizer)  # stacks with function names and lines
fi
fuzzer() { echo "$BUILD/tests/fuzz/$1_fuzz"; }

if [ "$mode" = replay ]; then
  start=$(date +%s%N)
  for t in "${TARGETS[@]}"; do
    files=(tests/fuzz/corpus/"$t"/*)
    echo "fuzz: replaying ${#files[@]} inputs of tests/fuzz/corpus/$t"
    "$(fuzzer "$t")" -rss_limit_mb=4096 "${files[@]}" >"$BUILD/replay-$t.log" 2>&1 ||
      { tail -n 60 "$BUILD/replay-$t.log"; echo "fuzz: $t failed on its committed corpus" >&2; exit 1; }
  done
  echo "fuzz: replay passed in $(( ($(date +%s%N) - start) / 1000000 )) ms"
  exit 0
fi

mkdir -p "$BUILD/artifacts"
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "$BUILD/corpus/$t"
  dict=()
  if [ -f "tests/fuzz/$t.dict" ]; then dict=("-dict=tests/fuzz/$t.dict"); fi
  echo "fuzz: $t for ${seconds}s"
  "$(fuzzer "$t")" -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 -max_len=4096 \
    -timeout=10 "${dict[@]}" -artifact_prefix="$BUILD/artifacts/$t-" \
    "$BUILD/corpus/$t" "tests/fuzz/corpus/$t" >"$BUILD/run-$t.log" 2>&1 || status=1
  grep -E "^#[0-9]+.*(DONE|pulse)|stat::number_of_executed_units|stat::peak_rss|ERROR|SUMMARY" \
    "$BUILD/run-$t.log" | tail -n 6 || true
done
exit "$status"
