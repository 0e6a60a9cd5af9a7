#!/usr/bin/env bash
# Sets up a fresh Debian machine (Python 3.11, root, no GPU): the Fashion-MNIST data package, a
# virtual environment in .venv with torch 2.13.0 (CPU) pinned by constraints.txt, and bnadapt itself.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch, bnadapt, pytest" >/dev/null 2>&1 || [ ! -x .venv/bin/ruff ]; then
  .venv/bin/pip install -q -c constraints.txt "torch==2.13.0"
  .venv/bin/pip install -q -c constraints.txt -e ".[test]"
fi
# Optional: corruption generation (bnadapt[corruptions]). The library's own metadata asks for the GUI build of
# OpenCV; install its dependencies with the headless build, then the library without dependencies.
if ! .venv/bin/python -c "from importlib.metadata import version; assert version('imagecorruptions-imaug') == '1.1.5'; import imagecorruptions" >/dev/null 2>&1; then
  .venv/bin/pip install -q -c constraints.txt "opencv-python-headless>=4.5" "scikit-image>=0.19" "numba>=0.53"
  .venv/bin/pip install -q -c constraints.txt --no-deps "imagecorruptions-imaug==1.1.5"
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
