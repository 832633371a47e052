#!/usr/bin/env bash
# Quick start, command 1: install what is missing, build (release preset), run the main job.
# Until the gRPC server exists (issue "gRPC service") the main job is mqa-demo: one session streamed through the
# embedded default model. Extra arguments go to mqa-demo (e.g. --tokens 128 --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release
cmake --build --preset release -j "$(nproc)"
exec build/release/core/mqa-demo "$@"
