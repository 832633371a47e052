#!/usr/bin/env bash
# Configures and builds the release preset (build/release). scripts/test.sh, scripts/demo.sh and the Dockerfile's
# build stage all call it after scripts/setup.sh, so CI builds the way the image does. Extra arguments go to the
# configure step (e.g. -DMQA_BUILD_TESTS=OFF -DMQA_BUILD_BENCH=OFF); MQA_BUILD_JOBS overrides the job count.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake --preset release "$@"
cmake --build --preset release -j "${MQA_BUILD_JOBS:-$(nproc)}"
