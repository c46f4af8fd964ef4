"""``distill_loss``'s inputs: every bad input raises a TypeError/ValueError (or, for what is not
built, BackendUnavailable) naming the argument, from the table
``DISTILL_BAD``, which docs/errors.md lists (tests/test_docs.py holds the two together); and
unusual valid inputs (weighted masks, meta tensors)."""
from __future__ import annotations

import pytest
import torch

from test_distill import B, H, H_T, T, V, make, run
from grpo_kernels import distill_loss
from grpo_kernels.backends import BackendUnavailable


def call_bad(overrides):
    """distill_loss on tiny fp32 CPU inputs (the sizes docs/errors.md shows) with ``overrides``
    (tensors or keywords) applied."""
    d = make(dtype=torch.float32)
    kw = dict(overrides)
    args = {k: kw.pop(k) if k in kw else d[k] for k in ("hidden", "weight", "teacher_hidden", "teacher_weight",
                                                         "mask")}
    kw.setdefault("bias", d["bias"])
    kw.setdefault("teacher_bias", d["teacher_bias"])
    return distill_loss(args["hidden"], args["weight"], args["teacher_hidden"], args["teacher_weight"],
                        args["mask"], **kw)


_d = make(dtype=torch.float32)
# (case id, overrides of call_bad(), expected exception, regex the message must match)
DISTILL_BAD = [
    ("beta_above_1", dict(beta=1.5), ValueError, r"^beta must be in \[0, 1\]"),
    ("beta_below_0", dict(beta=-0.1), ValueError, r"^beta must be in \[0, 1\]"),
    ("beta_str", dict(beta="0.5"), TypeError, r"^beta must be a number, got str"),
    ("temperature_zero", dict(temperature=0.0), ValueError, r"^temperature must be > 0, got 0.0"),
    ("temperature_nan", dict(temperature=float("nan")), ValueError, r"^temperature must be finite"),
    ("softcap_zero", dict(logit_softcap=0.0), ValueError, r"^logit_softcap must be > 0"),
    ("teacher_softcap_negative", dict(teacher_logit_softcap=-1.0), ValueError, r"^teacher_logit_softcap must be > 0"),
    ("logit_scale_inf", dict(logit_scale=float("inf")), ValueError, r"^logit_scale must be finite"),
    ("teacher_logit_scale_str", dict(teacher_logit_scale="2"), TypeError, r"^teacher_logit_scale must be a number"),
    ("num_items_zero", dict(num_items_in_batch=0), ValueError, r"^num_items_in_batch must be a finite number > 0"),
    ("num_items_vector", dict(num_items_in_batch=torch.ones(2)), ValueError, r"^num_items_in_batch must be a scalar"),
    ("num_items_str", dict(num_items_in_batch="8"), TypeError, r"^num_items_in_batch must be a number"),
    ("return_metrics_str", dict(return_metrics="yes"), TypeError, r"^return_metrics must be a bool"),
    ("backend_cuda_on_cpu", dict(backend="cuda"), BackendUnavailable, r"^backend 'cuda' cannot run on cpu"),
    ("backend_unknown", dict(backend="cudnn"), ValueError, r"^backend must be one of"),
    ("process_group_without_distributed", dict(process_group=object()), RuntimeError,
     r"^vocab-parallel losses need an initialized torch.distributed process group"),
    ("process_group_reference", dict(process_group=object(), backend="reference"), ValueError,
     r"^backend='reference' has no vocab-parallel form"),
    ("vocab_start_without_group", dict(vocab_start=0), ValueError, r"^vocab_start is given without a process_group"),
    ("hidden_2d", dict(hidden=_d["hidden"][0]), ValueError, r"^hidden must be 3-D"),
    ("hidden_int", dict(hidden=_d["hidden"].long()), TypeError, r"^hidden must be a floating tensor"),
    ("weight_wrong_h", dict(weight=_d["weight"][:, :5]), ValueError, r"^weight must be \[V, H\]"),
    ("weight_dtype", dict(weight=_d["weight"].double()), TypeError, r"^weight dtype torch.float64 must match"),
    ("teacher_hidden_2d", dict(teacher_hidden=_d["teacher_hidden"][0]), ValueError, r"^teacher_hidden must be 3-D"),
    ("teacher_hidden_bt", dict(teacher_hidden=_d["teacher_hidden"][:2]), ValueError,
     r"^teacher_hidden must be \[B, T, H_t\]"),
    ("teacher_weight_int", dict(teacher_weight=_d["teacher_weight"].long()), TypeError,
     r"^teacher_weight must be a floating tensor"),
    ("teacher_weight_dtype", dict(teacher_weight=_d["teacher_weight"].double()), TypeError,
     r"^teacher_weight dtype torch.float64 must match teacher_hidden dtype"),
    ("teacher_weight_wrong_h", dict(teacher_weight=_d["teacher_weight"][:, :4]), ValueError,
     r"^teacher_weight must be \[V, H_t\]"),
    ("vocabulary_mismatch", dict(teacher_weight=_d["teacher_weight"][:9]), ValueError,
     r"^teacher_weight has V = 9 rows but weight has V = 11"),
    ("teacher_bias_shape", dict(teacher_bias=_d["teacher_bias"][:9]), ValueError, r"^teacher_bias must have shape"),
    ("teacher_bias_dtype", dict(teacher_bias=_d["teacher_bias"].double()), TypeError,
     r"^teacher_bias dtype torch.float64 must match"),
    ("teacher_weight_nan", dict(teacher_weight=_d["teacher_weight"].clone().fill_(float("nan"))), ValueError,
     r"^teacher_weight contains NaN or inf"),
    ("teacher_hidden_inf", dict(teacher_hidden=_d["teacher_hidden"].clone().fill_(float("inf"))), ValueError,
     r"^teacher_hidden contains NaN or inf"),
    ("mask_shape", dict(mask=_d["mask"][:, :3]), ValueError, r"^mask must have shape \(3, 4\)"),
    ("mask_1d", dict(mask=_d["mask"].reshape(-1)), ValueError, r"^mask must be 2-D"),
    ("mask_negative", dict(mask=-_d["mask"].float()), ValueError, r"^mask must be >= 0"),
]


@pytest.mark.parametrize("case", DISTILL_BAD, ids=[c[0] for c in DISTILL_BAD])
def test_bad_input_raises_naming_the_argument(case):
    _, overrides, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call_bad(overrides)




def test_mask_values_do_not_weight():
    """TRL counts positions where mask != 0; a float mask's values do not weight the divergence."""
    d = make(seed=21)
    weighted = dict(d, mask=d["mask"].double() * torch.rand(B, T, dtype=torch.float64).add_(0.5))
    a, b = run(distill_loss, d, beta=0.5), run(distill_loss, weighted, beta=0.5)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_meta_tensors_are_a_shape_only_run():
    mk = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    h, w = mk(B, T, H).requires_grad_(True), mk(V, H).requires_grad_(True)
    loss, m = distill_loss(h, w, mk(B, T, H_T), mk(V, H_T), torch.empty(B, T, dtype=torch.bool, device="meta"),
                           beta=0.5, return_metrics=True)
    loss.backward()
    assert loss.shape == () and m.divergence.shape == (B, T) and h.grad.shape == h.shape and w.grad.shape == w.shape
