#!/usr/bin/env bash
# The project's tests under sanitizers, on the CPU (CI runs it after scripts/test.sh):
#
#   ASan + UBSan, preset asan (build/asan): mqa_core_test (layer, weights, engine, batching, exactness),
#     mqa_block_pool_test, mqa_service_test (in-process server), mqa_client_e2e_test and the Python service
#     tests (tests/service), the last two against an instrumented mqa-server and mqa-cli.
#   TSan, preset tsan (build/tsan): the engine's suites of mqa_core_test (Engine, Batching, Exactness,
#     Replicas, Placement, Devices). The layer and weights suites are single-threaded, and the service tests stay
#     out: gRPC and protobuf are not instrumented and their absl-based locking floods TSan with false races
#     (hundreds in mqa_service_test, which then ran past 10 minutes).
#
#   scripts/sanitize.sh [asan|tsan|all]      default all; MQA_BUILD_JOBS overrides the job count
#
# Wall time from clean build dirs on the 2-core CI VM (Debian 12, measured): 7.5 minutes, asan 6.4 (build 3.8,
# tests 2.6) and tsan 1.1 (build 0.9, tests 0.2); 11.5 minutes while other builds shared the machine.
#
# Only the project's targets are instrumented (MQA_SANITIZE in CMakeLists.txt); LibTorch, gRPC and protobuf are
# not, which is what tests/sanitizers/*.supp is about. Every report, from any instrumented process (the servers
# the Python tests start included), goes to a file under build/<preset>/sanitizer-reports; the run fails when a
# test fails or any report was written, and prints the reports.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SUPP=$ROOT/tests/sanitizers
JOBS=${MQA_BUILD_JOBS:-$(nproc)}

which=${1:-all}
case "$which" in
  asan|tsan|all) ;;
  *) echo "usage: scripts/sanitize.sh [asan|tsan|all]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then bash scripts/setup.sh; fi

failed=()

# Runs one test command, records its failure without stopping the others (a hang is cut after 15 minutes).
run_step() {
  local name=$1
  shift
  echo "sanitize: $name"
  local start=$SECONDS
  if timeout 900 "$@"; then
    echo "sanitize: $name passed ($((SECONDS - start)) s)"
  else
    echo "sanitize: $name FAILED (exit $?, $((SECONDS - start)) s)"
    failed+=("$name")
  fi
}

build() {
  local preset=$1
  echo "sanitize: building preset $preset"
  nice -n 10 cmake --preset "$preset" >"build/$preset.configure.log" 2>&1 ||
    { cat "build/$preset.configure.log"; exit 1; }
  nice -n 10 cmake --build --preset "$preset" -j "$JOBS"
}

# Prints what the runtimes wrote under $1; a report (not a warning such as allocator_may_return_null's "failed
# to allocate") counts as a failure.
check_reports() {
  local dir=$1 preset=$2
  local files reports
  files=$(find "$dir" -type f | sort)
  [ -z "$files" ] && return 0
  for f in $files; do
    echo "===== $f"
    cat "$f"
  done
  # shellcheck disable=SC2086  # file names are the runtimes' own: prefix.exe.pid, no spaces
  reports=$(grep -l -E 'ERROR: [A-Za-z]+Sanitizer|WARNING: ThreadSanitizer|runtime error:' $files || true)
  if [ -n "$reports" ]; then failed+=("$preset: $(echo "$reports" | wc -l) sanitizer report(s)"); fi
}

run_asan() {
  local start=$SECONDS
  mkdir -p build
  build asan
  local bin=build/asan reports=build/asan/sanitizer-reports
  rm -rf "$reports" && mkdir -p "$reports"
  # detect_leaks stays on: LibTorch's and gRPC's process-lifetime allocations are still reachable at exit, so
  # nothing needs suppressing (lsan.supp says so). The stack-use-after-return and init-order checks cost little
  # here and catch callbacks that outlive their frame and static-initialisation order bugs.
  # allocator_may_return_null: the OutOfMemory tests ask LibTorch for more than any allocator grants and expect
  # RESOURCE_EXHAUSTED; glibc returns null there (LibTorch then throws), ASan would abort the process instead.
  export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:print_stacktrace=1:detect_leaks=1:\
detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:strict_string_checks=1:\
allocator_may_return_null=1:log_path=$ROOT/$reports/asan:log_exe_name=1"
  export LSAN_OPTIONS="suppressions=$SUPP/lsan.supp:print_suppressions=0"
  # -fno-sanitize-recover=all already makes the first report fatal; halt_on_error says it to the runtime too.
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:suppressions=$SUPP/ubsan.supp:\
log_path=$ROOT/$reports/ubsan:log_exe_name=1"
  # Each test's name is printed (no --gtest_brief): a report ends the process, and the last RUN line names the
  # test that made it.
  run_step "asan: mqa_core_test" "$bin/tests/mqa_core_test"
  run_step "asan: mqa_block_pool_test" "$bin/tests/mqa_block_pool_test"
  run_step "asan: mqa_service_test" "$bin/tests/mqa_service_test"
  MQA_SERVER_BIN=$ROOT/$bin/server/mqa-server \
    run_step "asan: mqa_client_e2e_test" "$bin/tests/mqa_client_e2e_test"
  # Deselected: the RSS bounds (the largest Forward's peak, a stalled stream's growth) measure the allocator, and
  # ASan's (redzones, a quarantine that keeps freed memory resident, per-thread caches) is not the one production
  # runs; the release run checks them.
  MQA_SERVER_BIN=$ROOT/$bin/server/mqa-server MQA_CLI_BIN=$ROOT/$bin/client/mqa-cli \
    run_step "asan: tests/service (pytest)" .venv/bin/python -m pytest -q -p no:cacheprovider tests/service \
    --deselect tests/service/test_forward_work.py::test_largest_admitted_forward_grows_rss_linearly \
    --deselect tests/service/test_wire_bounds.py::test_a_stream_whose_answers_are_never_read_holds_bounded_memory
  unset ASAN_OPTIONS LSAN_OPTIONS UBSAN_OPTIONS
  check_reports "$reports" asan
  echo "sanitize: asan done in $((SECONDS - start)) s"
}

run_tsan() {
  local start=$SECONDS
  mkdir -p build
  build tsan
  local bin=build/tsan reports=build/tsan/sanitizer-reports
  rm -rf "$reports" && mkdir -p "$reports"
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=4:\
suppressions=$SUPP/tsan.supp:print_suppressions=0:log_path=$ROOT/$reports/tsan:log_exe_name=1"
  # One intra-op thread: LibTorch's OpenMP (libgomp) is not instrumented, so its worker handoffs would show as
  # races inside LibTorch kernels; the engine's own threads (workers, reaper, callers) are what is under test.
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  # Without address-space randomisation: TSan's fixed shadow layout fails on kernels whose mmap randomisation
  # (vm.mmap_rnd_bits 32) places libraries where this GCC 12 runtime does not expect them.
  local norand=()
  if setarch "$(uname -m)" -R true 2>/dev/null; then norand=(setarch "$(uname -m)" -R); fi
  run_step "tsan: mqa_core_test (engine suites)" "${norand[@]}" "$bin/tests/mqa_core_test" \
    --gtest_filter='Engine.*:Batching.*:Exactness.*:Replicas.*:Placement.*:Devices.*'
  unset TSAN_OPTIONS OMP_NUM_THREADS MKL_NUM_THREADS
  check_reports "$reports" tsan
  echo "sanitize: tsan done in $((SECONDS - start)) s"
}

case "$which" in
  asan) run_asan ;;
  tsan) run_tsan ;;
  all) run_asan; run_tsan ;;
esac

if [ ${#failed[@]} -gt 0 ]; then
  printf 'sanitize: FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "sanitize: all passed"
