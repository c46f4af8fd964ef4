"""Setup: the pure-Python package always; the compiled csrc extension only on request.

By default ``pip install .`` installs pure Python and the extension is JIT-built with
ninja the first time ``backend="cpp"``/``"cuda"`` is selected. To build it ahead of
time: ``GRPO_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .`` (torch must be
importable in the build environment).
"""
from setuptools import setup


def extension_kwargs() -> dict:
    """ext_modules / cmdclass for grpo_kernels._C; empty unless GRPO_KERNELS_BUILD_EXT=1.

    Builds a CUDAExtension (the CUDA kernels plus the C++ CPU row pass) when torch has
    CUDA and a CUDA toolkit is found (set GRPO_KERNELS_NO_CUDA=1 to skip it), else a
    CppExtension (CPU only). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX" when no GPU
    is visible at build time. Without torch in the build environment (build isolation),
    the package installs as pure Python and the extension is JIT-built on first use.
    """
    import os
    import sys

    if os.environ.get("GRPO_KERNELS_BUILD_EXT") != "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.stderr.write(
            "grpo_kernels: GRPO_KERNELS_BUILD_EXT=1 but torch is not importable in the build environment "
            "(use pip install --no-build-isolation); installing pure Python, the extension will be JIT-built\n"
        )
        return {}

    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
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


setup(**extension_kwargs())
