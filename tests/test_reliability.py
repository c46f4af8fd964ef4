"""The autograd and precision patterns of real training loops, on every backend.

Each test is a way training code calls a loss that once went wrong somewhere: under
torch.autocast, with retained graphs and the usual ways of zeroing gradients, twice through
torch.autograd.grad, under gradient checkpointing, into existing .grad, with a frozen or a
tied head. The answer is always the oracle's (or a clear error), never a silently wrong one.
"""
from __future__ import annotations

import pytest
import torch

from support import TOLERANCES, as_double, backend_params, device_for_tests, make_batch, rel_err, require, run_loss
from grpo_kernels import grpo_loss, token_logprobs
from grpo_kernels.reference import reference_grpo_loss, reference_token_logprobs

DEVICE = device_for_tests()  # the autocast tests run on CUDA where there is one (the GPU suite)
AUTOCAST = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _rounded(batch, dtype):
    """The float64 oracle's inputs: the head's operands rounded as autocast rounds them."""
    out = as_double(batch)
    for k in ("hidden", "weight", "bias"):
        if batch[k] is not None:
            out[k] = batch[k].to(dtype).double()
    return out


def _close(out, grads, ref_out, ref_grads, dtype):
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert rel_err(out, ref_out) < tol_loss, (float(out), float(ref_out))
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32, name  # the fp32 leaves get fp32 gradients
        assert rel_err(g, rg) < tol_grad, name


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", AUTOCAST)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_loss_under_autocast(backend, dtype, loss_type):
    """The issue's repro crashed ('Expected out tensor to have dtype c10::BFloat16')."""
    require(backend, DEVICE, dtype)
    batch = make_batch(dtype=torch.float32, seed=21, device=DEVICE)
    batch["old_logps"] = None  # on-policy: no ratio sits at a clip boundary that rounding could flip
    opts = dict(beta=0.04, loss_type=loss_type)
    with torch.autocast(DEVICE, dtype=dtype):
        out, grads = run_loss(grpo_loss, batch, backend=backend, **opts)
    assert out.dtype == torch.float32
    ref_out, ref_grads = run_loss(reference_grpo_loss, _rounded(batch, dtype), **opts)
    _close(out, grads, ref_out, ref_grads, dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", AUTOCAST)
def test_token_logprobs_under_autocast_backward_inside(backend, dtype):
    require(backend, DEVICE, dtype)
    batch = make_batch(dtype=torch.float32, seed=22, device=DEVICE)
    h = batch["hidden"].clone().requires_grad_(True)
    w = batch["weight"].clone().requires_grad_(True)
    with torch.autocast(DEVICE, dtype=dtype):
        logp, ent = token_logprobs(h, w, batch["targets"], return_entropy=True, backend=backend)
        (logp.sum() + 0.5 * ent.sum()).backward()  # the backward inside autocast too
    r = _rounded(batch, dtype)
    h64 = r["hidden"].clone().requires_grad_(True)
    w64 = r["weight"].clone().requires_grad_(True)
    ref_logp, ref_ent = reference_token_logprobs(h64, w64, batch["targets"])
    (ref_logp.sum() + 0.5 * ref_ent.sum()).backward()
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert logp.dtype == torch.float32
    assert rel_err(logp, ref_logp) < tol_loss and rel_err(ent, ref_ent) < tol_loss
    assert h.grad.dtype == torch.float32 and rel_err(h.grad, h64.grad) < tol_grad
    assert rel_err(w.grad, w64.grad) < tol_grad


def test_autocast_leaves_float64_alone():
    """autocast casts fp32/fp16/bf16 operands only (as torch does): fp64 runs in fp64."""
    batch = make_batch(dtype=torch.float64, seed=23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_loss(grpo_loss, batch, backend="torch", beta=0.04)
    ref_out, ref_grads = run_loss(reference_grpo_loss, batch, beta=0.04)
    assert out.dtype == torch.float64 and rel_err(out, ref_out) < 1e-10
    assert all(rel_err(g, rg) < 1e-10 for g, rg in zip(grads, ref_grads))


# ----------------------------------------------------------------------------- gradients handed out


def _leaves(batch, **requires):
    out = {}
    for k in ("hidden", "weight", "bias"):
        t = batch[k]
        out[k] = None if t is None else t.detach().clone().requires_grad_(requires.get(k, True))
    return out


def _loss(batch, backend, leaves=None, **kw):
    leaves = leaves or _leaves(batch)
    loss = grpo_loss(leaves["hidden"], leaves["weight"], batch["targets"], batch["advantages"], batch["mask"],
                     batch["old_logps"], batch["ref_logps"], bias=leaves["bias"], backend=backend, beta=0.04,
                     chunk_size=4, **kw)
    return leaves, loss


def _single_backward_grads(batch, backend, **kw):
    leaves, loss = _loss(batch, backend, **kw)
    loss.backward()
    return {k: None if v is None else v.grad.clone() for k, v in leaves.items()}


ZEROING = {
    "set_to_none": lambda t: setattr(t, "grad", None),
    "grad.zero_": lambda t: t.grad.zero_(),
    "grad.data.zero_": lambda t: t.grad.data.zero_(),
    "optimizer.zero_grad(set_to_none=False)": lambda t: torch.optim.SGD([t], lr=0.1).zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("zeroing", sorted(ZEROING))
def test_retained_backwards_with_every_zeroing_idiom(backend, zeroing):
    """The issue's repro: after backward(retain_graph=True), .grad shared storage with the saved
    gradient, so .grad.data.zero_() made the second backward return zeros, silently."""
    require(backend, "cpu", torch.float64)
    batch = make_batch(seed=31)
    want = _single_backward_grads(batch, backend)
    leaves, loss = _loss(batch, backend)
    for _ in range(3):
        loss.backward(retain_graph=True)
        for k, t in leaves.items():
            if t is not None:
                torch.testing.assert_close(t.grad, want[k], rtol=1e-13, atol=0)
                ZEROING[zeroing](t)


@pytest.mark.parametrize("backend", backend_params())
def test_retained_backwards_accumulate(backend):
    require(backend, "cpu", torch.float64)
    batch = make_batch(seed=32)
    want = _single_backward_grads(batch, backend)
    leaves, loss = _loss(batch, backend)
    for k in range(1, 4):
        loss.backward(retain_graph=k < 3)
        torch.testing.assert_close(leaves["weight"].grad, k * want["weight"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_autograd_grad_twice_gives_separate_tensors(backend):
    require(backend, "cpu", torch.float64)
    batch = make_batch(seed=33)
    leaves, loss = _loss(batch, backend)
    first = torch.autograd.grad(loss, [leaves["hidden"], leaves["weight"]], retain_graph=True)
    first[0].zero_()  # the caller owns what it got: changing it changes nothing else
    second = torch.autograd.grad(loss, [leaves["hidden"], leaves["weight"]])
    want = _single_backward_grads(batch, backend)
    torch.testing.assert_close(second[0], want["hidden"], rtol=1e-13, atol=0)
    torch.testing.assert_close(second[1], want["weight"], rtol=1e-13, atol=0)
    assert first[1].data_ptr() != second[1].data_ptr()


@pytest.mark.parametrize("backend", backend_params())
def test_scaled_loss_scales_the_gradients(backend):
    require(backend, "cpu", torch.float64)
    batch = make_batch(seed=34)
    want = _single_backward_grads(batch, backend)
    leaves, loss = _loss(batch, backend)
    (-2.5 * loss).backward()  # grad_loss != 1: the multiply path
    torch.testing.assert_close(leaves["weight"].grad, -2.5 * want["weight"], rtol=1e-13, atol=0)
    torch.testing.assert_close(leaves["hidden"].grad, -2.5 * want["hidden"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_create_graph_is_a_clear_error(backend):
    require(backend, "cpu", torch.float64)
    leaves, loss = _loss(make_batch(seed=35), backend)
    with pytest.raises(RuntimeError, match="grpo_loss has no double backward"):
        torch.autograd.grad(loss, [leaves["hidden"]], create_graph=True)
    logp = token_logprobs(leaves["hidden"], leaves["weight"], make_batch(seed=35)["targets"], backend=backend)
    with pytest.raises(RuntimeError, match="token_logprobs has no double backward"):
        torch.autograd.grad(logp.sum(), [leaves["hidden"]], create_graph=True)


@pytest.mark.parametrize("backend", backend_params())
def test_accumulates_into_existing_grad(backend):
    require(backend, "cpu", torch.float64)
    batch = make_batch(seed=36)
    want = _single_backward_grads(batch, backend)
    leaves = _leaves(batch)
    for t in leaves.values():
        t.grad = torch.ones_like(t)
    _, loss = _loss(batch, backend, leaves)
    loss.backward()
    for k, t in leaves.items():
        torch.testing.assert_close(t.grad, want[k] + 1, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------- models around the loss


class TinyLM(torch.nn.Module):
    """Embedding -> 2 linear blocks -> lm_head (optionally tied to the embedding)."""

    def __init__(self, V=29, H=16, tied=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(V, H)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(H, H) for _ in range(2))
        self.head = torch.nn.Linear(H, V, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if tied:
            self.head.weight = self.embed.weight
        self.double()

    def body(self, x, checkpoint=None):
        """The blocks on embeddings x; ``checkpoint``: None, or use_reentrant for each block."""
        for block in self.blocks:
            fn = lambda y, b=block: torch.tanh(b(y))  # noqa: E731
            x = fn(x) if checkpoint is None else torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=checkpoint)
        return x


def _model_step(model, batch_ids, backend, checkpoint=None, where="blocks"):
    """One loss.backward(): (loss, every parameter's gradient). ``where``: what a checkpoint
    (use_reentrant=``checkpoint``) wraps: each block, or the blocks and the loss together."""
    ids, targets, adv, mask = batch_ids
    model.zero_grad(set_to_none=True)

    def loss_of(x, block_checkpoint=None):
        return grpo_loss(model.body(x, block_checkpoint), model.head.weight, targets, adv, mask, backend=backend)

    x = model.embed(ids)
    if checkpoint is None:
        loss = loss_of(x)
    elif where == "blocks":
        loss = loss_of(x, checkpoint)
    else:
        loss = torch.utils.checkpoint.checkpoint(loss_of, x, use_reentrant=checkpoint)
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _ids(V=29, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 5), generator=g)
    return ids, torch.randint(0, V, (3, 5), generator=g), torch.randn(3, generator=g, dtype=torch.float64), \
        torch.rand(3, 5, generator=g) > 0.2


def _same(a, b, tol=1e-10):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        if grads_b[k] is None:
            assert grads_a[k] is None, k
        else:
            torch.testing.assert_close(grads_a[k], grads_b[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_whole_model_gradients_match_the_oracle(backend, tied):
    """Every parameter's gradient, the tied embedding/head's sum of two paths included."""
    require(backend, "cpu", torch.float64)
    model, batch = TinyLM(tied=tied), _ids()
    _same(_model_step(model, batch, backend), _model_step(model, batch, "reference"))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("where", ["blocks", "loss"])
def test_gradient_checkpointing(backend, reentrant, where):
    require(backend, "cpu", torch.float64)
    model, batch = TinyLM(seed=2), _ids(seed=2)
    _same(_model_step(model, batch, backend, checkpoint=reentrant, where=where), _model_step(model, batch, backend))


@pytest.mark.parametrize("backend", backend_params())
def test_frozen_head_and_head_only(backend):
    require(backend, "cpu", torch.float64)
    batch = make_batch(seed=37)
    want = _single_backward_grads(batch, backend)
    frozen = _leaves(batch, weight=False, bias=False)
    _, loss = _loss(batch, backend, frozen)
    loss.backward()
    assert frozen["weight"].grad is None and frozen["bias"].grad is None
    torch.testing.assert_close(frozen["hidden"].grad, want["hidden"], rtol=1e-13, atol=0)
    head_only = _leaves(batch, hidden=False)
    _, loss = _loss(batch, backend, head_only)
    loss.backward()
    assert head_only["hidden"].grad is None
    torch.testing.assert_close(head_only["weight"].grad, want["weight"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_inference_mode_inputs(backend):
    """Tensors made under torch.inference_mode (a rollout's logps, a reference pass) are
    valid inputs; the loss and log-probs themselves run under inference_mode too."""
    require(backend, "cpu", torch.float64)
    batch = make_batch(seed=38)
    with torch.inference_mode():
        frozen = {k: None if v is None else v.clone() for k, v in batch.items()}
        ref_logp = token_logprobs(frozen["hidden"], frozen["weight"], frozen["targets"], bias=frozen["bias"],
                                  backend=backend)
        no_grad_loss = grpo_loss(frozen["hidden"], frozen["weight"], frozen["targets"], frozen["advantages"],
                                 frozen["mask"], frozen["old_logps"], frozen["ref_logps"], bias=frozen["bias"],
                                 backend=backend, beta=0.04)
    want = token_logprobs(batch["hidden"], batch["weight"], batch["targets"], bias=batch["bias"], backend="reference")
    torch.testing.assert_close(ref_logp, want, rtol=1e-10, atol=1e-10)
    inf = dict(batch, old_logps=frozen["old_logps"], ref_logps=frozen["ref_logps"], advantages=frozen["advantages"])
    got = _single_backward_grads(inf, backend)
    torch.testing.assert_close(got["weight"], _single_backward_grads(batch, backend)["weight"], rtol=1e-13, atol=0)
    _, loss = _loss(batch, backend)
    torch.testing.assert_close(no_grad_loss, loss.detach(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_threads(backend):
    """Four threads computing different losses at once get what each gets alone."""
    import concurrent.futures

    require(backend, "cpu", torch.float64)
    batches = [make_batch(seed=40 + i) for i in range(4)]
    alone = [_single_backward_grads(b, backend) for b in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: _single_backward_grads(b, backend), batches))
    for a, b in zip(alone, together):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_no_leak_over_many_calls(backend):
    """No tensor outlives its step: the number of live tensors is the same after 5 steps and
    after 25 (a graph or saved gradient kept alive would add tensors every step)."""
    import gc
    import warnings

    require(backend, "cpu", torch.float64)
    batch = make_batch(seed=39)

    def live():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() touches deprecated torch module attributes
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def steps(k):
        for _ in range(k):
            _single_backward_grads(batch, backend)
            _loss(batch, backend)  # a forward never backpropagated
        return live()

    steps(2)
    assert steps(25) <= steps(5)
