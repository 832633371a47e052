#!/usr/bin/env bash
# Gathers what mqa-server and mqa-cli need at run time into one folder, for the Dockerfile's runtime stage:
#   DEST/bin           mqa-server, mqa-cli
#   DEST/lib           the project's shared libraries and every system library they resolve to (ldd), except
#                      glibc's own (the runtime image's loader must match them) and the CUDA driver (libcuda,
#                      mounted by the NVIDIA container toolkit) and runtime (taken from the wheel, below)
#   DEST/python/torch/lib, DEST/python/nvidia
#                      LibTorch's libraries from the venv's PyTorch wheel and the NVIDIA wheels it loads through
#                      RPATH $ORIGIN/../../nvidia/...; the relative layout is kept so those paths still resolve
# Run it with: LD_LIBRARY_PATH=DEST/lib:DEST/python/torch/lib:DEST/python/nvidia/cu13/lib
# Usage: scripts/bundle_runtime.sh [BUILD_DIR (build/release)] [DEST (/opt/mqa)]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
dest=${2:-/opt/mqa}
py=.venv/bin/python
site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')

rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/lib" "$dest/python/torch"
cp "$build/server/mqa-server" "$build/client/mqa-cli" "$dest/bin/"
cp -P "$build"/core/libmqa_core*.so* "$build"/client/libmqa_client.so* "$dest/lib/"
cp -a "$site/torch/lib" "$dest/python/torch/lib"
if [ -d "$site/nvidia" ]; then cp -a "$site/nvidia" "$dest/python/nvidia"; fi

# System libraries: whatever the binaries and the project's libraries resolve to outside the build tree and the
# venv. glibc's libraries, the CUDA driver and the CUDA runtime stay out (see above).
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread\.so|libdl\.so|librt\.so|libutil\.so|libresolv\.so|libcuda\.so|libcudart\.so)'
export LD_LIBRARY_PATH="$dest/lib:$dest/python/torch/lib:$dest/python/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for f in "$dest"/bin/* "$dest"/lib/libmqa_*.so; do
  [ -L "$f" ] && continue
  ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
    if [[ "$name" =~ $skip ]]; then continue; fi
    case "$path" in "$dest"/*|"$site"/*) continue ;; esac
    [ -e "$dest/lib/$name" ] || cp -L "$path" "$dest/lib/$name"
  done
done
missing=$(for f in "$dest"/bin/*; do ldd "$f" | grep 'not found' || true; done)
if [ -n "$missing" ]; then echo "bundle_runtime: unresolved libraries:" >&2; echo "$missing" >&2; exit 1; fi
echo "bundle_runtime: $dest: $(ls "$dest/lib" | wc -l) libraries in lib/, $(du -sh "$dest" | cut -f1) in all"
