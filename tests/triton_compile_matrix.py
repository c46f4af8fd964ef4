"""Every Triton kernel of grpo_kernels/backends/triton, compiled for sm_90 without a GPU.

Run as a script (``python tests/triton_compile_matrix.py [--jobs N]``) in a process WITHOUT
``TRITON_INTERPRET`` (the kernels must be ``JITFunction``s, not interpreted functions);
tests/test_triton_compile.py does that and asserts on its output. One JSON line per compiled
variant on stdout (kernel, variant, dtype, config, specialization, registers, spill bytes,
seconds, error), then a summary line.

What a launch can compile, and how it is reproduced here:

- the argument values go through Triton's own binder for a CUDA target
  (``create_function_from_signature``), so every specialization is the one a real launch makes:
  16-byte divisibility of pointers and ints (``tt.divisibility``) and ints equal to 1 turned into
  constants (V = 1, a row stride of 1, one reward function K = 1, B = G = 1);
- configs: each autotuner's configs that survive its own pruning at some V, and the fixed tiles
  ``fixed_row_config(V)`` picks when autotuning is off, for V from 1 to 2^18, by default and with
  each ``GRPO_KERNELS_TRITON_BLOCK_V`` up to the default's largest tile, 4096 (a larger forced
  tile is the user's own choice, and spills in fp64); launch options that produce the same code,
  (BLOCK_V, num_warps, num_stages), are compiled once;
- dtypes: the logits in bf16, fp16, fp32, fp64 (the advantage kernels see the accumulation dtype
  only: the host converts rewards to fp32 / fp64 first); the divergence kernel also with a
  student and a teacher of different dtypes (``"float32:bfloat16"``: student, teacher);
- spills from ptxas's own report (``-v``, which Triton always passes: "N bytes spill stores, M
  bytes spill loads"), since ``CompiledKernel.n_spills`` is read from the driver when the binary
  is loaded on a GPU.

Dedupe (why not every flag at every config): register pressure grows with the tile per thread,
the pipelining depth and the features compiled in, so every config x dtype x V-specialization is
compiled with every feature on, and each other combination of the constexpr flags at the
heaviest configs of each kernel (most elements per thread).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: the logits dtypes of the row kernels (torch names)
DTYPES = ("bfloat16", "float16", "float32", "float64")
#: (name, V, row stride) per V specialization: not a multiple of 16, a multiple of 16, V = 1
V_SPECS = (("V301", 301, 303), ("V4096", 4096, 4096), ("V1", 1, 1))
#: the vocabularies whose launch configs are enumerated (every power of 2 and one past it)
V_RANGE = sorted({1, 2, 3} | {2 ** k + d for k in range(1, 19) for d in (0, 1)})
#: Triton's num_stages when a launch names none (CUDAOptions and triton.Config both default to 3)
DEFAULT_STAGES = 3
#: the GRPO_KERNELS_TRITON_BLOCK_V values whose fixed tiles are compiled (None: the default)
FORCED_TILES = (None,) + tuple(2 ** k for k in range(4, 13))
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


# ----------------------------------------------------------------------------- the variants


def _row_configs(kind: str, v: int, dtype: str = "float32"):
    """The (BLOCK_V, num_warps, num_stages) a launch at vocabulary ``v`` can use: the autotuner's
    configs after its pruning, and the fixed tile (the divergence kernel's depend on the student's
    ``dtype``)."""
    import torch
    import triton  # noqa: F401 - the kernels' module needs it imported
    from grpo_kernels.backends.triton import common, row_kernels as rk
    from grpo_kernels.backends.triton import divergence_kernel as dk

    tuned = {"stats": rk.row_stats_tuned, "grad": rk.row_grad_tuned, "fused": rk.row_fused_tuned,
             "divergence": dk.divergence_tuned}[kind]
    named = {"V": v, "zs_ptr": torch.empty(0, dtype=getattr(torch, dtype.split(":")[0]))}
    kept = tuned.early_config_prune(tuned.configs, named) if tuned.early_config_prune else tuned.configs
    out = {(c.kwargs["BLOCK_V"], c.num_warps, c.num_stages) for c in kept}
    fixed = ((lambda v: dk.fixed_config(v, named["zs_ptr"].dtype)) if kind == "divergence"
             else common.fixed_row_config)
    for forced in FORCED_TILES:
        with _forced_tile(forced):
            block, launch = fixed(v)
        out.add((block, launch.get("num_warps", 4), launch.get("num_stages", DEFAULT_STAGES)))
    return out


@contextlib.contextmanager
def _forced_tile(block):
    """GRPO_KERNELS_TRITON_BLOCK_V set to ``block`` (unset for None) while fixed_row_config reads it."""
    name = "GRPO_KERNELS_TRITON_BLOCK_V"
    saved = os.environ.pop(name, None)
    if block is not None:
        os.environ[name] = str(block)
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def _configs_by_spec(kind: str, dtype: str = "float32"):
    """{V-spec name: sorted configs}: every config reachable at some V of that specialization."""
    multiple = {c for v in V_RANGE if v > 1 and v % 16 == 0 for c in _row_configs(kind, v, dtype)}
    other = {c for v in V_RANGE if v > 1 and v % 16 != 0 for c in _row_configs(kind, v, dtype)}
    return {"V301": sorted(other), "V4096": sorted(multiple), "V1": sorted(_row_configs(kind, 1, dtype))}


def _heaviest(configs):
    """Of the configs with the most elements per thread: the one with the most warps (the fewest
    registers a thread may use) and the one with the deepest pipelining."""
    per_thread = max(c[0] // (c[1] * 32) for c in configs)
    top = [c for c in configs if c[0] // (c[1] * 32) == per_thread]
    return sorted({max(top, key=lambda c: (c[1], c[2])), max(top, key=lambda c: (c[2], c[1]))})


STATS_FLAGS = [dict(HAS_SOFTCAP=s, HAS_TEMP=t, HAS_ENT=e) for s in (True, False) for t in (True, False)
               for e in (True, False)]
GRAD_FLAGS = [dict(HAS_SOFTCAP=s, HAS_TEMP=t, HAS_DENT=d) for s in (True, False) for t in (True, False)
              for d in (True, False)]
#: the fused kernel's epilogue variants: every loss kind, option and reward scale mode at least once
FUSED_FLAGS = [
    dict(LOSS=0, HAS_DELTA=True, HAS_OLD=True, HAS_SCALE=True, HAS_KL=True, BIAS_KL=True, HAS_SOFTCAP=True,
         HAS_TEMP=True, rewards=("batch", 3, 64, 4)),  # every feature on (the config sweep's variant)
    dict(LOSS=0, HAS_DELTA=False, HAS_OLD=False, HAS_SCALE=False, HAS_KL=False, BIAS_KL=False, HAS_SOFTCAP=False,
         HAS_TEMP=False, rewards=None),  # TRL's default: dapo on-policy, no KL, plain logits
    dict(LOSS=1, HAS_DELTA=False, HAS_OLD=True, HAS_SCALE=True, HAS_KL=True, BIAS_KL=False, HAS_SOFTCAP=True,
         HAS_TEMP=False, rewards=None),  # cispo
    dict(LOSS=2, HAS_DELTA=False, HAS_OLD=True, HAS_SCALE=False, HAS_KL=True, BIAS_KL=True, HAS_SOFTCAP=False,
         HAS_TEMP=True, rewards=None),  # sapo
    dict(LOSS=0, HAS_DELTA=False, HAS_OLD=True, HAS_SCALE=False, HAS_KL=False, BIAS_KL=False, HAS_SOFTCAP=False,
         HAS_TEMP=False, rewards=("group", 1, 32, 8)),  # rewards, group scale, one reward function
    dict(LOSS=0, HAS_DELTA=False, HAS_OLD=True, HAS_SCALE=False, HAS_KL=False, BIAS_KL=False, HAS_SOFTCAP=False,
         HAS_TEMP=False, rewards=("none", 2, 16, 16)),  # rewards, no scaling
    dict(LOSS=0, HAS_DELTA=False, HAS_OLD=True, HAS_SCALE=False, HAS_KL=False, BIAS_KL=False, HAS_SOFTCAP=False,
         HAS_TEMP=False, rewards=("group", 1, 1, 1)),  # B = G = K = 1: every reward int specialized to 1
    dict(LOSS=0, HAS_DELTA=False, HAS_OLD=True, HAS_SCALE=False, HAS_KL=False, BIAS_KL=False, HAS_SOFTCAP=False,
         HAS_TEMP=False, rewards=("batch", 1, 4096, 16)),  # the largest reward tile (RBLOCK = MAX_BLOCK)
]

#: the divergence kernel's variants: MODE (0 forward KL, 1 reverse KL, 2 the mixture's extra pass)
#: x gradient x each head's softcap; ``coef``: the gradient coefficient's stride (0: a [] coef, as
#: distill_loss passes it; 1: per row, specialized to a constant). The first is the config sweep's
#: (the mixture has the most passes; its gradient pass the most live values)
DIVERGENCE_FLAGS = [
    dict(MODE=2, HAS_GRAD=True, S_CAP=True, T_CAP=True, coef=0),
    dict(MODE=1, HAS_GRAD=True, S_CAP=True, T_CAP=True, coef=1),
    dict(MODE=0, HAS_GRAD=True, S_CAP=True, T_CAP=True, coef=0),
    dict(MODE=0, HAS_GRAD=False, S_CAP=True, T_CAP=True, coef=0),
    dict(MODE=1, HAS_GRAD=False, S_CAP=True, T_CAP=True, coef=0),
    dict(MODE=2, HAS_GRAD=False, S_CAP=True, T_CAP=True, coef=0),
    dict(MODE=2, HAS_GRAD=True, S_CAP=False, T_CAP=False, coef=1),
    dict(MODE=2, HAS_GRAD=True, S_CAP=True, T_CAP=False, coef=0),
    dict(MODE=1, HAS_GRAD=True, S_CAP=False, T_CAP=True, coef=0),
]
#: (student, teacher) dtypes of different kinds: compiled with the sweep's variant and the reverse
#: KL's at the heaviest configs
MIXED_DTYPES = ("float32:bfloat16", "bfloat16:float32", "float64:float32")
#: every kernel the matrix compiles (``--kernels`` picks some)
KERNELS = ("stats", "grad", "fused", "divergence", "batch_std", "group_normalize")


def variants():
    """Every (kernel, variant name, dtype, flags, config, V-spec) to compile."""
    out = []
    for kind, flag_sets in (("stats", STATS_FLAGS), ("grad", GRAD_FLAGS), ("fused", FUSED_FLAGS)):
        by_spec = _configs_by_spec(kind)
        heavy = _heaviest(by_spec["V4096"] + by_spec["V301"])
        for dtype in DTYPES:
            for spec, configs in by_spec.items():
                for cfg in configs:  # every config, every feature on
                    out.append((kind, 0, dtype, cfg, spec))
            for i in range(1, len(flag_sets)):  # every other flag set at the heaviest configs
                for cfg in heavy:
                    out.append((kind, i, dtype, cfg, "V4096"))
    out += _divergence_variants()
    for dtype in ("float32", "float64"):
        out += _advantage_variants(dtype)
    return out


def _divergence_variants():
    """As the row kernels', with configs per student dtype (fp64 has a smaller largest tile)."""
    out = []
    for dtype in DTYPES + MIXED_DTYPES:
        by_spec = _configs_by_spec("divergence", dtype)
        heavy = _heaviest(by_spec["V4096"] + by_spec["V301"])
        if dtype in MIXED_DTYPES:  # the sweep's variant and the reverse KL's, at the heaviest configs
            out += [("divergence", i, dtype, cfg, "V4096") for i in (0, 1) for cfg in heavy]
            continue
        out += [("divergence", 0, dtype, cfg, spec) for spec, configs in by_spec.items() for cfg in configs]
        out += [("divergence", i, dtype, cfg, "V4096") for i in range(1, len(DIVERGENCE_FLAGS)) for cfg in heavy]
    return out


def _advantage_variants(dtype):
    from grpo_kernels.backends.triton import advantages_kernel as ak

    blocks = sorted({min(ak.MAX_BLOCK, max(16, 1 << max(0, (n - 1).bit_length()))) for n in range(1, 2 * ak.MAX_BLOCK)})
    out = [("batch_std", 0, dtype, (b, 4, DEFAULT_STAGES), "B") for b in blocks]
    for mode in (ak.STD_GROUP, ak.STD_GIVEN, ak.STD_ZERO, ak.STD_NONE):
        out += [("group_normalize", mode, dtype, (b, 4, DEFAULT_STAGES), "G") for b in blocks]
    out += [("group_normalize", ak.STD_ZERO, dtype, (16, 4, DEFAULT_STAGES), "G1")]  # G = 1 (a constant)
    return out


# ----------------------------------------------------------------------------- one compile


def _launch_args(kind, flags_index, dtype, block, spec):
    """(kernel, positional args, keyword args) as the host code launches it (CPU tensors stand in
    for device ones: the binder reads their dtype and address alignment only)."""
    import torch
    import triton.language as tl
    from grpo_kernels.backends.triton import advantages_kernel as ak, row_kernels as rk

    if kind == "divergence":
        _, V, stride = next(s for s in V_SPECS if s[0] == spec)
        return _divergence_args(flags_index, dtype, block, V, stride)
    zt = getattr(torch, dtype)
    acc = torch.float64 if zt == torch.float64 else torch.float32
    ACC = tl.float64 if acc == torch.float64 else tl.float32
    if kind in ("batch_std", "group_normalize"):
        r = torch.empty(64, dtype=acc)
        if kind == "batch_std":
            return ak.batch_std_kernel, (r, r[:1], 64), dict(ACC=ACC, BLOCK=block)
        G = 1 if spec == "G1" else 40
        return ak.group_normalize_kernel, (r, torch.empty_like(r), r[:1], G, 1e-4), dict(
            MAXF=float(torch.finfo(acc).max), MODE=flags_index, ACC=ACC, BLOCK=block)
    _, V, stride = next(s for s in V_SPECS if s[0] == spec)
    z = torch.empty(4 * stride, dtype=zt)
    vec = lambda: torch.empty(4, dtype=acc)  # noqa: E731
    tg = torch.empty(4, dtype=torch.int64)
    if kind == "stats":
        return rk.row_stats_kernel, (z, stride, tg, vec(), vec(), vec(), V), dict(
            temperature=0.7, softcap=30.0, ACC=ACC, BLOCK_V=block, **STATS_FLAGS[flags_index])
    if kind == "grad":
        return rk.row_grad_kernel, (z, stride, tg, vec(), vec(), vec(), vec(), V), dict(
            temperature=0.7, softcap=30.0, ACC=ACC, BLOCK_V=block, **GRAD_FLAGS[flags_index])
    flags = dict(FUSED_FLAGS[flags_index])
    rewards = flags.pop("rewards")
    if rewards is None:
        reward_args = (vec(), vec(), tg, vec())
        reward_kw = dict(K=1, B=1, G=1, HAS_REWARDS=False, SCALE=0, RBLOCK=16, reward_eps=0.0)
    else:
        scale, K, B, G = rewards
        reward_args = (torch.empty(B * K, dtype=acc), torch.empty(K, dtype=acc), tg, vec())
        reward_kw = dict(K=K, B=B, G=G, HAS_REWARDS=True, SCALE={"group": 0, "batch": 1, "none": 2}[scale],
                         RBLOCK=ak.reward_block(B, G, scale), reward_eps=1e-4)
    cap = 88.722 if acc == torch.float32 else 709.782
    return rk.row_fused_kernel, (z, stride, tg, *[vec() for _ in range(10)], V, *reward_args), dict(
        temperature=0.7, softcap=30.0, lo=0.8, hi=1.28, delta=2.0, eh=0.28, beta=0.04, tau_pos=1.0, tau_neg=1.05,
        CAP=cap, MAXF=float(torch.finfo(acc).max), ACC=ACC, BLOCK_V=block, **flags, **reward_kw)


def _divergence_args(flags_index, dtype, block, V, stride):
    """The divergence kernel's launch: ``dtype`` is the student's, or "student:teacher"."""
    import torch
    import triton.language as tl
    from grpo_kernels.backends.triton import divergence_kernel as dk

    student, teacher = (dtype.split(":") * 2)[:2]
    zs, zt = torch.empty(4 * stride, dtype=getattr(torch, student)), torch.empty(4 * stride, dtype=getattr(torch, teacher))
    acc = torch.float64 if student == "float64" else torch.float32
    flags = dict(DIVERGENCE_FLAGS[flags_index])
    coef_stride = flags.pop("coef")
    vec = lambda: torch.empty(4, dtype=acc)  # noqa: E731
    return dk.divergence_kernel, (zs, stride, zt, stride, zs, stride, vec(), coef_stride, vec(), vec(), V), dict(
        ks_in=1.0 / 30.0, ks_out=30.0 / 0.7, kt_in=1.0 / 20.0, kt_out=20.0 / 0.7, grad_scale=1.0 / 0.7, beta=0.5,
        lb1=-0.69, lb=-0.69, ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_V=block, **flags)


def compile_one(job):
    """Compile one variant for sm_90; returns its JSON record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kind, flags_index, dtype, (block, warps, stages), spec = job
    rec = dict(kernel=kind, variant=flags_index, dtype=dtype, block=block, num_warps=warps, num_stages=stages,
               spec=spec)
    start = time.perf_counter()
    try:
        fn, args, kwargs = _launch_args(kind, flags_index, dtype, block, spec)
        launch = dict(num_warps=warps, num_stages=stages)
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs, **launch)
        options, signature, constexprs, attrs = fn._pack_args(backend, launch, bound, specialization, options)
        # the int arguments Triton turned into the constant 1
        rec["ones"] = [p.name for p, s in zip(fn.params, specialization) if not p.is_constexpr and s[0] == "constexpr"]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        text = log.getvalue()
        spill = _SPILL.search(text)
        regs = _REGS.search(text)
        if spill is None or regs is None:
            raise RuntimeError(f"no ptxas resource report in: {text[-500:]!r}")
        rec.update(stack=int(spill.group(1)), spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
                   registers=int(regs.group(1)), shared=compiled.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, with its variant
        rec["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--list", action="store_true", help="print the variants, compile nothing")
    parser.add_argument("--kernels", default=None,
                        help="comma-separated kernels to compile (default: all): " + ",".join(KERNELS))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_compile_matrix: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = variants()
    if args.kernels:
        wanted = set(args.kernels.split(","))
        jobs = [job for job in jobs if job[0] in wanted]
    if args.list:
        for job in jobs:
            print(json.dumps(job))
        print(json.dumps(dict(summary=True, variants=len(jobs))))
        return 0
    start = time.perf_counter()
    failed = spilled = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for rec in pool.map(compile_one, jobs, chunksize=4):
            failed += "error" in rec
            spilled += rec.get("spill_stores", 0) + rec.get("spill_loads", 0) > 0
            print(json.dumps(rec), flush=True)
    print(json.dumps(dict(summary=True, variants=len(jobs), failed=failed, spilled=spilled,
                          seconds=round(time.perf_counter() - start, 1))))
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
