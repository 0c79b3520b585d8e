"""Build of vae_fast's C++/CUDA extension (vae_fast._C).

The CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build and nvcc
is found (CUDA_HOME or /usr/local/cuda); VAE_FAST_CUDA=0 skips them, VAE_FAST_CUDA=1 makes their
absence an error. Architectures default to sm_80 and sm_90 (override with TORCH_CUDA_ARCH_LIST);
MAX_JOBS bounds parallel compilation, as in every torch extension.

The extension uses only CPython's limited API (its module is a stub; the ops go through torch's
dispatcher), so one wheel serves every CPython >= 3.10 (tag cp310-abi3). It is still tied to the
torch it was compiled against (torch's C++ ABI changes between releases): the build writes that
torch's version next to the library (`vae_fast/_build_info.json`), and `import vae_fast` compares it
with the running torch before loading the library.
"""

import glob
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).parent.resolve()
BUILD_RECORD = "_build_info.json"
# Files compiled for one instruction set, with that set's flags added to theirs alone (as PyTorch
# builds its per-CPU_CAPABILITY files); the run-time check in csrc/cpu/isa.cpp picks among them.
ISA_SOURCES = {
    "csrc/cpu/kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "csrc/cpu/kernels_avx512.cpp": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi", "-mbmi2"
    ],
}


def isa_flags_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix"


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus per-file compiler flags for ISA_SOURCES (setuptools has only
    per-extension flags): those files are compiled first with their own flags and linked in as
    objects. Without the flags (another architecture) they compile as the portable fallback."""

    def finalize_options(self):
        chosen = self.build_temp  # `build_ext --build-temp DIR` given on the command line
        super().finalize_options()
        if chosen is not None:
            return
        # One fixed folder per torch, whatever the build (editable, in place, wheel): pip's editable
        # install otherwise compiles in a new temporary folder every time (each `scripts/setup.sh`
        # rebuilt everything, ~3 min on 2 cores). In a fixed folder ninja rebuilds only what changed:
        # it tracks each object's command line and, through the compilers' depfiles, every header it
        # read, torch's included. A wheel built after the in-place build with the same settings (as CI
        # does) reuses its objects.
        self.build_temp = str(ROOT / "build" / f"temp-torch-{torch.__version__}")

    def build_extension(self, ext):
        # In ISA_SOURCES's order, narrowest first: see the link-order comment below.
        isa_sources = [src for src in ISA_SOURCES if src in ext.sources] if isa_flags_supported() else []
        for source in isa_sources:
            cflags = ext.extra_compile_args
            cxx = (cflags["cxx"] if isinstance(cflags, dict) else list(cflags)) + ISA_SOURCES[source]
            # Appended after every portable object on the link line: the AVX2 file's copies of
            # inline functions (std::, c10 Half/BFloat16 helpers) are COMDATs, and GNU ld keeps the
            # first copy it meets, so the portable ones win and the portable path never runs an AVX
            # instruction (tests/test_portable_cpu.py runs it on an emulated CPU without AVX). A copy
            # that only the ISA files emit comes from the AVX2 one, linked before the AVX-512 one, so
            # the AVX2 path runs no AVX-512 instruction either.
            ext.extra_objects += self.compiler.compile(
                [source],
                output_dir=self.build_temp,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs={"cxx": cxx, "nvcc": []} if isinstance(cflags, dict) else cxx,
                depends=ext.depends,
            )
            ext.sources.remove(source)
        super().build_extension(ext)
        check_shared_libstdcxx(Path(self.get_ext_fullpath(ext.name)))
        self._write_build_record(ext)

    def _write_build_record(self, ext):
        """Which torch this library was compiled against, beside the library (build_ext's output and,
        for in-place and editable builds, the source tree); vae_fast/_extension.py reads it."""
        with_cuda = ("VAE_FAST_WITH_CUDA", None) in ext.define_macros
        record = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_kernels": with_cuda,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        }
        write_beside(Path(self.get_ext_fullpath(ext.name)), json.dumps(record, indent=2) + "\n")

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package = ".".join(ext.name.split(".")[:-1])
            built = Path(self.build_lib) / self.get_ext_filename(ext.name)
            in_source = Path(build_py.get_package_dir(package)) / built.name
            write_beside(in_source, (built.parent / BUILD_RECORD).read_text())


def check_shared_libstdcxx(library: Path) -> None:
    """Refuse a library that carries its own copy of libstdc++ (linked statically).

    torch loads the shared libstdc++; a second, static copy inside the extension has its own locale
    facet ids, so iostream number formatting, used by every error message that prints a number,
    picks a wrong facet and crashes the process (seen on a GPU image whose g++ wrapper searched a
    directory holding only libstdc++.a). Linux/ELF only, where readelf is at hand (binutils, which
    linked the library, brings it)."""
    readelf = shutil.which("readelf")
    if platform.system() != "Linux" or readelf is None:
        return
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    if "libstdc++.so" in dynamic:
        return
    compiler = os.environ.get("CXX", "c++")
    raise RuntimeError(
        f"{library.name} was linked without the shared libstdc++ (no 'NEEDED libstdc++.so' in `readelf -d`): "
        f"the C++ compiler ({compiler}) linked libstdc++ statically. torch uses the shared one, and two "
        "copies in one process crash on the first error message that prints a number. Build with a "
        "compiler whose -lstdc++ finds libstdc++.so, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc."
    )


def write_beside(library: Path, record: str) -> None:
    library.with_name(BUILD_RECORD).write_text(record)
    # A library left by an earlier build under another suffix (e.g. _C.cpython-311-...so from
    # before the limited API) would be imported before this one: remove it.
    for stale in library.parent.glob(library.name.split(".", 1)[0] + ".*.so"):
        if stale != library:
            stale.unlink()


def cuda_wanted() -> bool:
    setting = os.environ.get("VAE_FAST_CUDA", "auto")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if setting == "0":
        return False
    if setting == "1" and not available:
        raise RuntimeError(
            "VAE_FAST_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return available


def pip_cuda_include_dirs() -> list[str]:
    """Headers that torch's CUDA wheels ship (curand, cusparse, ...) and that ATen/cuda needs.

    A bare toolkit may lack them; torch >= 2.9 wheels bring them under site-packages/nvidia/cu*/include.
    """
    dirs = []
    for entry in map(Path, torch.__path__):
        for include in sorted(entry.parent.glob("nvidia/cu*/include")) + sorted(entry.parent.glob("nvidia/*/include")):
            if include.is_dir():
                dirs.append(str(include))
    return dirs


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for is header code: without -fopenmp it silently runs on one thread.
    cxx = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    link = ["-fopenmp"]
    macros = []
    if not cuda_wanted():
        return cpp_extension.CppExtension(
            "vae_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, define_macros=macros,
            py_limited_api=True,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    macros.append(("VAE_FAST_WITH_CUDA", None))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("VAE_FAST_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    return cpp_extension.CUDAExtension(
        "vae_fast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        define_macros=macros,
        py_limited_api=True,
    )


if __name__ == "__main__":  # pip's backend and `python setup.py` run it as __main__; tests import the helpers
    setup(
        packages=find_packages(include=["vae_fast", "vae_fast.*"]),
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
        # cp310: the oldest Python pyproject.toml accepts; csrc/ops.cpp defines Py_LIMITED_API to match.
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
