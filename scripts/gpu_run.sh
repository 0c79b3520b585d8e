#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): build against that machine's own torch, run the
# whole test suite (CUDA tests included), then the CUDA benchmark; results are copied to $OUT.
# The device machine has no network: nothing is installed, the build uses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/vae_fast_out}
mkdir -p "$out"
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export VAE_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m vae_fast info | tee "$out/info.txt"
python3 -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15
python3 -m vae_fast bench --device cuda --out "$out/results" 2>&1 | tee "$out/bench.log" | tail -40
