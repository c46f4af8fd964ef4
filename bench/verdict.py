"""Whether a benchmark run passed: what ``bench/report.py`` turns into its exit status.

A run fails when any row is an error or an OOM (``status`` "error" / "oom"), when a row's check
value (``check``: ||grad_hidden|| for losses, the masked logp sum for log-prob passes; see
``bench.cases.check_value``) differs from its reference row's by more than ``CHECK_TOL`` of the
shape's dtype, or when a backend listed in ``GRPO_KERNELS_REQUIRE_BACKENDS`` was skipped for any
reason but the time budget (a failed JIT build must not pass as a skipped row). Skipped peers
(Liger or TRL not installed) and cases the budget left out are not failures: the report shows them.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

#: the largest relative difference of a row's check value from its reference row's, by the shape's
#: dtype: a norm over every token, so far tighter than one element's rounding (measured: <= 5e-10
#: in fp32 on the CPU)
CHECK_TOL = {"float64": 1e-8, "float32": 1e-4, "float16": 2e-2, "bfloat16": 3e-2}
#: the reference rows a check value is compared with, in order of preference
CHECK_REFS = ("ref:eager", "ref:compile", "ours:torch")
BUDGET_REASON = "time budget"


def _required() -> set:
    raw = os.environ.get("GRPO_KERNELS_REQUIRE_BACKENDS", "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    return {"cpp" if n == "cuda" else n for n in names}


def check_reference(index: Dict, row: Dict) -> Optional[Dict]:
    """The row whose check value ``row``'s is compared with (None: nothing to compare with). The
    level cases (ours:B:sequence) are compared with the torch backend's of the same level."""
    level = row["case"].split(":")[2:]
    for ref_case in CHECK_REFS[:2] + (":".join(["ours:torch"] + level),):
        ref = index.get((row["kind"], ref_case, row["shape"]))
        if ref is not None and ref is not row and ref.get("status") == "ok" and ref.get("check") is not None:
            return ref
    return None


def check_delta(index: Dict, row: Dict) -> Optional[float]:
    """|check - reference check| / |reference check|, or None where there is nothing to compare."""
    if row.get("status") != "ok" or row.get("check") is None:
        return None
    ref = check_reference(index, row)
    if ref is None:
        return None
    return abs(row["check"] - ref["check"]) / (abs(ref["check"]) or 1.0)


def failures(results: List[Dict]) -> List[str]:
    """One line per reason the run failed; empty when it passed."""
    index = {(r["kind"], r["case"], r["shape"]): r for r in results}
    required = _required()
    out = []
    for r in results:
        where = f"{r['kind']} {r['case']} {r['shape']}"
        status = r.get("status")
        if status in ("error", "oom"):
            out.append(f"{where}: {status}: {str(r.get('reason', ''))[:300]}")
            continue
        backend = r["case"].split(":")[1] if r["case"].startswith("ours:") else None
        if status == "skipped" and backend in required and BUDGET_REASON not in str(r.get("reason", "")):
            out.append(f"{where}: skipped, but backend {backend!r} is required (GRPO_KERNELS_REQUIRE_BACKENDS): "
                       f"{r.get('reason')}")
            continue
        delta = check_delta(index, r)
        tol = CHECK_TOL.get(r.get("dtype"), 1e-4)
        if delta is not None and not delta <= tol:  # NaN fails too
            out.append(f"{where}: check {r['check']!r} differs from the reference's by {delta:.1e} > {tol:.0e}")
    return out
