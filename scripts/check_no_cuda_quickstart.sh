#!/usr/bin/env bash
# The README's first quick-start command (bash scripts/demo.sh) as a stock Debian 12 without a CUDA toolkit runs
# it: in a fresh clone of this repository's HEAD, with its own .venv (pip's cache makes that quick), and every
# CUDA toolkit on the machine hidden. Passes when the demo exits 0, the build took the no-toolkit path, and the
# server answered the client (health SERVING, the model list, a session streamed with a non-zero throughput).
#
# Hiding, in a private mount namespace (unshare -m, so nothing outside it changes; needs root): an empty tmpfs
# over each toolkit folder (/usr/local/cuda*, and the root of an nvcc found on PATH), an empty non-executable
# file over any other nvcc on PATH (wrappers such as /usr/local/bin/nvcc), the toolkit's folders off PATH, the
# CUDA_* / CUDACXX variables unset. On a machine with no toolkit at all it just runs the demo.
# Tests and benchmarks are not built (the demo builds mqa-server and mqa-cli only); with ccache, CCACHE_BASEDIR
# set to the clone makes the cache's entries independent of the clone's folder, so a later run rebuilds cheaply.
# Each line of the demo's output is stamped with the seconds since it started. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/tmp}/mqa-no-cuda.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 143' TERM INT  # so that the EXIT trap cleans up under a timeout too
git clone -q "$repo" "$work/qs"
echo "no-cuda quick start: fresh clone of $(git -C "$work/qs" rev-parse --short HEAD) in $work/qs"

# The toolkit folders: every /usr/local/cuda* (links resolved) and the root of an nvcc on PATH (BIN/..).
hide=()
add_hide() {
  local d h
  d=$(readlink -f "$1") || return 0
  [ -d "$d" ] && [ -n "$(ls -A "$d/")" ] || return 0  # an empty folder hides nothing
  case "$d" in /|/usr|/usr/local|/opt) return 0 ;; esac  # never a system folder
  for h in "${hide[@]}"; do [ "$h" = "$d" ] && return 0; done
  hide+=("$d")
}
hidden() {  # whether path $1 lies in a folder to hide
  local r h
  r=$(readlink -f "$1" 2>/dev/null || echo "$1")
  for h in "${hide[@]}"; do case "$r/" in "$h"/*) return 0 ;; esac; done
  return 1
}
for d in /usr/local/cuda /usr/local/cuda-*; do [ -e "$d" ] && add_hide "$d"; done
IFS=: read -r -a path_dirs <<< "$PATH"
for p in "${path_dirs[@]}"; do
  if [ -z "$p" ] || [ ! -x "$p/nvcc" ]; then continue; fi
  root=$(dirname "$(dirname "$(readlink -f "$p/nvcc")")")
  if [ -e "$root/include/cuda_runtime_api.h" ]; then add_hide "$root"; fi
done
nvcc_files=()  # nvcc outside those folders (wrappers): covered one by one
keep_path=()
for p in "${path_dirs[@]}"; do
  if hidden "$p"; then continue; fi
  keep_path+=("$p")
  if [ -n "$p" ] && [ -x "$p/nvcc" ]; then nvcc_files+=("$p/nvcc"); fi
done

# The runner, the same with and without hiding: the demo in the clone, its output stamped into the log.
log="$work/demo.log"
cat > "$work/run.sh" <<'EOF'
set -euo pipefail
cd "$1"; shift
SECONDS=0
CCACHE_BASEDIR=$PWD bash scripts/demo.sh "$@" 2>&1 | while IFS= read -r line; do
  printf '[%4ds] %s\n' "$SECONDS" "$line"
done
EOF
rc=0
if [ ${#hide[@]} -eq 0 ] && [ ${#nvcc_files[@]} -eq 0 ]; then
  echo "no-cuda quick start: no CUDA toolkit on this machine; running the demo as it is"
  bash "$work/run.sh" "$work/qs" "$@" > "$log" || rc=$?
else
  echo "no-cuda quick start: hiding ${hide[*]} ${nvcc_files[*]}"
  : > "$work/not-nvcc"
  chmod 0644 "$work/not-nvcc"
  export MQA_HIDE_DIRS="${hide[*]}" MQA_HIDE_FILES="${nvcc_files[*]}" MQA_NOT_NVCC="$work/not-nvcc"
  MQA_NEW_PATH=$(IFS=:; echo "${keep_path[*]}")
  export MQA_NEW_PATH
  # shellcheck disable=SC2016  # expanded by the inner shell
  unshare -m --propagation private bash -c '
    set -euo pipefail
    for d in $MQA_HIDE_DIRS; do mount -t tmpfs -o size=1m,mode=0755 mqa-no-cuda "$d"; done
    for f in $MQA_HIDE_FILES; do mount --bind "$MQA_NOT_NVCC" "$f"; done
    export PATH=$MQA_NEW_PATH
    unset CUDA_HOME CUDA_PATH CUDA_ROOT CUDACXX CUDAToolkit_ROOT CUDA_TOOLKIT_ROOT_DIR MQA_HIDE_DIRS MQA_HIDE_FILES
    IFS=: read -r -a dirs <<< "$PATH"
    for p in "${dirs[@]}"; do
      if [ -x "$p/nvcc" ]; then echo "no-cuda quick start: nvcc still on PATH: $p/nvcc" >&2; exit 3; fi
    done
    for d in /usr/local/cuda*; do
      if [ -n "$(ls -A "$d/" 2>/dev/null)" ]; then echo "no-cuda quick start: $d still visible" >&2; exit 3; fi
    done
    exec bash "$@"
  ' bash "$work/run.sh" "$work/qs" "$@" > "$log" || rc=$?
fi

stamp='^\[ *[0-9]+s\] '
fail() {
  echo "no-cuda quick start: FAILED: $1 (last lines of the demo's output:)" >&2
  tail -40 "$log" >&2 || true
  exit 1
}
[ "$rc" -eq 0 ] || fail "the demo exited $rc"
grep -Eq "${stamp}-- mqaserve: no CUDA toolkit" "$log" || fail "the configure did not take the no-toolkit path"
grep -Eq "${stamp}SERVING$" "$log" || fail "mqa-cli health did not answer SERVING"
grep -Eq "${stamp}model .*layers" "$log" || fail "mqa-cli models listed no model"
tput=$(sed -En "s/${stamp}throughput: ([0-9.]+) tokens\/s.*/\1/p" "$log" | tail -1)
awk -v t="${tput:-0}" 'BEGIN { exit !(t > 0) }' || fail "mqa-cli session-demo streamed no tokens"
# The phases' times: setup, configure, the build's first and last steps, the demo's answers.
grep -E "${stamp}(setup \(|Preset CMake|-- Build files|\[1/|demo: mqa-server|SERVING|throughput)" "$log" || true
grep -E "${stamp}\[[0-9]+/[0-9]+\] " "$log" | tail -1 || true
echo "no-cuda quick start: passed in $(( $(date +%s) - start )) s (server answered: SERVING, $tput tokens/s)"
