#!/usr/bin/env bash
# Installs what mqaserve needs on Debian 12, idempotently: Debian packages (only the missing ones) and a pinned
# Python environment in .venv (only when the pins changed). Safe to run again and again.
# Usage: scripts/setup.sh [demo|test]
#   demo  what building and running mqa-server and mqa-cli needs (scripts/demo.sh, the Dockerfile): the build
#         tools, the C++ libraries, and a .venv with LibTorch (scripts/requirements-demo.txt)
#   test  (the default) demo's, plus what the tests and benchmarks need: GoogleTest and GoogleMock, Google
#         Benchmark, nginx and Prometheus (the service tests), clang-format (CI's format check), and the Python
#         test tools (scripts/requirements.txt, scripts/requirements-nodeps.txt)
# No CUDA toolkit is needed for either (the build then leaves the project's CUDA code out).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-test}
case "$profile" in
  demo|test) ;;
  *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac

APT_DEMO=(
  build-essential cmake ninja-build git pkg-config python3 python3-venv python3-dev ccache curl
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev
  libspdlog-dev libfmt-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev libcpp-httplib-dev
)
APT_TEST=(libgtest-dev libgmock-dev libbenchmark-dev prometheus nginx clang-format)
APT_PACKAGES=("${APT_DEMO[@]}")
if [ "$profile" = test ]; then APT_PACKAGES+=("${APT_TEST[@]}"); fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup ($profile): installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup ($profile): Debian packages present"
fi

PY=${MQA_SETUP_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup ($profile): creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
# One stamp per profile, holding the hash of the pins it installed; the test profile's pins include the demo's
# (requirements.txt starts with -r requirements-demo.txt), so installing them stamps both.
demo_want=$(sha256sum < scripts/requirements-demo.txt | cut -d' ' -f1)
test_want=$(cat scripts/requirements-demo.txt scripts/requirements.txt scripts/requirements-nodeps.txt \
            | sha256sum | cut -d' ' -f1)
want_var="${profile}_want"
stamp=.venv/.mqa-requirements-$profile
if [ "$(cat "$stamp" 2>/dev/null)" != "${!want_var}" ]; then
  echo "setup ($profile): installing pinned Python packages (PyTorch is large; pip's cache makes reruns fast)"
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "$profile" = demo ]; then
    .venv/bin/python -m pip install -q -r scripts/requirements-demo.txt
  else
    .venv/bin/python -m pip install -q -r scripts/requirements.txt
    .venv/bin/python -m pip install -q --no-deps -r scripts/requirements-nodeps.txt
    echo "$test_want" > .venv/.mqa-requirements-test
  fi
  echo "$demo_want" > .venv/.mqa-requirements-demo
else
  echo "setup ($profile): Python environment up to date"
fi
# -W ignore: the demo profile has no numpy, of which torch's import warns.
.venv/bin/python -W ignore -c 'import torch; print("setup: torch", torch.__version__, "cuda", torch.version.cuda)'
if command -v nvcc >/dev/null 2>&1 && nvcc --version >/dev/null 2>&1; then
  echo "setup: CUDA toolkit found ($(command -v nvcc)): CUDA code will be compiled and linked"
else
  echo "setup: no CUDA toolkit (nvcc on PATH): the build skips the project's CUDA code"
fi
