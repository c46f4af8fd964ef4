"""The tests' one support module: the backends every contract test runs over, fresh random
inputs, the float64 oracle's comparisons and tolerances by dtype.

Imported as ``support`` (pytest puts tests/ first on sys.path): nothing here, or in the tests,
depends on a top-level package named ``tests`` being ours.
"""
from __future__ import annotations

import functools
import os
import zlib

import pytest
import torch

from grpo_kernels.reference import reference_grpo_loss, reference_token_logprobs

# ----------------------------------------------------------------------------- the backends

#: the row backends every contract and parity test runs over, each skipped with its reason where
#: it cannot run: a new backend joins the whole suite by adding its name here
BACKENDS = ["torch", "triton", "cpp"]


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """None when backend ``name`` runs on (device, dtype) here, else why not."""
    from grpo_kernels.backends import get_backend

    try:
        get_backend(name, torch.device(device), dtype)
        if name in ("cpp", "cuda"):  # the extension is JIT-built on first use: build it now
            from grpo_kernels.backends import cpp

            cpp.load_extension()
    except Exception as exc:  # noqa: BLE001 - any failure to load is a reason to skip
        return f"{name}: {type(exc).__name__}: {exc}"
    return None


def backend_params(names=BACKENDS):
    return [pytest.param(n, id=n) for n in names]


#: the setting that turns "cannot run here" into a failure for the backends it lists
REQUIRE_ENV = "GRPO_KERNELS_REQUIRE_BACKENDS"


def required_backends() -> frozenset:
    """The backends ``GRPO_KERNELS_REQUIRE_BACKENDS`` lists (comma-separated, e.g. ``cpp,triton``):
    on a machine where they must run (the GPU check sets it), a test that cannot run one fails
    instead of skipping, so a failed JIT build or a missing Triton is never a green run. ``cuda``
    is the cpp backend's other name."""
    raw = os.environ.get(REQUIRE_ENV, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    known = set(BACKENDS) | {"cuda"}
    unknown = names - known
    if unknown:
        raise ValueError(f"{REQUIRE_ENV}={raw!r}: unknown backend(s) {sorted(unknown)}; known: {sorted(known)}")
    return frozenset("cpp" if n == "cuda" else n for n in names)


def skip_or_fail(name: str, reason: str) -> None:
    """Skip with ``reason``, or fail when backend ``name`` is required (``required_backends``)."""
    if ("cpp" if name == "cuda" else name) in required_backends():
        pytest.fail(f"backend {name!r} is required here ({REQUIRE_ENV}) but cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def require(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Skip (or fail, when ``name`` is required: ``required_backends``) unless backend ``name``
    runs on (device, dtype) here."""
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        skip_or_fail(name, reason)


def device_for_tests() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- inputs and comparisons

# (relative tolerance for the loss, for the gradients) by input dtype, against the fp64 oracle
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (2e-2, 3e-2),
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "non-finite values"
    denom = ref.norm().item()
    return (x - ref).norm().item() / max(denom, 1e-30)


def make_batch(B=3, T=5, H=16, V=37, dtype=torch.float64, device="cpu", seed=0, bias=True,
               full_row_masked=True, single_token_row=True, token_advantages=False, off_policy=0.2):
    """Random GRPO inputs whose old/ref logps sit near the current ones, so some ratios clip."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.7
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0], targets[-1, -1] = 0, V - 1
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    if full_row_masked and B > 1:
        mask[1] = False
    if single_token_row and B > 2:
        mask[2] = False
        mask[2, 0] = True
    adv_shape = (B, T) if token_advantages else (B,)
    advantages = torch.randn(adv_shape, generator=g, dtype=torch.float64)
    # round inputs to the tested dtype first, so the oracle sees exactly what the kernel sees
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    b = None if b is None else b.to(dtype)
    with torch.no_grad():
        cur, _ = reference_token_logprobs(hidden.double(), weight.double(), targets,
                                          None if b is None else b.double())
    old = cur + off_policy * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = cur + off_policy * torch.randn(B, T, generator=g, dtype=torch.float64)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(hidden=to(hidden), weight=to(weight), bias=to(b), targets=to(targets), mask=to(mask),
                advantages=to(advantages), old_logps=to(old), ref_logps=to(ref))


def run_loss(loss_fn, batch, **kwargs):
    """Loss and (grad_hidden, grad_weight, grad_bias) of ``loss_fn`` on leaf copies of the batch."""
    leaves = {k: batch[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight")}
    bias = None if batch["bias"] is None else batch["bias"].detach().clone().requires_grad_(True)
    out = loss_fn(leaves["hidden"], leaves["weight"], batch["targets"], batch["advantages"], batch["mask"],
                  batch["old_logps"], batch["ref_logps"], bias=bias, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    grads = (leaves["hidden"].grad, leaves["weight"].grad, None if bias is None else bias.grad)
    return out, grads


def as_double(batch):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in batch.items()}


def stable_seed(*parts) -> int:
    """A seed from test parameters that, unlike hash(), does not change with PYTHONHASHSEED."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def well_conditioned_batch(dtype, seed, opts, tries=64, **batch_kwargs):
    """make_batch at the first seed from ``seed`` whose oracle result survives input rounding.

    A token whose ratio sits within a rounding error of a clip boundary (measured: log-ratio
    margins of 3e-4 in 3 of 200 bf16 seeds) flips between clipped and unclipped when the kernel
    rounds its logits, and its whole gradient appears or vanishes: a 30-60% difference that no
    tolerance should absorb and no kernel can avoid. The oracle itself is the judge: a batch is
    kept when scaling hidden by (1 +- ulp/2 * noise), the size of the kernel's own rounding, moves
    the float64 loss and gradients by less than half the tolerance (a smooth move is ~1 ulp, a
    flip tens of percent). float64 batches are taken as they come.
    """
    if dtype == torch.float64:
        return make_batch(dtype=dtype, seed=seed, **batch_kwargs)
    tol_loss, tol_grad = TOLERANCES[dtype]
    half_ulp = torch.finfo(dtype).eps / 2
    for s in range(seed, seed + tries):
        batch = make_batch(dtype=dtype, seed=s, **batch_kwargs)
        base = as_double(batch)
        out, grads = run_loss(reference_grpo_loss, base, **opts)
        noise = torch.randn(base["hidden"].shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        stable = True
        for sign in (1.0, -1.0):
            bumped = dict(base, hidden=base["hidden"] * (1 + sign * half_ulp * noise.to(base["hidden"].device)))
            out2, grads2 = run_loss(reference_grpo_loss, bumped, **opts)
            stable &= rel_err(out2, out) < tol_loss / 2
            stable &= all(rel_err(a, b) < tol_grad / 2 for a, b in zip(grads2, grads) if b is not None)
        if stable:
            return batch
    raise AssertionError(f"no well-conditioned batch in seeds {seed}..{seed + tries}")


def check_against_oracle(backend, batch, dtype, device=None, **opts):
    """grpo_loss with ``backend`` against the float64 oracle: loss and every gradient within
    TOLERANCES[dtype], gradients in the input dtype. Skips when the backend cannot run."""
    from grpo_kernels import grpo_loss

    require(backend, device or device_for_tests(), dtype)
    out, grads = run_loss(grpo_loss, batch, backend=backend, **opts)
    ref_out, ref_grads = run_loss(reference_grpo_loss, as_double(batch), **opts)
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert rel_err(out, ref_out) < tol_loss, (out.item(), ref_out.item())
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        if rg is None:
            assert g is None
            continue
        assert g.dtype == dtype, name
        err = rel_err(g, rg)
        assert err < tol_grad, f"grad_{name}: relative error {err:.3e}"


# ----------------------------------------------------------------------------- TRL in float64


def trl_divergence_in_float64(monkeypatch) -> None:
    """TRL 1.16's chunked divergence (``trl.kernels.chunked_divergence``, which ``DistillationTrainer``'s
    ``_chunked_divergence_loss`` calls) with its float32 buffers, projections and accumulators in
    float64, for float64 parity to 1e-10. Its backward still rounds dLoss/dD to float32
    (``.float()``): take powers of 2 for the normalizer (n_valid or num_items_in_batch)."""
    import trl.kernels.chunked_divergence as cd

    class Float64Torch:
        float32 = torch.float64

        def __getattr__(self, name):
            return getattr(torch, name)

    def project(tile, hidden_chunk, weight, bias, start, end, dtype):
        torch.mm(hidden_chunk.double(), weight[start:end].double().t(), out=tile)
        if bias is not None:
            tile.add_(bias[start:end].double())

    monkeypatch.setattr(cd, "torch", Float64Torch())
    monkeypatch.setattr(cd, "_project", project)
    monkeypatch.setattr(cd, "_addmm_fp32", lambda acc, a, b: acc.addmm_(a.double(), b.double()))
