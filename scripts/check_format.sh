#!/usr/bin/env bash
# Checks that every tracked C++ and CUDA source is formatted as .clang-format says (clang-format 14, Debian 12's
# clang-format package); CI runs it. With --fix, formats the files in place instead.
# Usage: scripts/check_format.sh [--fix]
set -euo pipefail
cd "$(dirname "$0")/.."
fmt=""
for candidate in clang-format-14 clang-format; do
  if command -v "$candidate" >/dev/null; then fmt=$candidate; break; fi
done
if [ -z "$fmt" ]; then
  echo "check_format: clang-format not found (apt-get install clang-format, or scripts/setup.sh test)" >&2
  exit 2
fi
mapfile -t files < <(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')
if [ "${1:-}" = --fix ]; then
  "$fmt" -i "${files[@]}"
  echo "check_format: formatted ${#files[@]} files with $($fmt --version)"
  exit 0
fi
bad=()
for f in "${files[@]}"; do
  if ! "$fmt" --dry-run -Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if [ "${#bad[@]}" -gt 0 ]; then
  echo "check_format: ${#bad[@]} of ${#files[@]} files differ from .clang-format ($($fmt --version)):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  echo "first differences:" >&2
  "$fmt" --dry-run "${bad[0]}" 2>&1 | head -20 >&2
  echo "fix with: scripts/check_format.sh --fix" >&2
  exit 1
fi
echo "check_format: ${#files[@]} C++/CUDA sources match .clang-format ($($fmt --version))"
