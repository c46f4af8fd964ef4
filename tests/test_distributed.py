"""torch.distributed support: vocab-parallel TP, DDP and FSDP2 against the single-process oracle.

One spawn of 2 CPU processes (gloo, a free port on 127.0.0.1) runs every scenario; each rank
writes its findings to a JSON file and the tests below read them, one test per scenario.
Everything is float64 and compared with ``grpo_kernels.reference.reference_grpo_loss`` (or the
reference log-probs) on the whole batch in one process: loss and gradients to 1e-10.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import sys
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import grpo_kernels as gk
from grpo_kernels.reference import reference_distill_loss
from support import make_batch, rel_err

WORLD = 2
TOL = 1e-10
TIMEOUT_S = 150
V, H = 37, 16
SPLIT = [(0, 19), (19, 37)]  # uneven: 19 + 18 rows of the lm_head

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)


# ----------------------------------------------------------------------------- scenarios


def _oracle(batch, kw, bias=True):
    """Reference loss and (grad_hidden, grad_weight, grad_bias) on the whole batch, one process."""
    from grpo_kernels.reference import reference_grpo_loss

    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    b = batch["bias"].clone().requires_grad_() if bias else None
    kw = dict(kw)
    ratio = kw.pop("importance_sampling_ratio", None)
    loss = reference_grpo_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], batch["old_logps"],
                               batch["ref_logps"], bias=b, importance_sampling_ratio=ratio, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


VP_CASES = {
    "dapo_kl": dict(loss_type="dapo", beta=0.04),
    "grpo_sequence": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.02),
    "bnpo_entropy_mask_softcap_temperature": dict(loss_type="bnpo", top_entropy_quantile=0.5, temperature=0.7,
                                                  logit_softcap=3.0),
    "cispo": dict(loss_type="cispo", epsilon_high=1.3),
    "sapo_is_ratio": dict(loss_type="sapo", importance_sampling_ratio="ratio"),
    "dr_grpo_delta": dict(loss_type="dr_grpo", max_completion_length=8, delta=1.4),
    "luspo_sequence": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "dapo_on_policy_bias_corrected_kl": dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True,
                                             old_logps=None),
    "dapo_num_items_tensor": dict(loss_type="dapo", num_items_in_batch="tensor"),
}


VP_BACKENDS = ("torch", "cpp")  # triton runs on CPU only through its (slow) interpreter


def _backend_missing(name):
    from grpo_kernels.backends import get_backend

    try:
        if name == "cpp":
            from grpo_kernels.backends import cpp

            if not cpp.prebuilt_available():  # never JIT-build the extension inside a distributed worker
                return "the cpp extension is not built"
        get_backend(name, torch.device("cpu"), torch.float64)
    except Exception as exc:  # noqa: BLE001 - any failure to load is a reason to skip
        return f"{type(exc).__name__}: {exc}"
    return None


def _vp_loss_case(rank, name, backend):
    missing = _backend_missing(backend)
    if missing:
        return {"__skip__": missing}
    kw = dict(VP_CASES[name], backend=backend)
    batch = make_batch(V=V, H=H, seed=3)
    if kw.get("importance_sampling_ratio") == "ratio":
        g = torch.Generator().manual_seed(9)
        kw["importance_sampling_ratio"] = 0.5 + torch.rand(3, 5, generator=g, dtype=torch.float64)
    if "old_logps" in kw:
        batch["old_logps"] = kw.pop("old_logps")
    if kw.get("num_items_in_batch") == "tensor":  # e.g. from global_num_items: read once on the host
        kw["num_items_in_batch"] = 17.0
    ref = _oracle(batch, kw)
    if name == "dapo_num_items_tensor":
        kw["num_items_in_batch"] = torch.tensor(17.0, dtype=torch.float64)
    lo, hi = SPLIT[rank]
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"][lo:hi].clone().requires_grad_()
    b = batch["bias"][lo:hi].clone().requires_grad_()
    loss = gk.grpo_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], batch["old_logps"],
                        batch["ref_logps"], bias=b, chunk_size=4, process_group=dist.group.WORLD, vocab_start=lo,
                        **kw)
    loss.backward()
    return {"loss": rel_err(loss, ref[0]), "grad_hidden": rel_err(h.grad, ref[1]),
            "grad_weight_shard": rel_err(w.grad, ref[2][lo:hi]), "grad_bias_shard": rel_err(b.grad, ref[3][lo:hi])}


def _vp_metrics_and_no_grad(rank):
    """return_metrics matches single-device grpo_loss; a no-grad call gives the same loss; the
    slices may sit in any rank order (rank 0 holds the upper slice here); default chunking;
    padding holds junk (-100 ids, inf logps) that must not reach the loss or the metrics."""
    batch = make_batch(V=V, H=H, seed=4)
    pad = ~batch["mask"]
    batch["targets"] = batch["targets"].masked_fill(pad, -100)
    batch["old_logps"] = batch["old_logps"].masked_fill(pad, float("inf"))
    batch["ref_logps"] = batch["ref_logps"].masked_fill(pad, float("-inf"))
    kw = dict(loss_type="grpo", beta=0.05)
    lo, hi = SPLIT[1 - rank]
    args = (batch["targets"], batch["advantages"], batch["mask"], batch["old_logps"], batch["ref_logps"])
    vp = dict(process_group=dist.group.WORLD, vocab_start=lo)
    loss, m = gk.grpo_loss(batch["hidden"], batch["weight"][lo:hi], *args, bias=batch["bias"][lo:hi],
                           return_metrics=True, **vp, **kw)
    ref_loss, ref_m = gk.grpo_loss(batch["hidden"], batch["weight"], *args, bias=batch["bias"], return_metrics=True,
                                   backend="torch", **kw)
    with torch.no_grad():
        loss_ng = gk.grpo_loss(batch["hidden"], batch["weight"][lo:hi], *args, bias=batch["bias"][lo:hi], **vp,
                               **kw)
    out = {"loss": rel_err(loss, ref_loss), "loss_no_grad": rel_err(loss_ng, ref_loss)}
    for f in ("logps", "entropy", "kl_mean", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region",
              "entropy_mean"):
        out[f] = rel_err(getattr(m, f), getattr(ref_m, f))
    return out


def _vp_token_logprobs(rank):
    """Global logp and entropy, and their gradients (through both) on a vocab-sharded head."""
    from grpo_kernels.reference import reference_token_logprobs

    batch = make_batch(V=V, H=H, seed=5)
    g = torch.Generator().manual_seed(11)
    c1, c2 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    kw = dict(temperature=0.8, logit_softcap=4.0)
    H_ = batch["hidden"].clone().requires_grad_()
    W_ = batch["weight"].clone().requires_grad_()
    B_ = batch["bias"].clone().requires_grad_()
    rl, re = reference_token_logprobs(H_, W_, batch["targets"], B_, **kw)
    ((rl * c1).sum() + (re * c2).sum()).backward()
    lo, hi = SPLIT[rank]
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"][lo:hi].clone().requires_grad_()
    b = batch["bias"][lo:hi].clone().requires_grad_()
    logp, ent = gk.token_logprobs(h, w, batch["targets"], bias=b, return_entropy=True, chunk_size=4,
                                  process_group=dist.group.WORLD, vocab_start=lo, **kw)
    ((logp * c1).sum() + (ent * c2).sum()).backward()
    with torch.no_grad():  # the rank-order default for vocab_start
        logp_only = gk.token_logprobs(batch["hidden"], batch["weight"][lo:hi], batch["targets"],
                                      bias=batch["bias"][lo:hi], process_group=dist.group.WORLD, **kw)
    return {"logp": rel_err(logp, rl), "entropy": rel_err(ent, re), "logp_vocab_start_none": rel_err(logp_only, rl),
            "grad_hidden": rel_err(h.grad, H_.grad), "grad_weight_shard": rel_err(w.grad, W_.grad[lo:hi]),
            "grad_bias_shard": rel_err(b.grad, B_.grad[lo:hi])}


def _vp_dtensor(rank):
    """torch-native TP: lm_head sharded by ColwiseParallel (a Shard(0) DTensor, 19 + 18 rows),
    passed as is with vocab_start=None; the hidden states once plain, once a Replicate DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    batch = make_batch(V=V, H=H, seed=6, bias=False)
    kw = dict(loss_type="dapo", beta=0.04)
    ref = _oracle(batch, kw, bias=False)
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for how in ("plain_hidden", "dtensor_hidden"):
        head = nn.Linear(H, V, bias=False, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(batch["weight"])
        parallelize_module(head, mesh, ColwiseParallel())
        assert isinstance(head.weight, DTensor) and head.weight.to_local().shape[0] == SPLIT[rank][1] - SPLIT[rank][0]
        h = batch["hidden"].clone().requires_grad_()
        hid = DTensor.from_local(h, mesh, [Replicate()]) if how == "dtensor_hidden" else h
        loss = gk.grpo_loss(hid, head.weight, batch["targets"], batch["advantages"], batch["mask"],
                            batch["old_logps"], batch["ref_logps"], process_group=dist.group.WORLD, **kw)
        loss.backward()
        out[f"{how}/loss"] = rel_err(loss, ref[0])
        out[f"{how}/grad_hidden"] = rel_err(h.grad, ref[1])
        out[f"{how}/grad_weight"] = rel_err(head.weight.grad.full_tensor(), ref[2])
    return out


def _vp_bad_slices(rank):
    """Overlapping slices raise the same ValueError on every rank (no rank left waiting)."""
    batch = make_batch(V=V, H=H, seed=7)
    try:
        gk.grpo_loss(batch["hidden"], batch["weight"][:19], batch["targets"], batch["advantages"], batch["mask"],
                     process_group=dist.group.WORLD, vocab_start=0)
    except ValueError as exc:
        return {"raised": 0.0 if "do not tile" in str(exc) else 1.0}
    return {"raised": 1.0}


class Tiny(nn.Module):
    """Embedding -> Linear -> tanh gives the hidden states; lm_head is only used by the loss."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.proj = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def forward(self, ids):
        return torch.tanh(self.proj(self.embed(ids)))


class TinyWithLoss(nn.Module):
    """The recommended FSDP2 pattern: the loss inside the module's forward."""

    def __init__(self, tiny, **options):
        super().__init__()
        self.tiny = tiny
        self.options = options

    def forward(self, ids, targets, advantages, mask, old_logps, num_items_in_batch):
        import grpo_kernels as gk
        from grpo_kernels.distributed import lm_head_weight

        return gk.grpo_loss(self.tiny(ids), lm_head_weight(self.tiny.lm_head.weight), targets, advantages, mask,
                            old_logps, num_items_in_batch=num_items_in_batch, **self.options)


def _dp_data(B=4, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[1, 3:] = False
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = -3.6 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return ids, targets, mask, adv, old


def _dp_oracle(base, data, kw):
    from grpo_kernels.reference import reference_grpo_loss

    ids, targets, mask, adv, old = data
    model = copy.deepcopy(base)
    loss = reference_grpo_loss(model(ids), model.lm_head.weight, targets, adv, mask, old, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _dp_compare(model_params, loss, oracle, world_mean=True):
    out = {}
    total = loss.detach().clone()
    dist.all_reduce(total)
    out["loss"] = rel_err(total / WORLD if world_mean else total, oracle[0])
    for name, p in model_params:
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[f"grad/{name}"] = rel_err(grad, oracle[1][name.replace("module.", "").replace("tiny.", "")])
    return out


DP_CASES = {
    # dapo/cispo: the global token count, so uneven shares (3 + 1 rows) still give the oracle
    "dapo_uneven_shares": (dict(loss_type="dapo"), [slice(0, 3), slice(3, 4)]),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.25), [slice(0, 2), slice(2, 4)]),
    # per-row and per-rank normalizers: equal shares, gradients averaged over ranks
    "grpo_sequence": (dict(loss_type="grpo", importance_sampling_level="sequence"), [slice(0, 2), slice(2, 4)]),
    # TRL's entropy threshold is over every rank's tokens: global_high_entropy_mask as the policy factor
    "dapo_global_top_entropy": (dict(loss_type="dapo", top_entropy_quantile=0.4), [slice(0, 3), slice(3, 4)]),
}


def _seeded_tiny():
    torch.manual_seed(0)
    return Tiny().double()


def _ddp_case(rank, name):
    import grpo_kernels as gk
    from torch.nn.parallel import DistributedDataParallel as DDP

    from grpo_kernels.distributed import global_high_entropy_mask, global_num_items

    kw, shares = DP_CASES[name]
    base = _seeded_tiny()
    data = _dp_data()
    oracle = _dp_oracle(base, data, kw)
    ids, targets, mask, adv, old = (x[shares[rank]] for x in data)
    model = DDP(copy.deepcopy(base))
    n = global_num_items(mask, divide_by_world_size=True)
    hidden = model(ids)
    kw, ratio = dict(kw), None
    if "top_entropy_quantile" in kw:
        with torch.no_grad():
            _, ent = gk.token_logprobs(hidden, model.module.lm_head.weight, targets, return_entropy=True)
        ratio = global_high_entropy_mask(ent, mask, kw.pop("top_entropy_quantile")).to(hidden.dtype)
    loss = gk.grpo_loss(hidden, model.module.lm_head.weight, targets, adv, mask, old, num_items_in_batch=n,
                        importance_sampling_ratio=ratio, backend="torch", **kw)
    loss.backward()
    return _dp_compare(model.named_parameters(), loss, oracle)


FSDP_CASES = ("root_only", "root_only_tied_embeddings", "nested_lm_head_dtensor", "loss_in_forward",
              "loss_in_forward_nested")


def _fsdp_case(rank, name):
    import grpo_kernels as gk
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from grpo_kernels.distributed import global_num_items, lm_head_weight

    kw = dict(loss_type="dapo", beta=0.0)
    base = _seeded_tiny()
    if name == "root_only_tied_embeddings":
        base.lm_head.weight = base.embed.weight
    data = _dp_data()
    oracle = _dp_oracle(base, data, kw)
    share = slice(rank * 2, rank * 2 + 2)
    ids, targets, mask, adv, old = (x[share] for x in data)
    n = global_num_items(mask, divide_by_world_size=True)
    mesh = init_device_mesh("cpu", (WORLD,))
    tiny = copy.deepcopy(base)
    nested = name in ("nested_lm_head_dtensor", "loss_in_forward_nested")
    if nested:  # the lm_head its own FSDP unit: sharded (a DTensor) whenever its own forward is not running
        fully_shard(tiny.proj, mesh=mesh)
        fully_shard(tiny.lm_head, mesh=mesh)
    out = {}
    if name.startswith("loss_in_forward"):
        model = TinyWithLoss(tiny, backend="torch", **kw)
        fully_shard(model, mesh=mesh)
        loss = model(ids, targets, adv, mask, old, n)
    else:
        model = tiny
        fully_shard(model, mesh=mesh)
        hidden = model(ids)
        weight = model.lm_head.weight
        # the root FSDP unit keeps its parameters unsharded after forward; a nested one reshards
        out["weight_is_dtensor_as_expected"] = 0.0 if isinstance(weight, DTensor) == nested else 1.0
        loss = gk.grpo_loss(hidden, lm_head_weight(weight), targets, adv, mask, old, num_items_in_batch=n,
                            backend="torch", **kw)
    loss.backward()
    out.update(_dp_compare(model.named_parameters(), loss, oracle))
    return out


def _global_num_items(rank):
    from grpo_kernels.distributed import global_num_items

    mask = torch.ones(2, 3 + rank, dtype=torch.bool)
    mask[0, 0] = False
    total = global_num_items(mask)
    avg = global_num_items(mask.float(), divide_by_world_size=True)
    want = 5.0 + 7.0
    return {"sum": abs(total.item() - want), "avg": abs(avg.item() - want / WORLD),
            "dtype": 0.0 if total.dtype == torch.float64 else 1.0}


def _vp_distill_dtensor_refused(rank):
    """A DTensor head (ColwiseParallel's Shard(0)) is refused with a TypeError naming it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from test_distill import make

    d = make(seed=2, V=V, H=H, H_t=12)
    w = distribute_tensor(d["weight"], init_device_mesh("cpu", (WORLD,)), [Shard(0)])
    try:
        gk.distill_loss(d["hidden"], w, d["teacher_hidden"], d["teacher_weight"], d["mask"],
                        process_group=dist.group.WORLD)
    except TypeError as exc:
        return {"refused": 0.0 if str(exc).startswith("weight is a DTensor: distill_loss takes local") else 1.0}
    return {"refused": 1.0}


#: the exact KL (kl_estimator="full") under vocab parallelism, one case per loss path: (options, path)
VP_EXACT_KL = {
    "dapo_one_sweep": dict(loss_type="dapo", beta=0.04),
    "grpo_softcap_temperature": dict(loss_type="grpo", beta=0.05, logit_softcap=3.0, temperature=0.7),
    "bnpo_entropy_quantile": dict(loss_type="bnpo", beta=0.1, top_entropy_quantile=0.5),
    "grpo_sequence_cut": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.02, chunk_size=None),
    "grpo_sequence_two_sweeps": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.02),
    "verl_vanilla_token_mean": dict(policy_loss="vanilla", loss_agg_mode="token-mean", beta=0.03),
    "dapo_no_grad": dict(loss_type="dapo", beta=0.04, no_grad=True),
}


def _vp_exact_kl(rank, name, backend):
    """grpo_loss(kl_estimator="full") (``auto``: the C++ GRPO row pass where built, beside the torch
    divergence pass) with both heads (policy and reference, and their biases) split
    alike over the vocabulary (uneven slices, rank 1 holding the lower slice, chunks of 4 rows,
    ref_hidden replicated, of another width) against the float64 oracle on the whole heads in one
    process: loss, kl_mean and the per-token KL, grad_hidden whole on every rank, each rank's
    grad_weight / grad_bias rows."""
    from test_exact_kl import make_ref

    from grpo_kernels.reference import reference_grpo_loss

    kw = dict(dict(chunk_size=4, max_completion_length=7), **VP_EXACT_KL[name], kl_estimator="full")
    no_grad = kw.pop("no_grad", False)
    batch = make_batch(V=V, H=H, seed=31)
    ref = make_ref(seed=31, vocab=V)
    leaves = [batch[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    want, wm = reference_grpo_loss(
        *leaves[:2], batch["targets"], batch["advantages"], batch["mask"], batch["old_logps"], batch["ref_logps"],
        bias=leaves[2], return_metrics=True, **ref, **kw)
    want.backward()
    lo, hi = SPLIT[1 - rank]
    h = batch["hidden"].clone().requires_grad_()
    w, b = (batch[k][lo:hi].clone().requires_grad_() for k in ("weight", "bias"))
    with torch.set_grad_enabled(not no_grad):
        loss, m = gk.grpo_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], batch["old_logps"],
                               batch["ref_logps"], bias=b, return_metrics=True, process_group=dist.group.WORLD,
                               vocab_start=lo, backend=backend, ref_hidden=ref["ref_hidden"],
                               ref_weight=ref["ref_weight"][lo:hi], ref_bias=ref["ref_bias"][lo:hi], **kw)
    out = {"loss": rel_err(loss, want), "kl_mean": rel_err(m.kl_mean, wm["kl_mean"]),
           "kl": rel_err(m.kl, wm["kl"] * batch["mask"]), "logps": rel_err(m.logps, wm["logps"] * batch["mask"])}
    if not no_grad:
        loss.backward()
        out.update(grad_hidden=rel_err(h.grad, leaves[0].grad), grad_weight_shard=rel_err(w.grad, leaves[1].grad[lo:hi]),
                   grad_bias_shard=rel_err(b.grad, leaves[2].grad[lo:hi]))
    return out


def _vp_exact_kl_named_backend_refused(rank):
    """A named backend whose divergence pass takes no vocab= raises BackendUnavailable on every rank,
    before any collective (the plan picks the divergence backend before the ranks exchange)."""
    from grpo_kernels.backends import BackendUnavailable
    from test_exact_kl import make_ref

    missing = _backend_missing("cpp")
    if missing:
        return {"__skip__": missing}
    batch = make_batch(V=V, H=H, seed=32)
    ref = make_ref(seed=32, vocab=V)
    lo, hi = SPLIT[rank]
    try:
        gk.grpo_loss(batch["hidden"], batch["weight"][lo:hi], batch["targets"], batch["advantages"], batch["mask"],
                     batch["old_logps"], bias=batch["bias"][lo:hi], process_group=dist.group.WORLD, vocab_start=lo,
                     backend="cpp", beta=0.04, kl_estimator="full", ref_hidden=ref["ref_hidden"],
                     ref_weight=ref["ref_weight"][lo:hi], ref_bias=ref["ref_bias"][lo:hi])
    except BackendUnavailable as exc:
        return {"refused": 0.0 if "has no vocab-parallel divergence row pass" in str(exc) else 1.0}
    return {"refused": 1.0}


SCENARIOS = {
    **{f"vocab_parallel_loss/{k}/{b}": (lambda r, k=k, b=b: _vp_loss_case(r, k, b))
       for b in VP_BACKENDS for k in VP_CASES},
    "vocab_parallel_loss/metrics_no_grad_rank_order": _vp_metrics_and_no_grad,
    "vocab_parallel_token_logprobs": _vp_token_logprobs,
    "vocab_parallel_dtensor_colwise": _vp_dtensor,
    "vocab_parallel_bad_slices": _vp_bad_slices,
    **{f"ddp/{k}": (lambda r, k=k: _ddp_case(r, k)) for k in DP_CASES},
    **{f"fsdp2/{k}": (lambda r, k=k: _fsdp_case(r, k)) for k in FSDP_CASES},
    "global_num_items": _global_num_items,
    **{f"vocab_parallel_distill/beta_{b}": (lambda r, b=b: _vp_distill(r, b)) for b in (0.0, 0.5, 1.0)},
    "vocab_parallel_distill/dtensor_refused": _vp_distill_dtensor_refused,
    **{f"vocab_parallel_exact_kl/{k}/{b}": (lambda r, k=k, b=b: _vp_exact_kl(r, k, b))
       for b in ("torch", "auto") for k in VP_EXACT_KL},
    "vocab_parallel_exact_kl/named_backend_refused": _vp_exact_kl_named_backend_refused,
}


def _vp_distill(rank, beta):
    """distill_loss with both heads split alike over the vocabulary (uneven slices, chunks of 4
    rows, a padded mask) against the oracle on the whole heads in one process: loss, metrics,
    grad_hidden whole on every rank, each rank's grad_weight / grad_bias rows."""
    from test_distill import make

    d = make(seed=21, B=3, T=5, H=H, H_t=12, V=V)
    kw = dict(beta=beta, temperature=0.8, logit_softcap=4.0, teacher_logit_scale=1.3)
    leaves = [d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    ref, rm = reference_distill_loss(*leaves[:2], d["teacher_hidden"], d["teacher_weight"], d["mask"],
                                        bias=leaves[2], teacher_bias=d["teacher_bias"], return_metrics=True, **kw)
    ref.backward()
    lo, hi = SPLIT[rank]
    h = d["hidden"].clone().requires_grad_()
    w, b = (d[k][lo:hi].clone().requires_grad_() for k in ("weight", "bias"))
    loss, m = gk.distill_loss(h, w, d["teacher_hidden"], d["teacher_weight"][lo:hi], d["mask"], bias=b,
                              teacher_bias=d["teacher_bias"][lo:hi], chunk_size=4, process_group=dist.group.WORLD,
                              vocab_start=lo, return_metrics=True, **kw)
    loss.backward()
    return {"loss": rel_err(loss, ref), "divergence": rel_err(m.divergence, rm["divergence"]),
            "entropy": rel_err(m.entropy, rm["entropy"]), "grad_hidden": rel_err(h.grad, leaves[0].grad),
            "grad_weight_shard": rel_err(w.grad, leaves[1].grad[lo:hi]),
            "grad_bias_shard": rel_err(b.grad, leaves[2].grad[lo:hi])}


def _worker(rank, world, port, outdir):
    import datetime

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            t0 = time.perf_counter()
            try:
                results[name] = {"errors": fn(rank), "error": None}
            except Exception:  # noqa: BLE001 - reported by the test of that scenario
                results[name] = {"errors": {}, "error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), outdir), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        failure = None
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    failure = f"distributed workers still running after {TIMEOUT_S} s"
                    break
        except Exception as exc:  # noqa: BLE001 - a crashed worker: report what the ranks wrote
            failure = f"a worker failed: {exc}"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        per_rank = []
        for r in range(WORLD):
            path = os.path.join(outdir, f"rank{r}.json")
            per_rank.append(json.load(open(path)) if os.path.exists(path) else None)
    if failure is not None:
        if any(x is None for x in per_rank):
            pytest.fail(failure)
        warnings.warn(f"after writing their results: {failure}")  # e.g. a crash in process-group teardown
    return per_rank


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_distributed(results, scenario):
    for rank, res in enumerate(results):
        assert scenario in res, f"rank {rank} never ran {scenario}"
        entry = res[scenario]
        assert entry["error"] is None, f"rank {rank}:\n{entry['error']}"
        if "__skip__" in entry["errors"]:
            pytest.skip(entry["errors"]["__skip__"])
        bad = {k: v for k, v in entry["errors"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: errors above {TOL}: {bad}"
        assert entry["errors"], "the scenario compared nothing"


if __name__ == "__main__":  # run one scenario by hand: python tests/test_distributed.py [name]
    sys.exit(pytest.main([__file__, "-q"] + (["-k", sys.argv[1]] if len(sys.argv) > 1 else [])))
