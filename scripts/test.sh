#!/usr/bin/env bash
# Quick start, command 2 (and CI): install what is missing, build (release preset), run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --preset release -j 2
