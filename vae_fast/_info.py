"""backend_info(): which implementation serves each device, and why."""

from __future__ import annotations

import torch

from . import _extension


def _device_entry(device_type: str, available: bool) -> dict:
    reason = _extension.reason_for_reference(device_type)
    entry = {"available": available, "implementation": "extension" if reason is None else "reference"}
    if reason is not None:
        entry["reason"] = reason
    return entry


def backend_info() -> dict:
    """Describe the implementation behind each device.

    Returns a dict: versions, whether the extension loaded (and the load error if not), the CPU
    instruction set its kernels use, whether CUDA kernels were compiled in, and for "cpu" and "cuda"
    the serving implementation ("extension" or "reference") with the reason when it is the reference.
    """
    from . import __version__

    cuda_available = torch.cuda.is_available()
    ext = _extension._C
    return {
        "vae_fast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": {
            "loaded": ext is not None,
            "load_error": _extension.LOAD_ERROR,
            "path": getattr(ext, "__file__", None),
            "built_for": _extension.BUILT_FOR,
            "cpu_isa": ext.cpu_isa() if ext is not None else None,
            "cuda_compiled": _extension.cuda_kernels_compiled(),
        },
        "devices": {
            "cpu": _device_entry("cpu", True),
            "cuda": {
                **_device_entry("cuda", cuda_available),
                "name": torch.cuda.get_device_name() if cuda_available else None,
            },
        },
    }


def format_backend_info(info: dict) -> str:
    ext = info["extension"]
    lines = [
        f"vae_fast {info['vae_fast']}  torch {info['torch']}  (CUDA build: {info['torch_cuda'] or 'no'})",
        f"extension: {'loaded from ' + str(ext['path']) if ext['loaded'] else 'NOT loaded: ' + str(ext['load_error'])}",
    ]
    if ext["loaded"]:
        lines.append(f"  CPU kernels: {ext['cpu_isa']}   CUDA kernels compiled in: {'yes' if ext['cuda_compiled'] else 'no'}")
    built = ext.get("built_for")
    if built:
        if built.get("cuda_kernels"):
            kernels = f"CUDA {built.get('torch_cuda')} kernels for {built.get('cuda_arch_list') or 'the default architectures'}"
        else:
            kernels = "CPU kernels only"
        lines.append(f"  built for torch {built['torch']} ({kernels})")
    for device, entry in info["devices"].items():
        name = f" ({entry['name']})" if entry.get("name") else ""
        served = "served by" if entry["available"] else "not available here; would be served by"
        line = f"{device}{name}: {'available; ' if entry['available'] else ''}{served} {entry['implementation']}"
        if "reason" in entry:
            line += f" because {entry['reason']}"
        lines.append(line)
    return "\n".join(lines)
