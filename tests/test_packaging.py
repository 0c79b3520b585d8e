"""What a user installing vae_fast from an archive gets: an sdist that holds every source and header,
a library built for CPython's limited API, and a clear refusal (with the rebuild command) when the
library was compiled for another torch. The install paths themselves (from a clone, the sdist, the
wheel, each in a fresh venv) run in scripts/check_install.sh, which CI runs."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import vae_fast
from vae_fast import _extension

ROOT = Path(__file__).resolve().parents[1]


def _tracked(folder: str) -> set[str]:
    listed = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return set(listed.stdout.split())


def test_sdist_holds_every_source_and_header(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (sdist,) = tmp_path.glob("vae_fast-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = (_tracked("csrc") | _tracked("vae_fast") | {"setup.py", "pyproject.toml", "README.md"}) - names
    assert not missing, f"not in the sdist: {sorted(missing)}"
    assert not [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_info.json")]


def test_library_uses_the_limited_api_and_records_its_torch():
    library = Path(_extension._C.__file__)
    assert library.name.endswith(".abi3.so"), library.name
    record = _extension.read_build_record()
    assert record is not None and record["torch"] == torch.__version__
    assert record["cuda_kernels"] == _extension.cuda_kernels_compiled()
    assert vae_fast.backend_info()["extension"]["built_for"] == record


def test_mismatch_message_names_both_versions_and_the_command(tmp_path):
    record = {"torch": "2.11.0+cpu", "torch_cuda": None}
    assert _extension.torch_mismatch(record, running="2.11.0+cpu") is None
    assert _extension.torch_mismatch(None, running="2.14.1") is None  # no record: try to load, as before
    checkout = _extension.torch_mismatch(record, running="2.14.1+cu130")
    assert "built for torch 2.11.0+cpu, running torch 2.14.1+cu130" in checkout
    assert f"pip install --no-build-isolation -e {ROOT}" in checkout  # this package dir is a checkout's
    installed = _extension.torch_mismatch(record, running="2.14.1", package_dir=tmp_path / "vae_fast")
    assert "--force-reinstall" in installed and "-e " not in installed


def test_malformed_record_is_ignored(tmp_path):
    path = tmp_path / "_build_info.json"
    path.write_text("{not json")
    assert _extension.read_build_record(path) is None
    path.write_text(json.dumps({"torch": 2}))
    assert _extension.read_build_record(path) is None


def test_library_built_for_another_torch_is_not_loaded(tmp_path):
    """The whole path a user sees: a copy of the installed package whose record names another torch
    falls back to the reference with the message, in the warning, backend_info() and `vae-fast info`."""
    package = tmp_path / "vae_fast"
    shutil.copytree(Path(vae_fast.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_build_info.json").write_text(json.dumps({"torch": "2.0.0", "torch_cuda": None, "cuda_kernels": False}))
    script = (
        "import warnings, json\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import vae_fast, torch\n"
        "info = vae_fast.backend_info()\n"
        "print(json.dumps({'file': vae_fast.__file__, 'warnings': [str(w.message) for w in caught],\n"
        "                  'error': info['extension']['load_error'],\n"
        "                  'cpu': info['devices']['cpu']['implementation'],\n"
        "                  'loss': vae_fast.vae_loss(torch.full((2, 3), 0.5), torch.ones(2, 3), torch.zeros(2, 1), torch.zeros(2, 1)).item()}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(seen["file"]).parent == package
    expected = f"built for torch 2.0.0, running torch {torch.__version__}: rebuild with `pip install"
    assert expected in seen["error"] and any(expected in w for w in seen["warnings"])
    assert seen["cpu"] == "reference"
    assert seen["loss"] == pytest.approx(6 * 0.6931471805599453, rel=1e-6)  # BCE(0.5, 1) = log 2, KL = 0
    info = subprocess.run([sys.executable, "-m", "vae_fast", "info"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert info.returncode == 0 and expected in info.stdout


def _setup_module():
    """setup.py's helpers, imported without running setup() (it runs only as __main__)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vae_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(sys.platform != "linux", reason="ELF libraries: the check applies to Linux builds")
def test_build_refuses_a_library_with_its_own_static_libstdcxx(tmp_path):
    """A second (static) libstdc++ beside torch's shared one crashed every error message that prints
    a number on a GPU image whose g++ found only libstdc++.a; the build must stop with the fix."""
    setup_module = _setup_module()
    source = tmp_path / "fmt.cpp"
    source.write_text('#include <sstream>\n#include <string>\n'
                      'std::string fmt(double d) { std::ostringstream s; s << d; return s.str(); }\n')
    compiler = os.environ.get("CXX", "c++")
    shared, static = tmp_path / "shared.so", tmp_path / "static.so"
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(shared)], check=True)
    subprocess.run([compiler, "-shared", "-fPIC", "-static-libstdc++", str(source), "-o", str(static)], check=True)
    setup_module.check_shared_libstdcxx(shared)
    with pytest.raises(RuntimeError, match=r"linked libstdc\+\+ statically.*CXX=/usr/bin/g\+\+"):
        setup_module.check_shared_libstdcxx(static)
    # and the library this suite runs against passed it
    setup_module.check_shared_libstdcxx(Path(_extension._C.__file__))
