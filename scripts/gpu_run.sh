#!/usr/bin/env bash
# One call on a GPU machine that reaches no package registry: build, run the whole test suite with the CUDA paths,
# benchmark (docs/gpu.md). It needs, beside the working tree (all three are in .gitignore):
#   .device-debs  the Debian 12 packages that machine lacks (gRPC, protobuf, spdlog, GoogleTest, ...; docs/gpu.md
#                 lists them: the GPU environment folder's fetch-debs.sh and deps.list, plus libgmock-dev
#                 libcpp-httplib-dev libcpp-httplib0.11 libbrotli-dev libbrotli1 for the metrics server, and
#                 libcli11-dev for the tools' command lines)
#   .whl          Python wheels the machine lacks (installed into /tmp/site, no index)
#   the GPU environment folder: gpu-env.sh (unpacks .device-debs into /opt/deps and exports PATH,
#                 LD_LIBRARY_PATH, CMAKE_PREFIX_PATH, ...), with deps.list and fetch-debs.sh beside it.
#                 MQA_GPU_ENV_DIR names it (default .shared-gpu; relative to the repository root); set it empty
#                 on a machine whose packages are installed system-wide.
# Usage: scripts/gpu_run.sh [MODE]...   (no MODE: all)   results under $OUT (default /tmp/mqa-out)
#   all             test, bench, batch, service and kernels
#   test            the CTest suite (deploy checks excepted) and the reference cases on CUDA
#   bench           the layer benchmark, twice (the spread between the two is the noise)
#   batch           the continuous-batching benchmark, in process and over gRPC
#   service         mqa-server on the GPU driven by mqa-cli session-demo (default model, a dim-4096 model)
#   kernels         the CUDA kernel tests (also under compute-sanitizer memcheck) and mqa-bench-kernels
#   engine          the engine's CUDA tests only (batching, several devices, the layer on CUDA)
#   engine-kernels  the engine benchmark with the fused kernels (triton) against the torch math (flash)
#   profile         Nsight Compute (ncu) on the decode kernel and the layer step's graph, for the cases whose
#                   targets the kernel bench measures (text reports under $OUT/ncu)
#   docker          the Dockerfile's build-stage steps (setup.sh's downloads excepted) and a run of the bundle
set -uo pipefail
cd "$(dirname "$0")/.."
what=" ${*:-all} "
for mode in $what; do
  case "$mode" in
    all|test|bench|batch|service|kernels|engine|engine-kernels|profile|docker) ;;
    *) echo "gpu_run: unknown mode '$mode'; see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
want() { [[ "$what" == *" all "* || "$what" == *" $1 "* ]]; }
OUT=${OUT:-/tmp/mqa-out}
mkdir -p "$OUT"
gpu_env_dir=${MQA_GPU_ENV_DIR-.shared-gpu}
env_sh=""
if [ -n "$gpu_env_dir" ]; then
  env_sh=$gpu_env_dir/gpu-env.sh
  if [ ! -f "$env_sh" ]; then
    echo "gpu_run: no $env_sh: copy the GPU environment folder to .shared-gpu, or point MQA_GPU_ENV_DIR at it" \
      "(empty: packages installed system-wide); docs/gpu.md" >&2
    exit 2
  fi
  echo "gpu_run: GPU environment from $gpu_env_dir"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
# gpu-env.sh unpacks the .debs once per machine; a warm machine still needs the ones added since.
if [ -f /opt/deps/.unpacked ]; then
  for f in .device-debs/*.deb; do
    m="/opt/deps/.got-$(basename "$f")"
    [ -f "$m" ] || { dpkg -x "$f" /opt/deps && touch "$m"; }
  done
fi
if [ -n "$env_sh" ]; then
  # shellcheck disable=SC1090
  source "$env_sh" .device-debs
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if [[ "$what" == *" docker "* ]]; then
  # In the background, beside the test build: the image's build steps, then its runtime as the image runs it.
  bash scripts/gpu_docker_check.sh "$OUT/docker" > "$OUT/docker.log" 2>&1 &
  docker_pid=$!
fi
set -e
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMQA_PYTHON="$(command -v python3)" > "$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j"${MQA_BUILD_JOBS:-16}" > "$OUT/build.log" 2>&1 || { grep -E 'error' -A5 "$OUT/build.log" | head -60; exit 1; }
set +e
rc=0
if want test; then
  # Deployment lint (hadolint, yamllint, kubernetes-validate) is CPU-side work that CI runs; nginx and
  # Prometheus are not on this machine, so their tests skip here (and only here).
  MQA_ALLOW_MISSING_TOOLS=1 timeout 240 ctest --test-dir build-gpu --output-on-failure -j6 -LE deploy > "$OUT/ctest.log" 2>&1; rc=$?
  grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/ctest.log" | grep -v Skipped | tail -30
  build-gpu/tests/mqa_reference_test build-gpu/reference_cases --gtest_brief=1 > "$OUT/reference.log" 2>&1
  grep -cE "^\[       OK \].*cuda_" "$OUT/reference.log" >/dev/null
  echo "reference: $(grep -E '^\[  PASSED|^\[  FAILED' "$OUT/reference.log" | head -3 | tr '\n' ' ')"
  build-gpu/tests/mqa_reference_test build-gpu/reference_cases --gtest_filter='*cuda*' --gtest_brief=1 2>&1 | tail -3
fi
if want bench; then
  # Twice, so the spread between two identical runs shows what counts as noise.
  for pass in 1 2; do
    mkdir -p "$OUT/pass$pass"
    python3 bench/run_layer_bench.py --build build-gpu --out "$OUT/pass$pass" --devices cuda > "$OUT/bench$pass.txt" 2>&1
    sed -n '/== layer forward/,$p' "$OUT/bench$pass.txt"
  done
fi
if want batch; then
  # Continuous batching vs one step per pass, in process and over gRPC, same run: the speedup is batching's alone.
  python3 bench/run_engine_bench.py --preset gpu --build build-gpu --out "$OUT/batch" > "$OUT/batch.txt" 2>&1
  echo "batch bench rc=$?"; tail -30 "$OUT/batch.txt"
fi
if [[ "$what" == *" engine-kernels "* ]]; then
  # The engine in process with the fused kernels (triton) and with the torch math of the paged pass (flash),
  # same run, batched and one step per pass.
  for impl in triton flash; do
    timeout 110 python3 bench/run_engine_bench.py --preset gpu --attn-impl $impl --skip-service --sessions 64,256 \
      --build build-gpu --out "$OUT/engine-$impl" > "$OUT/engine-$impl.txt" 2>&1
    echo "== engine bench, attn_impl $impl: rc=$?"; grep -E "^ *[0-9]|tokens/s|speed" "$OUT/engine-$impl.txt" | tail -12
  done
fi
if want service; then
  # The main job on the GPU: mqa-server with its embedded default model (bf16 on cuda:0, triton), then a model of
  # dim 4096 / 32 heads, each driven by mqa-cli session-demo over loopback with the server's default batching.
  run_service() {  # name, extra server args, demo args...
    local name=$1 sargs=$2; shift 2
    rm -f "$OUT/$name.port"
    # shellcheck disable=SC2086
    build-gpu/server/mqa-server --listen 127.0.0.1:0 --port-file "$OUT/$name.port" $sargs > "$OUT/$name-server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 600); do [ -s "$OUT/$name.port" ] && break; sleep 0.1; done
    local target="127.0.0.1:$(cat "$OUT/$name.port")"
    build-gpu/client/mqa-cli --target "$target" models > "$OUT/$name-demo.txt" 2>&1
    build-gpu/client/mqa-cli --target "$target" session-demo "$@" >> "$OUT/$name-demo.txt" 2>&1
    kill -TERM $pid; wait $pid; echo "server exit: $?" >> "$OUT/$name-demo.txt"
    echo "== $name: session-demo $*"; grep -vE "^progress" "$OUT/$name-demo.txt" | tail -6
  }
  run_service default "" --tokens 256 --prefill 64
  run_service default8 "" --tokens 128 --prefill 64 --sessions 8
  cat > "$OUT/big.json" <<'JSON'
{"models": [{"name": "mqa-4096", "num_layers": 4, "dim": 4096, "heads": 32, "device": "cuda:0", "dtype": "bfloat16",
             "attn_impl": "flash", "max_tokens_per_session": 8192}]}
JSON
  run_service big "--config $OUT/big.json" --tokens 128 --prefill 512
  run_service big8 "--config $OUT/big.json" --tokens 64 --prefill 512 --sessions 8
fi
if [[ "$what" == *" engine "* ]]; then
  # The engine's CUDA tests only (the full suite is the test mode): batching, several devices, the layer on CUDA.
  timeout 300 build-gpu/tests/mqa_core_test --gtest_filter='Batching.*:MultiDevice.*:Engine.*:*Cuda*:*cuda*' \
    > "$OUT/engine_test.log" 2>&1; k=$?; [ $k -eq 0 ] || rc=$k
  echo "engine tests rc=$k: $(grep -E '^\[  PASSED|^\[  FAILED|^\[  SKIPPED' "$OUT/engine_test.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED|Failure" -A6 "$OUT/engine_test.log" | head -40
fi
if want kernels; then
  build-gpu/tests/mqa_kernel_test > "$OUT/kernel_test.log" 2>&1; k=$?; [ $k -eq 0 ] || rc=$k
  echo "kernel tests rc=$k: $(grep -E '^\[  PASSED|^\[  FAILED' "$OUT/kernel_test.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED|Failure|error" -A4 "$OUT/kernel_test.log" | head -40
  # Memcheck needs every buffer to be its own allocation: PyTorch's caching allocator hides overruns.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
    build-gpu/tests/mqa_kernel_test --gtest_filter='PagedDecodeKernel.SmallCaseForSanitizer:KvAppendKernel.*' \
    > "$OUT/sanitizer.log" 2>&1; k=$?; [ $k -eq 0 ] || rc=$k
  echo "compute-sanitizer memcheck rc=$k: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  build-gpu/bench/mqa-bench-kernels --json "$OUT/bench-kernels.json" > "$OUT/bench-kernels.txt" 2>&1
  echo "bench rc=$?"; cat "$OUT/bench-kernels.txt"
fi
if [[ "$what" == *" profile "* ]]; then
  mkdir -p "$OUT/ncu"
  sections="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats"
  prof() {  # name, bench args...
    local name=$1; shift
    # shellcheck disable=SC2086
    timeout 120 ncu --target-processes all --kernel-name regex:'PagedDecode|MergeSplits' --launch-skip 2 \
      --launch-count 2 --cache-control all $sections build-gpu/bench/mqa-bench-kernels "$@" \
      > "$OUT/ncu/$name.txt" 2>&1
    echo "== ncu $name ($*): rc=$?"
    grep -E "PagedDecode|MergeSplits|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Ipc|Stall|One or More Eligible" \
      "$OUT/ncu/$name.txt" | sed 's/  */ /g' | head -40
  }
  prof decode-b1-l8k-s1 --profile-decode 1,8192,1
  prof decode-b1-l8k --profile-decode 1,8192
  prof decode-b64-l8k --profile-decode 64,8192
  prof decode-b256-l8k --profile-decode 256,8192
  # Every kernel of the layer step's graph, with its duration (no cache flush, as in serving).
  timeout 120 ncu --target-processes all --graph-profiling node --launch-skip 0 --launch-count 40 --cache-control none \
    --section SpeedOfLight build-gpu/bench/mqa-bench-kernels --profile-layer 1,1024 > "$OUT/ncu/layer-b1-l1k.txt" 2>&1
  echo "== ncu layer B=1 L=1k: rc=$?"
  grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput" "$OUT/ncu/layer-b1-l1k.txt" | sed 's/  */ /g' | tail -60
fi
if [ -n "${docker_pid:-}" ]; then
  wait "$docker_pid"; k=$?; [ $k -eq 0 ] || rc=$k
  echo "== docker build steps rc=$k"; tail -25 "$OUT/docker.log"
fi
exit $rc
