#!/usr/bin/env bash
# Configures and builds the release preset (build/release). scripts/test.sh, scripts/demo.sh and the Dockerfile's
# build stage all call it after scripts/setup.sh, so CI builds the way the image does.
# Usage: scripts/build.sh [demo] [CMAKE_ARGS...]
#   demo  no tests or benchmarks (-DMQA_BUILD_TESTS=OFF -DMQA_BUILD_BENCH=OFF), and only the targets mqa-server and
#         mqa-cli: what scripts/setup.sh demo installs is enough for it (the demo and the Docker image)
#   else  every target, tests and benchmarks included (turned back on, since a demo build leaves them off in the
#         same build folder's cache)
# CMAKE_ARGS go to the configure step, after the profile's (so they win); MQA_BUILD_JOBS overrides the job count.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${MQA_BUILD_JOBS:-$(nproc)}
if [ "${1:-}" = demo ]; then
  shift
  cmake --preset release -DMQA_BUILD_TESTS=OFF -DMQA_BUILD_BENCH=OFF "$@"
  cmake --build --preset release -j "$jobs" --target mqa-server mqa-cli
else
  cmake --preset release -DMQA_BUILD_TESTS=ON -DMQA_BUILD_BENCH=ON "$@"
  cmake --build --preset release -j "$jobs"
fi
