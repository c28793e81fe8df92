"""Build msa_cuda: the SM90 kernels as the extension module ``msa_cuda._C``.

The translation units come from ``sources.txt`` and the nvcc flags from ``cmake/nvcc_flags.txt``;
``CMakeLists.txt`` reads the same two files, so both builds compile the same thing.

Needs torch (its CUDA build), nvcc 12.3+ and the CUTLASS/CuTe headers, taken from the
``nvidia-cutlass`` package or from ``CUTLASS_PATH``. Install without build isolation so the build
sees the torch you run with:  ``pip install --no-build-isolation .``
"""

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _fail(message: str) -> None:
    sys.stderr.write(f"\nmsa_cuda build error: {message}\n\n")
    raise SystemExit(1)


def _read_list(path: Path) -> list:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _find_cuda_home() -> str:
    # torch guesses CUDA_HOME from the `nvcc` on PATH, which may be a wrapper script; prefer an
    # explicit CUDA_HOME, then the toolkit's standard location.
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    _fail("nvcc was not found. Install the CUDA toolkit (12.3 or newer, 13.0 tested) and set CUDA_HOME.")
    return ""


def _find_cutlass_include() -> Path:
    env = os.environ.get("CUTLASS_PATH")
    if env:
        candidates = [Path(env) / "include", Path(env)]
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or spec.origin is None:
            _fail("CUTLASS/CuTe headers were not found. Run `pip install nvidia-cutlass==4.2.0.0` "
                  "or point CUTLASS_PATH at a CUTLASS checkout.")
        candidates = [Path(spec.origin).parent / "source" / "include"]
    for include in candidates:
        if (include / "cute" / "tensor.hpp").exists():
            return include
    _fail(f"no CUTLASS headers (cute/tensor.hpp) under {', '.join(map(str, candidates))}.")
    return Path()


def _cutlass_version(include: Path) -> str:
    text = (include / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{k} (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def _extensions():
    os.environ["CUDA_HOME"] = _find_cuda_home()
    from torch.utils.cpp_extension import CUDAExtension  # after CUDA_HOME is settled

    cutlass_include = _find_cutlass_include()
    version_define = f'-DMSA_CUTLASS_VERSION="{_cutlass_version(cutlass_include)}"'
    include_dirs = [str(ROOT / "include"), str(cutlass_include)]
    nvcc_flags = _read_list(ROOT / "cmake" / "nvcc_flags.txt") + [version_define]
    if os.environ.get("NVCC_THREADS"):
        nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
    cxx_flags = ["-O3", "-std=c++20", version_define]
    return [
        CUDAExtension(
            name="msa_cuda._C",
            sources=_read_list(ROOT / "sources.txt"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    ]


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__":
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail("torch must be installed before building msa_cuda (pip install torch), and the build must "
              "see it: use `pip install --no-build-isolation .`.")
    setup(
        name="msa_cuda",
        version="0.1.0",
        description="MiniMax Sparse Attention (MSA) kernels for NVIDIA Hopper (SM90)",
        package_dir={"": "python"},
        packages=find_packages("python"),
        ext_modules=_extensions(),
        cmdclass={"build_ext": _build_ext_class()},
        python_requires=">=3.10",
        install_requires=["torch>=2.5"],
        zip_safe=False,
    )
