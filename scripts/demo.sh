#!/usr/bin/env bash
# Quick start, command 1: install what is missing (setup.sh's demo profile), build mqa-server and mqa-cli (release
# preset), then the main job: mqa-server on 127.0.0.1 with the embedded default model, and mqa-cli streaming a
# session through every layer of it.
# Extra arguments go to `mqa-cli session-demo` (e.g. --tokens 256 --prefill 64 --sessions 8).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
bash scripts/build.sh demo

work=$(mktemp -d)
# Loopback only, ephemeral ports (the metrics endpoint too, so nothing on the machine can be in the way).
build/release/server/mqa-server --listen 127.0.0.1:0 --port-file "$work/port" \
  --metrics-listen 127.0.0.1:0 --metrics-port-file "$work/metrics-port" &
server=$!
cleanup() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  [ -s "$work/port" ] && break
  kill -0 "$server" 2>/dev/null || { echo "demo: mqa-server exited early" >&2; exit 1; }
  sleep 0.1
done
[ -s "$work/port" ] || { echo "demo: mqa-server did not start within 60 s" >&2; exit 1; }
port=$(cat "$work/port")
echo "demo: mqa-server listening on 127.0.0.1:$port"
build/release/client/mqa-cli health --target "127.0.0.1:$port"
build/release/client/mqa-cli models --target "127.0.0.1:$port"
build/release/client/mqa-cli session-demo --target "127.0.0.1:$port" "$@"
echo "demo: the server's metrics (http://127.0.0.1:$(cat "$work/metrics-port")/metrics):"
curl -s "http://127.0.0.1:$(cat "$work/metrics-port")/metrics" 2>/dev/null \
  | grep -E '^mqa_(steps_total|sessions_created_total|kv_cache_blocks|batch_size_count) ' || true
