#!/usr/bin/env bash
# Set-up on a fresh machine: a .venv with torch, then vae_fast built in place (editable).
# The CPU kernels are always built; the CUDA kernels too when torch is a CUDA build and nvcc is
# found (VAE_FAST_CUDA=1 makes that mandatory, VAE_FAST_CUDA=0 skips it).
# --no-build-isolation: the extension must be compiled against the torch installed here, and an
# isolated build would download a second multi-GB torch just to build.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${VAE_FAST_TORCH:-torch==2.14.1}

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q "$torch_spec" "setuptools>=64" wheel ninja
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
.venv/bin/pip install -q --no-build-isolation -e ".[test]"
.venv/bin/python -m vae_fast info
