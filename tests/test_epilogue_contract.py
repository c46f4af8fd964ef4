"""The epilogue contract (``grpo_kernels.epilogue``) against the C++ header and the Triton kernels.

The kernels' codes are written once in Python (``LOSS_KIND_CODES``, ``SCALE_MODE_CODES``); the C++
side keeps its own enums (``LossKind``, ``ScaleMode``, ``DType`` in ``csrc/*.h``). These tests parse
the headers and fail on any disagreement, check that the Triton kernels take their constants from
the same tables, and that every backend maps the options onto them through the one helper.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from grpo_kernels import epilogue
from grpo_kernels.checks import FLOAT_DTYPES, SCALE_MODES
from grpo_kernels.options import CLIPPED_LOSS_TYPES, TOKEN_LOSS_TYPES, GRPOOptions

CSRC = Path(__file__).resolve().parents[1] / "csrc"
_ENUM = re.compile(r"enum\s+(?:class\s+)?(\w+)\s*(?::\s*[\w:]+\s*)?\{([^}]*)\}", re.S)


def header_enums() -> dict:
    """{enum name: {member: value}} of every enum in csrc/*.h (comments stripped; implicit values
    counted on from the previous member, as C++ does)."""
    enums = {}
    for path in sorted(CSRC.glob("*.h")):
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(), flags=re.S)
        for name, body in _ENUM.findall(text):
            members, nxt = {}, 0
            for item in filter(None, (x.strip() for x in body.split(","))):
                key, _, value = (p.strip() for p in item.partition("="))
                nxt = int(value, 0) if value else nxt
                members[key] = nxt
                nxt += 1
            assert name not in enums, f"enum {name} is defined twice in csrc/*.h"
            enums[name] = members
    return enums


def python_name(member: str, prefix: str = "") -> str:
    """kScaleGroup -> "group" (prefix "Scale"), kClipped -> "clipped", kBF16 -> "bf16"."""
    assert member.startswith("k"), f"C++ enum member {member!r} does not follow the kName convention"
    name = member[1:]
    assert name.startswith(prefix), f"{member!r} lacks the prefix {prefix!r}"
    return name[len(prefix):].lower()


def test_header_parser_reads_every_contract_enum():
    enums = header_enums()
    for name in ("LossKind", "ScaleMode", "DType"):
        assert name in enums, f"csrc/*.h has no enum {name} (found {sorted(enums)})"


def test_loss_kind_codes_match_the_header():
    enums = header_enums()
    got = {python_name(k): v for k, v in enums["LossKind"].items()}
    assert got == epilogue.LOSS_KIND_CODES, "csrc LossKind and epilogue.LOSS_KIND_CODES disagree"


def test_scale_mode_codes_match_the_header():
    enums = header_enums()
    got = {python_name(k, "Scale"): v for k, v in enums["ScaleMode"].items()}
    assert got == epilogue.SCALE_MODE_CODES, "csrc ScaleMode and epilogue.SCALE_MODE_CODES disagree"
    assert set(epilogue.SCALE_MODE_CODES) == set(SCALE_MODES)


def test_dtype_enum_covers_the_float_dtypes():
    # Python passes no dtype code (the binding maps torch's dtype onto DType itself): the enum
    # must name exactly the float dtypes the checks accept, with distinct codes
    names = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
    dtype = header_enums()["DType"]
    assert {python_name(k) for k in dtype} == {names[d] for d in FLOAT_DTYPES}
    assert len(set(dtype.values())) == len(dtype)


def test_every_token_loss_type_has_a_kind():
    for lt in TOKEN_LOSS_TYPES:
        want = "clipped" if lt in CLIPPED_LOSS_TYPES else lt
        assert epilogue.loss_kind_code(lt) == epilogue.LOSS_KIND_CODES[want], lt
    with pytest.raises(ValueError, match="loss_type"):
        epilogue.loss_kind_code("vespo")


def test_triton_constants_come_from_the_tables():
    pytest.importorskip("triton")
    from grpo_kernels.backends.triton import advantages_kernel, objective_kernel

    for name in ("clipped", "cispo", "sapo"):
        assert getattr(objective_kernel, name.upper()).value == epilogue.LOSS_KIND_CODES[name]
    for name in ("group", "batch", "none"):
        assert getattr(advantages_kernel, f"SCALE_{name.upper()}").value == epilogue.SCALE_MODE_CODES[name]
    # no literal code left in the device functions that compare against them
    epi_src = inspect.getsource(objective_kernel.grpo_token_epilogue.fn)
    adv_src = inspect.getsource(advantages_kernel.reward_advantage.fn)
    assert not re.search(r"LOSS\s*[=!]=\s*\d", epi_src)
    assert not re.search(r"MODE\s*[=!]=\s*\d", adv_src)
    for lt in TOKEN_LOSS_TYPES:
        params = objective_kernel.epilogue_params(GRPOOptions(loss_type=lt), torch.float32)
        assert params["LOSS"] == epilogue.loss_kind_code(lt)


def test_cpp_glue_uses_the_tables():
    from grpo_kernels.backends import cpp

    for lt in TOKEN_LOSS_TYPES:
        assert cpp._option_args(GRPOOptions(loss_type=lt))["kind"] == epilogue.loss_kind_code(lt)
    o = GRPOOptions(num_generations=2, scale_rewards="batch")
    ti = epilogue.TokenInputs(old=None, adv=None, weight=torch.ones(4), rewards=torch.arange(4.0),
                              seq=torch.arange(4))
    args = cpp._reward_args(ti, o, torch.float32, "cpu")
    assert args["scale_mode"] == epilogue.SCALE_MODE_CODES["batch"]
    assert args["rewards"].shape == (4, 1) and torch.equal(args["reward_weights"], torch.ones(1))


@pytest.mark.parametrize("prepare", ["torch", "triton", "cpp"])
def test_ref_required_when_beta_nonzero(prepare):
    """The one rule, reached from every backend's input preparation (validation's user-facing
    check is tested in test_bad_inputs)."""
    ti = epilogue.TokenInputs(old=None, adv=torch.ones(3), weight=torch.ones(3))
    o = GRPOOptions(beta=0.1)
    with pytest.raises(ValueError, match="ref logps are required when beta != 0"):
        if prepare == "torch":
            epilogue.token_epilogue(torch.zeros(3), ti, o)
        elif prepare == "triton":
            pytest.importorskip("triton")
            from grpo_kernels.backends.triton import objective_kernel

            objective_kernel.token_vectors(ti, (3,), torch.float32, "cpu", o.beta)
        else:
            from grpo_kernels.backends import cpp

            cpp._token_args(ti, torch.float32, "cpu", o.beta)


def test_reward_matrix_defaults():
    r, w = epilogue.reward_matrix(torch.tensor([1.0, 2.0], dtype=torch.float16), None)
    assert r.shape == (2, 1) and r.dtype == torch.float32 and r.is_contiguous()
    assert torch.equal(w, torch.ones(1))
    r, w = epilogue.reward_matrix(torch.zeros(3, 2, dtype=torch.float64), torch.tensor([1.0, 0.5]))
    assert r.dtype == w.dtype == torch.float64 and w.tolist() == [1.0, 0.5]


def test_accumulation_dtype():
    for d in (torch.float16, torch.bfloat16, torch.float32):
        assert epilogue.accumulation_dtype(d) == torch.float32
    assert epilogue.accumulation_dtype(torch.float64) == torch.float64
    assert epilogue.accumulation_dtype(torch.float32, torch.float64) == torch.float64
