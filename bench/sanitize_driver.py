"""Every GPU kernel of the cpp (CUDA) and Triton backends, once each at small shapes: the program
that ``.ci/gpu_check.sh sanitize`` runs under ``compute-sanitizer --tool memcheck`` and
``--tool racecheck``.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 GRPO_KERNELS_TRITON_AUTOTUNE=0 \\
        compute-sanitizer --tool memcheck python bench/sanitize_driver.py [--backends cpp triton]

Per backend and logits dtype (bf16, fp16, fp32, fp64) and vocabulary (V = 301: rows not 16-byte
aligned, a partial tile; V = 4100: several tiles), through the public API on CUDA tensors:

- ``token_logprobs`` with entropy, its backward (row_stats, row_grad_ with dL/dentropy);
- ``grpo_loss`` token level, KL, delta, off-policy (the fused row kernel), and from rewards
  (the fused kernel's reward epilogue), with ``backward``;
- ``grpo_loss`` sequence level (row_stats, then row_grad_);
- ``group_advantages`` with the backend's group kernels ("group" and "batch" scaling).

Several chunks per call (``chunk_size`` 8 rows of 40). Without the caching allocator
(``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) every tensor is its own allocation, so memcheck sees an
access past a tensor's end; autotuning off (benchmark trials would run each kernel dozens of times
under the sanitizer). Each result is compared with the float64 reference, so a run that computes
nothing cannot pass. Prints one line per case and "SANITIZE DRIVER OK"; exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
#: relative tolerance against the float64 reference, by dtype (loose: this is a memory check)
TOL = {torch.bfloat16: 1e-1, torch.float16: 1e-1, torch.float32: 1e-4, torch.float64: 1e-8}
B, T, H, G = 5, 8, 32, 5
#: where the kernels run: cuda (``--device cpu`` dry-runs this driver without a GPU)
DEVICE = "cuda"


def _inputs(dtype, V, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.7).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    mask[1] = False  # a fully masked row
    logps = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 5.0
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask.to(DEVICE),
                rewards=torch.randn(B, generator=g, dtype=torch.float64).to(DEVICE),
                old=logps.to(DEVICE), ref=(logps + 0.05).to(DEVICE))


def _rel(x, ref) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _loss_and_grad(backend, inp, **kw):
    from grpo_kernels import grpo_loss

    h = inp["hidden"].detach().clone().requires_grad_(True)
    rewards = kw.pop("rewards", None)
    adv = None if rewards is not None else torch.linspace(-1, 1, B, dtype=torch.float64).to(DEVICE)
    loss = grpo_loss(h, inp["weight"], inp["targets"], adv, inp["mask"], inp["old"], inp["ref"], rewards=rewards,
                     backend=backend, chunk_size=None if backend == "reference" else 8, **kw)
    loss.backward()
    return loss, h.grad


def cases(backend, dtype, V, seed):
    """(name, relative error) of each call against the float64 reference."""
    from grpo_kernels import group_advantages, token_logprobs

    inp = _inputs(dtype, V, seed)
    ref_inp = dict(inp, hidden=inp["hidden"].double(), weight=inp["weight"].double())
    out = []
    h = inp["hidden"].detach().clone().requires_grad_(True)
    lp, ent = token_logprobs(h, inp["weight"], inp["targets"], temperature=0.7, logit_softcap=30.0,
                             return_entropy=True, backend=backend, chunk_size=8)
    (lp.sum() + 0.1 * ent.sum()).backward()
    h64 = ref_inp["hidden"].detach().clone().requires_grad_(True)
    lp64, ent64 = token_logprobs(h64, ref_inp["weight"], inp["targets"], temperature=0.7, logit_softcap=30.0,
                                 return_entropy=True, backend="reference")
    (lp64.sum() + 0.1 * ent64.sum()).backward()
    out.append(("token_logprobs+entropy, backward", max(_rel(lp, lp64), _rel(ent, ent64), _rel(h.grad, h64.grad))))
    for name, kw in (
        ("grpo_loss token level, kl, delta", dict(beta=0.04, delta=1.5, temperature=0.9, loss_type="dapo")),
        ("grpo_loss from rewards", dict(rewards=inp["rewards"], num_generations=G, loss_type="grpo",
                                        scale_rewards="batch")),
        ("grpo_loss sequence level", dict(importance_sampling_level="sequence", loss_type="grpo")),
    ):
        loss, grad = _loss_and_grad(backend, inp, **dict(kw))
        loss64, grad64 = _loss_and_grad("reference", ref_inp, **dict(kw))
        out.append((name, max(_rel(loss, loss64), _rel(grad, grad64))))
    rewards = torch.randn(4 * G, dtype=dtype if dtype != torch.bfloat16 else torch.float32).to(DEVICE)
    for scale in ("group", "batch"):
        adv = group_advantages(rewards, G, scale_rewards=scale, backend=backend)
        out.append((f"group_advantages {scale}", _rel(adv, group_advantages(rewards.double().cpu(), G,
                                                                           scale_rewards=scale))))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["cpp", "triton"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--vocab", nargs="+", type=int, default=[301, 4100])
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the driver itself")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("sanitize_driver: needs a CUDA device (or --device cpu for a dry run)")
        return 2
    bad = 0
    for backend in args.backends:
        for dname in args.dtypes:
            for V in args.vocab:
                start = time.perf_counter()
                for name, err in cases(backend, DTYPES[dname], V, seed=V):
                    ok = err < TOL[DTYPES[dname]]
                    bad += not ok
                    print(f"{'ok ' if ok else 'BAD'} {backend:6s} {dname} V={V:5d} {name}: rel err {err:.2e}",
                          flush=True)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                print(f"    ({time.perf_counter() - start:.1f} s)", flush=True)
    print("SANITIZE DRIVER OK" if bad == 0 else f"SANITIZE DRIVER: {bad} mismatch(es)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
