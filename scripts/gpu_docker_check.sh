#!/usr/bin/env bash
# The Dockerfile's GPU build stage without Docker, on the GPU machine (no Docker engine and no registry there):
#   - scripts/setup.sh is the one step left out: it downloads (apt, PyPI). Its results stand in: gpu-env.sh has
#     put the Debian packages' files under /opt/deps, and .venv/bin/python points at the machine's python3, which
#     has the same PyTorch 2.11 (CUDA 13) that requirements.txt pins;
#   - then exactly the image's steps: scripts/build.sh -DMQA_BUILD_TESTS=OFF -DMQA_BUILD_BENCH=OFF and
#     scripts/bundle_runtime.sh build/release DEST;
#   - then the runtime stage's view: a clean environment holding only the image's ENV (PATH and LD_LIBRARY_PATH
#     into the bundle, the MQA_* defaults, ports moved to free loopback ports), as uid 10001 when setpriv exists.
#     The server must start on the GPU with its embedded default model, answer health (the HEALTHCHECK command),
#     models and a session through mqa-cli, serve /metrics, and exit 0 on SIGTERM. ldd must resolve every library
#     of the bundle from the bundle (libcuda, the driver, comes from the host as the NVIDIA runtime mounts it).
# Usage (after `source gpu-env.sh`): scripts/gpu_docker_check.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/mqa-docker}
mkdir -p "$out"
dest=/tmp/opt-mqa
fail() { echo "docker-check: FAIL: $*"; exit 1; }

# A wrapper, not a symlink: a symlinked venv interpreter loses its venv's site-packages (and torch with them).
mkdir -p .venv/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > .venv/bin/python && chmod +x .venv/bin/python
echo "docker-check: setup.sh skipped (downloads); .venv/bin/python -> $(command -v python3) ($(python3 -c 'import torch; print(torch.__version__)'))"
MQA_BUILD_JOBS=${MQA_DOCKER_JOBS:-8} bash scripts/build.sh -DMQA_BUILD_TESTS=OFF -DMQA_BUILD_BENCH=OFF \
  > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; fail "scripts/build.sh"; }
echo "docker-check: scripts/build.sh -DMQA_BUILD_TESTS=OFF -DMQA_BUILD_BENCH=OFF: ok"
bash scripts/bundle_runtime.sh build/release "$dest" > "$out/bundle.log" 2>&1 || { tail -30 "$out/bundle.log"; fail "bundle"; }
echo "docker-check: scripts/bundle_runtime.sh build/release $dest: ok ($(du -sh "$dest" | cut -f1))"
chmod -R a+rX "$dest"

libpath="$dest/lib:$dest/python/torch/lib:$dest/python/nvidia/cu13/lib"
missing=$(for f in "$dest"/bin/* "$dest"/lib/*.so*; do env -i LD_LIBRARY_PATH="$libpath" ldd "$f" 2>/dev/null; done | grep -c "not found")
echo "docker-check: ldd in a clean environment: $missing unresolved libraries"
[ "$missing" -eq 0 ] || fail "unresolved libraries"

run=(env -i PATH="$dest/bin:/usr/sbin:/usr/bin:/sbin:/bin" LD_LIBRARY_PATH="$libpath" HOME=/nonexistent
     MQA_LISTEN=127.0.0.1:0 MQA_HEALTH_LISTEN=127.0.0.1:0 MQA_METRICS_LISTEN=127.0.0.1:0 MQA_LOG_FORMAT=json
     MQA_DRAIN_TIMEOUT_MS=30000)
as_user=()
if command -v setpriv >/dev/null && [ "$(id -u)" = 0 ]; then
  as_user=(setpriv --reuid 10001 --regid 10001 --clear-groups)
  echo "docker-check: running as uid 10001 (the image's USER)"
fi
state=$(mktemp -d) && chmod 777 "$state"
"${as_user[@]}" "${run[@]}" mqa-server --port-file "$state/port" --metrics-port-file "$state/mport" \
  > "$out/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do [ -s "$state/port" ] && [ -s "$state/mport" ] && break; sleep 0.1; done
[ -s "$state/port" ] || { tail -20 "$out/server.log"; fail "server did not start"; }
target="127.0.0.1:$(cat "$state/port")"
"${as_user[@]}" "${run[@]}" mqa-cli health --target "$target" > "$out/cli.txt" 2>&1 || fail "HEALTHCHECK command"
echo "docker-check: HEALTHCHECK (mqa-cli health): $(tail -1 "$out/cli.txt")"
"${as_user[@]}" "${run[@]}" mqa-cli models --target "$target" >> "$out/cli.txt" 2>&1 || fail "mqa-cli models"
"${as_user[@]}" "${run[@]}" mqa-cli session-demo --target "$target" --tokens 64 --prefill 32 --sessions 4 \
  >> "$out/cli.txt" 2>&1 || fail "mqa-cli session-demo"
grep -vE "^progress" "$out/cli.txt" | tail -8
python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
  "http://127.0.0.1:$(cat "$state/mport")/metrics" > "$out/metrics.txt" || fail "/metrics"
echo "docker-check: /metrics: $(grep -c '^mqa_' "$out/metrics.txt") samples, e.g. $(grep -m1 '^mqa_kv_cache_usage_ratio' "$out/metrics.txt")"
grep -m1 -o '"device[^,]*' "$out/server.log" | head -1
kill -TERM "$pid"
wait "$pid"
code=$?
echo "docker-check: server exit status after SIGTERM: $code"
# The default model on a GPU runs attn_impl triton: its decode passes replay CUDA graphs inside the worker.
echo "docker-check: graph capture failures logged: $(grep -c 'graph capture failed' "$out/server.log")"
grep -q 'graph capture failed' "$out/server.log" && fail "graph capture"
[ "$code" -eq 0 ] || fail "exit status"
echo "docker-check: PASS"
