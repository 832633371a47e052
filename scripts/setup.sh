#!/usr/bin/env bash
# Installs what mqaserve needs on Debian 12, idempotently: Debian packages (only the missing ones) and a pinned
# Python environment in .venv (only when the pins changed). Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake ninja-build git pkg-config python3 python3-venv python3-dev
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev
  libspdlog-dev libfmt-dev libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev ccache
  libcpp-httplib-dev prometheus nginx curl
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: Debian packages present"
fi

PY=${MQA_SETUP_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.mqa-requirements
want=$(cat scripts/requirements.txt scripts/requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned Python packages (PyTorch is large; pip's cache makes reruns fast)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r scripts/requirements.txt
  .venv/bin/python -m pip install -q --no-deps -r scripts/requirements-nodeps.txt
  echo "$want" > "$stamp"
else
  echo "setup: Python environment up to date"
fi
.venv/bin/python -c 'import torch; print("setup: torch", torch.__version__, "cuda", torch.version.cuda)'
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: CUDA toolkit found: CUDA code will be compiled and linked"
else
  echo "setup: no CUDA toolkit (nvcc): the build skips the project's CUDA code"
fi
