#!/usr/bin/env bash
# The ways a user installs vae_fast, each into a fresh venv, run from a folder outside the checkout so
# that the installed package (not the source tree) is what runs:
#   1. the sdist: `python -m build --sdist --no-isolation`, then `pip install --no-build-isolation
#      <the sdist>` (CPU kernels) into a fresh venv that holds only torch and the build tools, so the
#      build may need nothing else. (tests/test_packaging.py checks the sdist holds every tracked
#      source and header.)
#   2. the wheel: `TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0+PTX" pip wheel --no-build-isolation --no-deps .`
#      from the checkout, then `pip install <the wheel>` over the sdist's in the same venv: it must be
#      tagged cp310-abi3 (one wheel for every CPython >= 3.10), hold sm_80, sm_89, sm_90 code + PTX,
#      and replace the sdist's library. This is also what `pip install .` from a clone does (pip
#      builds a wheel from the folder and installs it), so it stands for that path too. It is built
#      by the main .venv in the checkout's build folder: after CI's in-place build with the same
#      settings, ninja finds every object up to date and the wheel costs a link instead of a second
#      CUDA compile.
# Each is followed by a smoke run: `vae-fast info` says the extension serves the CPU, the fused ops
# match the reference forward and backward, `vae-fast train --epochs 1` runs.
# Then the oldest torch pyproject.toml declares (2.11): a build against it and the whole test suite,
# and that build imported under the newest torch (the main .venv's) must refuse to load with the
# "built for torch X, running torch Y: rebuild with ..." message.
#
#   scripts/check_install.sh [paths|oldest-torch|all]      (default all; CI runs all)
# The sdist and oldest-torch builds skip the CUDA sources (VAE_FAST_CUDA=0): the main build compiles
# them for the wheel, and each CUDA build costs minutes on CI's 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-python3}
torch_spec=${VAE_FAST_TORCH:-torch==2.14.1}
oldest_torch=${VAE_FAST_OLDEST_TORCH:-torch==2.11.0}
what=${1:-all}
work=$(mktemp -d /tmp/vae_fast_install.XXXXXX)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
main_python=${MAIN_PYTHON:-$repo/.venv/bin/python}
test_workers=${VAE_FAST_TEST_WORKERS:-$(nproc)}
started=$SECONDS
# Each stage also prints the free disk: three torch installs of 5-6 GB each pass through here, and a
# run that fails with "No space left on device" should show where the space went.
step() { echo "=== [$((SECONDS - started)) s, $(df -h --output=avail "$work" | tail -1 | tr -d ' ') free] $*"; }

fresh_venv() {  # fresh_venv DIR TORCH_SPEC
  "$python" -m venv "$1"
  # --no-cache-dir: a torch that is not on this machine's disk (2.11) is downloaded, and pip would
  # keep a second copy of its 3-4 GB of wheels in ~/.cache/pip that nothing reads again.
  "$1/bin/pip" install -q --no-cache-dir "$2" "setuptools>=64" wheel ninja build
}

smoke() {  # smoke VENV NAME: the installed package, from outside the checkout
  local venv=$1 name=$2
  (
    cd "$work"
    "$venv/bin/python" - "$repo" <<'EOF'
import sys
from pathlib import Path

import torch

import vae_fast
from vae_fast import reference

repo = Path(sys.argv[1]).resolve()
where = Path(vae_fast.__file__).resolve()
assert repo not in where.parents, f"imported from the checkout ({where}), not the installed package"
info = vae_fast.backend_info()
assert info["devices"]["cpu"]["implementation"] == "extension", info
assert info["extension"]["built_for"]["torch"] == torch.__version__, info
g = torch.Generator().manual_seed(0)
recon = torch.rand(64, 784, generator=g).clamp(0.01, 0.99).requires_grad_()
x = torch.rand(64, 784, generator=g)
mu, logvar = (torch.randn(64, 20, generator=g).requires_grad_() for _ in range(2))
loss = vae_fast.vae_loss(recon, x, mu, logvar)
grads = torch.autograd.grad(loss, (recon, mu, logvar))
expected = reference.vae_loss(*(t.double() for t in (recon, x, mu, logvar)))
expected_grads = torch.autograd.grad(expected, (recon, mu, logvar))
assert abs(loss.item() / expected.item() - 1) < 1e-5, (loss.item(), expected.item())
for got, want in zip(grads, expected_grads):
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
z = vae_fast.reparameterize(mu, logvar)
z.sum().backward()
assert z.shape == mu.shape and torch.isfinite(mu.grad).all()
print(f"smoke: {where.parent} serves the CPU; loss and gradients match the float64 reference")
EOF
    "$venv/bin/vae-fast" info
    "$venv/bin/vae-fast" train --epochs 1 --hidden-dims 16 --latent-dim 2 --device cpu --quiet --out "$work/train-$name"
    test -s "$work/train-$name/checkpoint.pt" || { ls -la "$work/train-$name"; exit 1; }
  )
  echo "smoke ($name): passed"
}

install_wheel() {
  step "2. pip wheel (CUDA sources in, three architectures + PTX) with the main venv, then pip install <the wheel> over the sdist's"
  TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0+PTX" \
    "$main_python" -m pip wheel -q --no-build-isolation --no-deps --wheel-dir "$work/wheels" "$repo"
  wheel=$(ls "$work"/wheels/vae_fast-*.whl)
  case "$wheel" in
    *-cp310-abi3-*.whl) echo "wheel: $(basename "$wheel") (one wheel for every CPython >= 3.10)" ;;
    *) echo "wheel is not tagged cp310-abi3: $(basename "$wheel")"; exit 1 ;;
  esac
  "$work/venv-user/bin/pip" install -q --force-reinstall --no-deps "$wheel"
  smoke "$work/venv-user" wheel
  # From $work: run in the checkout, `python -c` would import the checkout's vae_fast instead.
  cuda=$(cd "$work" && "$work/venv-user/bin/python" -c "import vae_fast; print(vae_fast.backend_info()['extension']['cuda_compiled'])")
  echo "wheel has CUDA kernels: $cuda"
  # With VAE_FAST_CUDA=1, CUDA kernels also show that the wheel's library replaced the sdist's.
  if [ "${VAE_FAST_CUDA:-auto}" = 1 ] && [ "$cuda" != True ]; then echo "VAE_FAST_CUDA=1 but the installed library has no CUDA kernels"; exit 1; fi
  if [ "$cuda" = True ]; then
    library=$(ls "$work"/venv-user/lib/python3*/site-packages/vae_fast/_C.abi3.so)
    # The toolkit's cuobjdump, else the one torch's Triton dependency ships (CI's toolkit has none).
    cuobjdump=${CUDA_HOME:+$CUDA_HOME/bin/cuobjdump}
    [ -x "${cuobjdump:-}" ] || cuobjdump=$(ls "$work"/venv-user/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump | head -1)
    elves=$("$cuobjdump" --list-elf "$library" | grep -o "sm_[0-9]*" | sort -u | tr '\n' ' ')
    ptx=$("$cuobjdump" --list-ptx "$library" | grep -o "sm_[0-9]*" | sort -u | tr '\n' ' ')
    echo "machine code for: $elves; PTX for: $ptx"
    [ "$elves" = "sm_80 sm_89 sm_90 " ] && [ "$ptx" = "sm_90 " ] || { echo "unexpected architectures in the wheel"; exit 1; }
  fi
}

install_sdist() {
  step "1. sdist, then pip install --no-build-isolation <the sdist> (CPU kernels)"
  "$work/venv-user/bin/python" -m build --sdist --no-isolation --outdir "$work/dist" "$repo" > "$work/sdist.log"
  sdist=$(ls "$work"/dist/vae_fast-*.tar.gz)
  # First into the fresh venv, before the wheel brings vae_fast's dependencies: the build must need
  # nothing but torch and the build tools.
  VAE_FAST_CUDA=0 "$work/venv-user/bin/pip" install -q --no-build-isolation "$sdist"
  smoke "$work/venv-user" sdist
}

install_paths() {
  step "a fresh venv with $torch_spec"
  fresh_venv "$work/venv-user" "$torch_spec"
  install_sdist
  install_wheel
  # The next venv (the oldest torch) needs as much disk again: this one has been checked.
  rm -rf "$work/venv-user" "$work"/train-*
}

oldest_torch_check() {
  step "oldest declared torch ($oldest_torch): build (CPU kernels) and the whole suite"
  fresh_venv "$work/venv-oldest" "$oldest_torch"
  # An editable install in a copy of the checkout, so the main .venv's in-place build is untouched.
  mkdir -p "$work/src-oldest"
  git -C "$repo" ls-files -z --cached --others --exclude-standard | (cd "$repo" && xargs -0 cp --parents -t "$work/src-oldest")
  step "... built against it (CPU kernels)"
  (cd "$work/src-oldest" && VAE_FAST_CUDA=0 "$work/venv-oldest/bin/pip" install -q --no-build-isolation -e ".[test]")
  step "... the whole suite"
  (cd "$work/src-oldest" && "$work/venv-oldest/bin/python" -m pytest -q -p no:cacheprovider -n "$test_workers" --dist worksteal tests)

  step "that build imported under the newest torch: refused with the rebuild message"
  mkdir -p "$work/cross"
  cp -r "$work/src-oldest/vae_fast" "$work/cross/vae_fast"
  message=$(cd "$work/cross" && PYTHONPATH="$work/cross" "$main_python" -m vae_fast info)
  echo "$message"
  built=$("$work/venv-oldest/bin/python" -c 'import torch; print(torch.__version__)')
  running=$("$main_python" -c 'import torch; print(torch.__version__)')
  echo "$message" | grep -F "built for torch $built, running torch $running: rebuild with" > /dev/null ||
    { echo "the cross-torch import did not give the rebuild message"; exit 1; }
  # Without the record (a build from before it existed) the loader's own error is shown, annotated.
  rm "$work/cross/vae_fast/_build_info.json"
  (cd "$work/cross" && PYTHONPATH="$work/cross" "$main_python" -m vae_fast info) | grep "extension:" || true
}

case "$what" in
  paths) install_paths ;;
  oldest-torch) oldest_torch_check ;;
  all) install_paths; oldest_torch_check ;;
  *) echo "usage: $0 [paths|oldest-torch|all]"; exit 2 ;;
esac
step "install checks passed"
rm -rf "$work"
