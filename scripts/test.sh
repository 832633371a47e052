#!/usr/bin/env bash
# Quick start, command 2 (and CI): install what is missing, build (release preset), run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release
cmake --build --preset release -j "$(nproc)"
ctest --preset release -j 2
