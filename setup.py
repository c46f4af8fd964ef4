"""Setup: the Python package, the csrc sources, and the compiled extension when torch is there.

``pip install .`` (build isolation: no torch at build time) installs the Python package
plus a copy of ``csrc/`` as ``grpo_kernels/_csrc``; the extension is then JIT-built with
ninja the first time ``backend="cpp"`` is selected and cached. ``pip install
--no-build-isolation .`` with torch installed builds ``grpo_kernels._C`` ahead of time:
the CUDA extension when torch has CUDA and a CUDA toolkit is found, the CPU one
otherwise. ``GRPO_KERNELS_BUILD_EXT=0`` skips that build, ``=1`` makes a missing torch
an error instead of a fallback.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

_ROOT = os.path.dirname(os.path.abspath(__file__))
_CSRC_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


class BuildPyWithSources(build_py):
    """Packs ``csrc/`` into the wheel as ``grpo_kernels/_csrc`` so a non-editable install
    can still JIT-build the extension (the top-level ``csrc/`` is not a package)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads csrc/ in the checkout
            return
        target = os.path.join(self.build_lib, "grpo_kernels", "_csrc")
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(os.path.join(_ROOT, "csrc"))):
            if name.endswith(_CSRC_SUFFIXES):
                shutil.copy2(os.path.join(_ROOT, "csrc", name), os.path.join(target, name))


def extension_kwargs() -> dict:
    """ext_modules / cmdclass for grpo_kernels._C; empty when torch is not importable here
    (build isolation) or GRPO_KERNELS_BUILD_EXT=0.

    Builds a CUDAExtension (the CUDA kernels plus the C++ CPU row pass) when torch has
    CUDA and a CUDA toolkit is found (set GRPO_KERNELS_NO_CUDA=1 to skip it), else a
    CppExtension (CPU only). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX" when no GPU
    is visible at build time. Without torch in the build environment (build isolation),
    the package installs as pure Python and the extension is JIT-built on first use.
    """
    import sys

    requested = os.environ.get("GRPO_KERNELS_BUILD_EXT", "auto")
    if requested == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if requested == "1":
            raise RuntimeError(
                "grpo_kernels: GRPO_KERNELS_BUILD_EXT=1 but torch is not importable in the build environment "
                "(use pip install --no-build-isolation)"
            ) from None
        return {}  # build isolation: the extension is JIT-built on first use

    csrc = os.path.join(_ROOT, "csrc")
    sources = ["csrc/row_pass_cpu.cpp", "csrc/bindings.cpp"]  # relative, as setuptools wants
    if sys.platform == "win32":
        cxx_flags, link_flags = ["/O2", "/openmp", "/std:c++17"], []
    elif sys.platform == "darwin":
        cxx_flags, link_flags = ["-O3", "-fno-trapping-math"], []  # Apple clang: no -fopenmp
    else:
        cxx_flags, link_flags = ["-O3", "-fopenmp", "-fno-trapping-math"], ["-fopenmp"]
    with_cuda = (
        os.environ.get("GRPO_KERNELS_NO_CUDA") != "1" and torch.version.cuda is not None and CUDA_HOME is not None
    )
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        ext = CUDAExtension(
            "grpo_kernels._C",
            sources + ["csrc/row_pass.cu"],
            include_dirs=[csrc],
            extra_compile_args={"cxx": cxx_flags + ["-DGRPO_WITH_CUDA"], "nvcc": ["-O3", "-DGRPO_WITH_CUDA"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "grpo_kernels._C",
            sources,
            include_dirs=[csrc],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


def setup_kwargs() -> dict:
    kwargs = extension_kwargs()
    kwargs["cmdclass"] = {"build_py": BuildPyWithSources, **kwargs.get("cmdclass", {})}
    return kwargs


setup(**setup_kwargs())
