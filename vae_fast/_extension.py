"""Loading of the compiled extension, and which implementation serves each device.

`import vae_fast` never fails because of the extension: when `vae_fast._C` is missing, was built
for another torch, or does not load, every op falls back to `vae_fast.reference` and a
RuntimeWarning says so once, with the command that rebuilds it. Never silently slow.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_RECORD = PACKAGE_DIR / "_build_info.json"  # written by setup.py beside the library


def read_build_record(path: Path = BUILD_RECORD) -> dict | None:
    """{"torch": version the library was compiled against, "torch_cuda", "cuda_kernels", ...}, or
    None when there is no readable record (no build, or a build older than the record)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("torch"), str) else None


def rebuild_command(package_dir: Path = PACKAGE_DIR) -> str:
    """The command that rebuilds the extension against the torch now installed."""
    source = package_dir.parent
    if (source / "setup.py").exists() and (source / "csrc").is_dir():  # an editable checkout
        return f"pip install --no-build-isolation -e {source}"
    return "pip install --no-build-isolation --no-deps --force-reinstall <the vae_fast sdist or source folder>"


def torch_mismatch(record: dict | None, running: str = torch.__version__, package_dir: Path = PACKAGE_DIR) -> str | None:
    """Why the library must not be loaded under this torch, or None. torch's C++ ABI is not stable
    across releases: a library built for another torch fails with an undefined symbol at best."""
    if record is None or record["torch"] == running:
        return None
    return (f"it was built for torch {record['torch']}, running torch {running}: "
            f"rebuild with `{rebuild_command(package_dir)}`")


BUILT_FOR = read_build_record()
LOAD_ERROR: str | None = torch_mismatch(BUILT_FOR)
_C = None
if LOAD_ERROR is None:
    try:
        from . import _C  # noqa: F401  (loading it registers the torch.ops.vae_fast kernels)
    except (ImportError, OSError) as error:  # not built, or built against another torch
        LOAD_ERROR = f"{type(error).__name__}: {error}"
        if "undefined symbol" in str(error):
            LOAD_ERROR += f" (built for another torch? rebuild with `{rebuild_command()}`)"

_warned: set[str] = set()


def extension_loaded() -> bool:
    return _C is not None


def cuda_kernels_compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled())


def has_kernel(op: str, device_type: str) -> bool:
    """Whether vae_fast::<op> has a kernel registered for this device type (e.g. "cpu", "cuda")."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"vae_fast::{op}", key)


def _find_reason_for_reference(device_type: str) -> str | None:
    if _C is None:
        return f"the compiled extension did not load ({LOAD_ERROR})"
    if device_type == "cuda" and not cuda_kernels_compiled():
        return "the extension was built without its CUDA kernels (torch CPU build or no nvcc at build time)"
    if not has_kernel("vae_loss", device_type):
        return f"the extension has no kernels for device type '{device_type}'"
    return None


# Decided once at import: torch.compile traces `serves` as a plain dict lookup.
_REASONS = {device_type: _find_reason_for_reference(device_type) for device_type in ("cpu", "cuda")}


def reason_for_reference(device_type: str) -> str | None:
    """None when the extension serves this device type, else why the reference does."""
    return _REASONS.get(device_type, f"vae_fast has no kernels for device type '{device_type}'")


def serves(device: torch.device) -> bool:
    """True when the compiled kernels serve tensors on `device`; warns once per device type if not."""
    reason = reason_for_reference(device.type)
    if reason is None:
        return True
    if device.type not in _warned and not torch.compiler.is_compiling():
        _warned.add(device.type)
        warnings.warn(
            f"vae_fast: using the pure-torch reference on {device.type} because {reason}; "
            "it is correct but slower. See vae_fast.backend_info().",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


if _C is None:
    warnings.warn(
        f"vae_fast: the compiled extension is not available ({LOAD_ERROR}); every op uses the "
        f"slower pure-torch reference. Build it with `{rebuild_command()}`.",
        RuntimeWarning,
        stacklevel=2,
    )
    _warned.update({"cpu", "cuda"})
