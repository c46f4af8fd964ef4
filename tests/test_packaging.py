"""A wheel (non-editable) install carries the csrc sources, so backend="cpp" can JIT-build."""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    """The package as ``pip wheel`` builds it, unpacked (what a site-packages install holds)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in ("grpo_kernels", "csrc"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(REPO, name), src / name)
    # no build isolation (nothing to download, so a failure is ours); setuptools >= 70.1 builds
    # wheels without the `wheel` package. GRPO_KERNELS_BUILD_EXT=0: torch is importable here,
    # and the compiled extension is not what this checks.
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} < 70.1 needs the wheel package to build wheels")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
         str(src)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, GRPO_KERNELS_BUILD_EXT="0"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("grpo_kernels-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if n.startswith("grpo_kernels/_C")], "GRPO_KERNELS_BUILD_EXT=0 built _C"
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def test_wheel_carries_every_csrc_source(unpacked_wheel):
    shipped = sorted(os.listdir(unpacked_wheel / "grpo_kernels" / "_csrc"))
    expected = sorted(n for n in os.listdir(os.path.join(REPO, "csrc")) if n.endswith((".cpp", ".cu", ".h", ".cuh")))
    assert shipped == expected
    for name in expected:
        with open(os.path.join(REPO, "csrc", name), "rb") as f:
            assert (unpacked_wheel / "grpo_kernels" / "_csrc" / name).read_bytes() == f.read()


def test_installed_package_builds_from_its_own_sources(unpacked_wheel, tmp_path):
    """Imported from the unpacked wheel (not the checkout), the JIT build reads the packaged
    sources and hashes to the same build as the checkout's csrc/ (so it is the same code)."""
    code = textwrap.dedent(
        """
        import sys
        import grpo_kernels
        from grpo_kernels.backends import cpp
        print(grpo_kernels.__file__)
        print(cpp._CSRC)
        print(cpp._build_name(False))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(unpacked_wheel))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    module_file, csrc, build_name = res.stdout.split()
    assert module_file.startswith(str(unpacked_wheel)), module_file
    assert csrc == str(unpacked_wheel / "grpo_kernels" / "_csrc")
    from grpo_kernels.backends import cpp

    assert cpp._CSRC == cpp.Path(REPO) / "csrc"
    assert build_name == cpp._build_name(False) != "None"
