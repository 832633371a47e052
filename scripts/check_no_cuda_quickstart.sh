#!/usr/bin/env bash
# The README's first quick-start command (bash scripts/demo.sh) as a stock Debian 12 without a CUDA toolkit runs
# it: in a fresh clone of this repository's HEAD, with its own .venv (pip's cache makes that quick), and every
# CUDA toolkit on the machine hidden. Passes when the demo exits 0, the build took the no-toolkit path, and the
# server answered the client (health SERVING, the model list, a session streamed with a non-zero throughput).
#
# Hiding, in a private mount namespace (unshare -m, so nothing outside it changes; needs root): an empty tmpfs
# over each toolkit folder (/usr/local/cuda*, and the folder of an nvcc found on PATH), an empty
# non-executable file over any other nvcc on PATH (wrappers such as /usr/local/bin/nvcc), the toolkit's folders
# off PATH and the CUDA_* / CUDACXX variables unset. On a machine with no toolkit at all it just runs the demo.
# Tests and benchmarks are not built (the demo builds mqa-server and mqa-cli only); with ccache, CCACHE_BASEDIR
# set to the clone makes the cache's entries independent of the clone's folder, so a later run rebuilds cheaply.
# Extra arguments go to the demo (and so to mqa-cli session-demo).
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
  local d
  d=$(readlink -f "$1") || return 0
  [ -d "$d" ] || return 0
  case "$d" in /|/usr|/usr/local|/opt) return 0 ;; esac  # never a system folder
  for h in "${hide[@]}"; do [ "$h" = "$d" ] && return 0; done
  hide+=("$d")
}
for d in /usr/local/cuda /usr/local/cuda-*; do [ -e "$d" ] && add_hide "$d"; done
nvcc_files=()
IFS=: read -r -a path_dirs <<< "$PATH"
for p in "${path_dirs[@]}"; do
  if [ -z "$p" ] || [ ! -x "$p/nvcc" ]; then continue; fi
  real=$(readlink -f "$p/nvcc")
  root=$(dirname "$(dirname "$real")")
  if [ -e "$root/include/cuda_runtime_api.h" ]; then add_hide "$root"; fi
  nvcc_files+=("$p/nvcc")
done

log="$work/demo.log"
run_demo() {
  (cd "$work/qs" && CCACHE_BASEDIR="$work/qs" bash scripts/demo.sh "$@") > "$log" 2>&1
}
if [ ${#hide[@]} -eq 0 ] && [ ${#nvcc_files[@]} -eq 0 ]; then
  echo "no-cuda quick start: no CUDA toolkit on this machine; running the demo as it is"
  rc=0; run_demo "$@" || rc=$?
else
  echo "no-cuda quick start: hiding ${hide[*]} ${nvcc_files[*]}"
  : > "$work/not-nvcc"
  chmod 0644 "$work/not-nvcc"
  keep_path=()
  for p in "${path_dirs[@]}"; do
    inside=0
    for h in "${hide[@]}"; do case "$(readlink -f "$p" 2>/dev/null || echo "$p")/" in "$h"/*) inside=1 ;; esac; done
    [ $inside -eq 1 ] || keep_path+=("$p")
  done
  new_path=$(IFS=:; echo "${keep_path[*]}")
  export MQA_HIDE_DIRS="${hide[*]}" MQA_HIDE_FILES="${nvcc_files[*]}" MQA_NOT_NVCC="$work/not-nvcc"
  export MQA_NEW_PATH="$new_path" MQA_QS_LOG="$log" MQA_QS_DIR="$work/qs"
  rc=0
  # shellcheck disable=SC2016  # expanded by the inner shell
  unshare -m --propagation private bash -c '
    set -euo pipefail
    for d in $MQA_HIDE_DIRS; do mount -t tmpfs -o size=1m,mode=0755 mqa-no-cuda "$d"; done
    for f in $MQA_HIDE_FILES; do [ -e "$f" ] && mount --bind "$MQA_NOT_NVCC" "$f"; done
    export PATH=$MQA_NEW_PATH
    unset CUDA_HOME CUDA_PATH CUDA_ROOT CUDACXX CUDAToolkit_ROOT CUDA_TOOLKIT_ROOT_DIR
    IFS=: read -r -a dirs <<< "$PATH"
    for p in "${dirs[@]}"; do
      if [ -x "$p/nvcc" ]; then echo "no-cuda quick start: nvcc still on PATH: $p/nvcc" >&2; exit 3; fi
    done
    for d in $MQA_HIDE_DIRS; do
      if [ -n "$(ls -A "$d")" ]; then echo "no-cuda quick start: $d still visible" >&2; exit 3; fi
    done
    cd "$MQA_QS_DIR"
    CCACHE_BASEDIR="$MQA_QS_DIR" bash scripts/demo.sh "$@" > "$MQA_QS_LOG" 2>&1
  ' bash "$@" || rc=$?
fi

fail() {
  echo "no-cuda quick start: FAILED: $1 (last lines of the demo's output:)" >&2
  tail -40 "$log" >&2 || true
  exit 1
}
[ "$rc" -eq 0 ] || fail "scripts/demo.sh exited $rc"
grep -q "mqaserve: no CUDA toolkit" "$log" || fail "the configure step did not take the no-toolkit path"
grep -qx "SERVING" "$log" || fail "mqa-cli health did not answer SERVING"
grep -q "^model .*layers" "$log" || fail "mqa-cli models listed no model"
tput=$(sed -n 's/^throughput: \([0-9.]*\) tokens\/s.*/\1/p' "$log" | tail -1)
awk -v t="${tput:-0}" 'BEGIN { exit !(t > 0) }' || fail "mqa-cli session-demo streamed no tokens"
grep -E "^(setup|demo|throughput|decode step|model .*session)" "$log" | grep -v "^setup: torch" || true
echo "no-cuda quick start: passed in $(( $(date +%s) - start )) s (server answered: SERVING, $tput tokens/s)"
