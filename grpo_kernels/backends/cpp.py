"""The compiled row pass (``csrc/``): CUDA kernels for CUDA tensors, C++/OpenMP for CPU ones.

The extension comes from, in this order:

1. an installed module ``grpo_kernels._C`` (built by ``pip install --no-build-isolation
   -e .`` when torch is importable at build time), or
2. a JIT build of ``csrc/`` (or, in a wheel install, of its packaged copy
   ``grpo_kernels/_csrc``) cached on disk by a previous run (keyed by a hash of the
   sources, the flags, torch and Python), imported directly, or
3. a fresh JIT build with ``torch.utils.cpp_extension.load`` (ninja + a C++ compiler;
   the CUDA sources too when CUDA is available and ``nvcc`` is found). About 25 s for
   the CPU-only build on 2 cores; the result is cached for every later process.

Importing this module never compiles; ``prebuilt_available()`` never compiles either.
The first call of a ``CppRowBackend`` method loads (and if needed builds) the extension;
``backend="auto"`` on the CPU builds it on first use too (``grpo_kernels.backends``).

Environment: ``GRPO_KERNELS_BUILD_DIR`` (cache root, default
``~/.cache/grpo_kernels/torch_extensions``), ``GRPO_KERNELS_NO_CUDA=1`` (build the
CPU-only extension even where CUDA is available), ``GRPO_KERNELS_VERBOSE_BUILD=1``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import List, Optional

import torch

from grpo_kernels import env
from grpo_kernels.backends.base import RowBackend, RowStats
from grpo_kernels.epilogue import (SCALE_MODE_CODES, TokenEpilogue, accumulation_dtype, loss_kind_code, required_ref,
                                   reward_matrix)


def _find_csrc() -> Path:
    """The C++/CUDA sources: ``csrc/`` of a source checkout (editable install), else the
    copy that ``setup.py`` packs into wheels as ``grpo_kernels/_csrc``."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "csrc"
    return checkout if (checkout / "bindings.cpp").is_file() else package / "_csrc"


_CSRC = _find_csrc()
_CPP_SOURCES = ("row_pass_cpu.cpp", "bindings.cpp")
_CUDA_SOURCES = ("row_pass.cu",)
_HEADERS = ("row_pass.h", "row_sweep.h", "group_sweep.h", "divergence_sweep.h")
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

if sys.platform == "win32":
    _EXTRA_CFLAGS, _EXTRA_LDFLAGS = ["/O2", "/openmp"], []
elif sys.platform == "darwin":  # Apple clang has no -fopenmp; rows still spread over at::parallel_for
    _EXTRA_CFLAGS, _EXTRA_LDFLAGS = ["-O3", "-fno-trapping-math"], []
else:  # -fno-trapping-math lets the exp / select loops vectorize
    _EXTRA_CFLAGS, _EXTRA_LDFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"], ["-fopenmp"]
_EXTRA_CUDA_CFLAGS = ["-O3", "-DGRPO_WITH_CUDA"]

_lock = threading.Lock()
_ext = None


# -- locating / building the extension (never at import) ------------------------------


def _cxx() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None:
        path = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(path):
            return path
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def _jit_with_cuda_cached(no_cuda: bool) -> bool:
    if no_cuda:
        return False
    return torch.version.cuda is not None and torch.cuda.is_available() and _nvcc() is not None


def _jit_with_cuda() -> bool:
    """Whether a JIT build here includes the CUDA kernels."""
    return _jit_with_cuda_cached(env.no_cuda())


def _sources(with_cuda: bool) -> List[str]:
    names = _CPP_SOURCES + (_CUDA_SOURCES if with_cuda else ())
    return [str(_CSRC / n) for n in names]


_name_cache: dict = {}


def _build_name(with_cuda: bool) -> Optional[str]:
    """Module name of the JIT build: changes with the sources, flags, torch and Python."""
    files = [_CSRC / n for n in _CPP_SOURCES + _CUDA_SOURCES + _HEADERS]
    try:
        key = (with_cuda, os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
               tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    except OSError:
        return None  # no sources found (a broken install): no JIT build
    if key in _name_cache:
        return _name_cache[key]
    h = hashlib.sha256()
    try:
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    except OSError:
        return None
    h.update(repr((_EXTRA_CFLAGS, _EXTRA_LDFLAGS, _EXTRA_CUDA_CFLAGS, with_cuda)).encode())
    h.update(repr((torch.__version__, torch.version.cuda, sys.version_info[:2], sys.platform)).encode())
    if with_cuda:
        h.update(key[1].encode())
    name = f"grpo_kernels_{'cuda' if with_cuda else 'cpu'}_{h.hexdigest()[:12]}"
    _name_cache[key] = name
    return name


def build_root() -> Path:
    """Where JIT builds are cached (``GRPO_KERNELS_BUILD_DIR``, else the user cache)."""
    root = env.build_dir()
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "grpo_kernels" / "torch_extensions"


def _cached_library(with_cuda: bool) -> Optional[Path]:
    name = _build_name(with_cuda)
    if name is None:
        return None
    from torch.utils.cpp_extension import LIB_EXT

    lib = build_root() / name / f"{name}{LIB_EXT}"
    return lib if lib.is_file() else None


def _import_library(path: Path):
    name = path.name.split(".")[0]
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prebuilt_module_exists() -> bool:
    try:
        return importlib.util.find_spec("grpo_kernels._C") is not None
    except (ImportError, ValueError):
        return False


def prebuilt_available() -> bool:
    """True when the extension loads without compiling: an installed ``grpo_kernels._C``
    or an up-to-date JIT build in the cache (imported here if so). Never compiles."""
    try:
        return load_extension(allow_build=False) is not None
    except Exception:  # noqa: BLE001 - a broken or missing library just means "not available"
        return False


def _jit_build(with_cuda: bool):
    name = _build_name(with_cuda)
    if name is None:
        raise RuntimeError(
            f"grpo_kernels: the C++ sources are not at {_CSRC} (an install that lost them); reinstall "
            "grpo_kernels, or prebuild the extension with pip install --no-build-isolation from a checkout"
        )
    if _cxx() is None:
        raise RuntimeError(
            "grpo_kernels: backend 'cpp' needs a C++ compiler (set CXX or install g++) to JIT-build csrc/, "
            "or a prebuilt extension (pip install --no-build-isolation -e . with torch installed)"
        )
    from torch.utils.cpp_extension import load, verify_ninja_availability

    try:
        verify_ninja_availability()
    except RuntimeError as exc:
        raise RuntimeError("grpo_kernels: the JIT build of backend 'cpp' needs ninja (pip install ninja)") from exc
    build_dir = build_root() / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(
            f"grpo_kernels: cannot create the JIT build directory {build_dir} ({exc}); "
            "set GRPO_KERNELS_BUILD_DIR to a writable folder"
        ) from exc
    return load(
        name=name,
        sources=_sources(with_cuda),
        extra_cflags=_EXTRA_CFLAGS + (["-DGRPO_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=_EXTRA_CUDA_CFLAGS if with_cuda else None,
        extra_ldflags=_EXTRA_LDFLAGS,
        extra_include_paths=[str(_CSRC)],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=env.verbose_build(),
    )


def _import_prebuilt():
    if not _prebuilt_module_exists():
        return None
    try:
        return importlib.import_module("grpo_kernels._C")
    except ImportError:
        return None


def load_extension(allow_build: bool = True):
    """The compiled extension module: the installed ``grpo_kernels._C``, else the cached JIT
    build, else (``allow_build``) a fresh JIT build. Where CUDA is usable, a module without
    the CUDA kernels is replaced by the CUDA build when one can be loaded or built.
    Raises RuntimeError when nothing can be loaded (or built)."""
    global _ext
    ext = _ext
    if ext is not None and (not allow_build or ext.has_cuda() or not _jit_with_cuda()):
        return ext
    want_cuda = _jit_with_cuda()
    with _lock:
        module = _ext if _ext is not None else _import_prebuilt()
        if module is None or (want_cuda and not module.has_cuda()):
            lib = _cached_library(want_cuda)
            if lib is not None:
                module = _import_library(lib)
            elif allow_build:
                module = _jit_build(want_cuda)
        if module is None:
            raise RuntimeError(
                "grpo_kernels: no prebuilt compiled extension (grpo_kernels._C or a cached JIT build)"
            )
        _ext = module
        return module


# -- the backend -----------------------------------------------------------------------


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _vec(t: Optional[torch.Tensor], dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """[n] contiguous in ``dtype`` on ``device`` (None stays None)."""
    if t is None:
        return None
    return t.reshape(-1).to(device=device, dtype=dtype).contiguous()


def _head_args(options) -> dict:
    softcap = options.logit_softcap
    return dict(temperature=float(options.temperature), softcap=None if softcap is None else float(softcap))


def _option_args(options) -> dict:
    return dict(
        kind=loss_kind_code(options.loss_type),
        lo=1.0 - options.epsilon_low,
        hi=1.0 + options.eps_high,
        delta=None if options.delta is None else float(options.delta),
        eps_high=float(options.eps_high),
        sapo_pos=float(options.sapo_temperature_pos),
        sapo_neg=float(options.sapo_temperature_neg),
        beta=float(options.beta),
        bias_correction_kl=bool(options.use_bias_correction_kl),
    )


def _reward_args(token_inputs, options, acc: torch.dtype, device) -> dict:
    """The fused epilogue's rewards (``epilogue.TokenInputs.rewards``; none: {}): rewards [B, R],
    weights [R] (``epilogue.reward_matrix``), each row's sequence index, the per-row advantages'
    output and the scale settings."""
    if token_inputs.adv is not None or token_inputs.rewards is None:
        return {}
    r, w = reward_matrix(token_inputs.rewards, token_inputs.reward_weights, acc, device)
    seq = _vec(token_inputs.seq, torch.int64, device)
    return dict(rewards=r, reward_weights=w, seq=seq, adv_out=torch.empty(seq.shape[0], dtype=acc, device=device),
                num_generations=int(options.num_generations), scale_mode=SCALE_MODE_CODES[options.scale_rewards],
                reward_eps=float(options.reward_eps))


def _token_args(token_inputs, acc: torch.dtype, device, beta: float) -> dict:
    ref = required_ref(token_inputs.ref, beta)
    return dict(
        old=_vec(token_inputs.old, acc, device),
        adv=_vec(token_inputs.adv, acc, device),
        weight=_vec(token_inputs.weight, acc, device),
        ref=_vec(ref, acc, device),
        policy_scale=_vec(token_inputs.policy_scale, acc, device),
    )


class CppRowBackend(RowBackend):
    """The csrc extension: one fused kernel per chunk, no [n, V] temporaries.

    ``emulate_device=True`` (CPU tensors only; for tests) runs the CUDA kernels' launch on the
    host instead of the production CPU path: the kernels' lane count, column split, summation
    order and block reductions, so that the CPU suite checks the code that a GPU runs.
    """

    name = "cpp"
    temp_bytes_per_elem = 0
    #: fixed reduction order: one block (CUDA; its size depends on V and the dtype only) or
    #: one thread (CPU) per row, the same sequence of partial sums on every run
    deterministic = True
    #: on the CPU ``auto`` keeps the torch divergence pass: one thread, distill_loss at N=1024,
    #: H=256, H_t=512, V=32768 fp32 took 2.03 / 2.88 / 1.85 CPU s here at beta 0 / 0.5 / 1 against
    #: torch's 1.38 / 1.74 / 1.48 (torch's ops run AVX-512, the extension's loops 4 floats wide;
    #: -march=native gave 1.68 / 2.45 / 1.55, still behind), so 'cpp' runs it only when named
    divergence_auto_devices = ("cuda",)

    def __init__(self, emulate_device: bool = False):
        self.emulate_device = bool(emulate_device)

    def _emulation(self, t: torch.Tensor) -> dict:
        """The bindings' ``emulate_device`` argument, checked against the tensor's device."""
        if self.emulate_device and t.device.type != "cpu":
            raise ValueError(f"emulate_device=True runs on CPU tensors only, got a tensor on {t.device}")
        return dict(emulate_device=self.emulate_device)

    def supports(self, device, dtype):
        device = torch.device(device)
        if dtype not in _SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported (float32, float64, float16, bfloat16)"
        if device.type not in ("cpu", "cuda"):
            return f"device type {device.type!r} is not supported (cpu, cuda)"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        try:
            module = load_extension(allow_build=False)  # imports a built library; never compiles
        except Exception:  # noqa: BLE001
            module = None
        if module is not None and (device.type == "cpu" or module.has_cuda()):
            return None
        if not (_CSRC / "bindings.cpp").is_file():
            return f"no prebuilt extension and no sources at {_CSRC} to build it"
        if _cxx() is None:
            return "no C++ compiler to build the extension (and no prebuilt grpo_kernels._C)"
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            return "no ninja to build the extension (pip install ninja), and no prebuilt grpo_kernels._C"
        if device.type == "cuda" and not _jit_with_cuda():
            if env.no_cuda():
                return "GRPO_KERNELS_NO_CUDA=1"
            return "no nvcc (CUDA toolkit) to build the CUDA kernels, and no prebuilt extension with them"
        return None  # JIT-built on first use

    # -- the contract (base.py): the row primitives and the advantage kernel --

    def row_stats(self, logits, targets, options, execution, need_entropy=True):
        ext = load_extension()
        n = logits.shape[0]
        acc = accumulation_dtype(logits.dtype)
        out = [torch.empty(n, dtype=acc, device=logits.device) for _ in range(3)]
        ext.row_stats(logits, _vec(targets, torch.int64, logits.device), *out, **_head_args(options),
                      stream=_stream(logits), need_entropy=bool(need_entropy), **self._emulation(logits))
        return RowStats(lse=out[0], entropy=out[1], target_logit=out[2])

    def row_grad_(self, logits, targets, stats, dlogp, dentropy, options, execution):
        ext = load_extension()
        acc = accumulation_dtype(logits.dtype)
        dev = logits.device
        ext.row_grad_(
            logits, _vec(targets, torch.int64, dev), _vec(stats.lse, acc, dev), _vec(stats.entropy, acc, dev),
            _vec(dlogp, acc, dev), _vec(dentropy, acc, dev), **_head_args(options), stream=_stream(logits),
            **self._emulation(logits),
        )

    def row_fused_(self, logits, targets, token_inputs, options, execution):
        if options.importance_sampling_level != "token":
            raise ValueError("row_fused_ needs importance_sampling_level='token'")
        ext = load_extension()
        n = logits.shape[0]
        acc = accumulation_dtype(logits.dtype)
        dev = logits.device
        lse, ent, tl, loss, dlogp = (torch.empty(n, dtype=acc, device=dev) for _ in range(5))
        rewards = _reward_args(token_inputs, options, acc, dev)
        ext.row_fused_(
            logits, _vec(targets, torch.int64, dev),
            **_token_args(token_inputs, acc, dev, options.beta),
            lse=lse, entropy=ent, target_logit=tl, loss=loss, dlogp=dlogp,
            **_head_args(options), **_option_args(options), stream=_stream(logits), **rewards,
            **self._emulation(logits),
        )
        return (RowStats(lse=lse, entropy=ent, target_logit=tl),
                TokenEpilogue(loss, dlogp, rewards["adv_out"] if rewards else None))

    def divergence_rows_(self, zs, zt, spec, coef, execution, out=None, vocab=None):
        """The divergence row pass (contract: ``grpo_kernels.divergence``) in one kernel: D and the
        student's entropy [n] in the accumulation dtype; with ``coef`` ([] or [n]) ``coef * dD/dz_s``
        into ``out`` ([n, V], zs's dtype; None: over ``zs``). The teacher's logits ``zt`` are read in
        their own dtype. ``execution`` is unused: the reduction order is fixed by V and the launch."""
        self.require_whole_vocabulary(vocab)
        ext = load_extension()
        acc = accumulation_dtype(zs.dtype)
        dev = zs.device
        div, ent = (torch.empty(zs.shape[0], dtype=acc, device=dev) for _ in range(2))
        c = None if coef is None else coef.detach().to(device=dev, dtype=acc).contiguous()
        (s_scale, s_cap, s_temp), (t_scale, t_cap, t_temp) = spec.student.kernel_args(), spec.teacher.kernel_args()
        ext.divergence_rows_(zs, zt, div, ent, c, out, student_scale=s_scale, student_softcap=s_cap or None,
                             student_temperature=s_temp, teacher_scale=t_scale, teacher_softcap=t_cap or None,
                             teacher_temperature=t_temp, beta=float(spec.beta), stream=_stream(zs),
                             **self._emulation(zs))
        return div, ent

    def group_normalize(self, rewards, num_generations: int, scale_rewards: str, eps: float):
        """``advantages.normalize_groups`` in one kernel, on the arguments as checked by
        ``advantages.group_advantages``; result in the accumulation dtype."""
        ext = load_extension()
        r = rewards.detach().to(accumulation_dtype(rewards.dtype)).contiguous()
        out = torch.empty_like(r)
        ext.group_normalize(r, out, int(num_generations), SCALE_MODE_CODES[scale_rewards], float(eps), stream=_stream(r),
                            **self._emulation(r))
        return out


BACKEND = CppRowBackend()
