#!/usr/bin/env bash
# Set-up on a fresh machine: a .venv with torch, then vae_fast built in place (editable).
# The CPU kernels are always built; the CUDA kernels too when torch is a CUDA build and nvcc is
# found (VAE_FAST_CUDA=1 makes that mandatory, VAE_FAST_CUDA=0 skips it).
# --no-build-isolation: the extension must be compiled against the torch installed here, and an
# isolated build would download a second multi-GB torch just to build.
#
# Run again, it is incremental: the objects live in build/temp-torch-<version>/ and ninja recompiles
# only the sources (and headers, torch's included) that changed. While the venv's stamp says it was
# set up for this torch and these pyproject.toml/setup.py, pip is not run at all (its resolve alone
# costs 10-20 s with nothing to install); only the extension is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${VAE_FAST_TORCH:-torch==2.14.1}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/vae_fast-setup.stamp
wanted="$torch_spec $(cat pyproject.toml setup.py | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  .venv/bin/python setup.py -q build_ext --inplace
else
  rm -f "$stamp"
  .venv/bin/pip install -q "$torch_spec" "setuptools>=64" wheel ninja
  .venv/bin/pip install -q --no-build-isolation -e ".[test]"
  echo "$wanted" > "$stamp"
fi
.venv/bin/python -m vae_fast info
