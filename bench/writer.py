"""Markdown tables, key figures and plots from the result records (bench/runner.py)."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional

from bench.cases import RATIO_PEERS

MiB = 2 ** 20
KIND_TITLES = {
    "loss": "GRPO loss, forward + backward (grads of hidden and weight)",
    "logprobs": "token_logprobs alone (reference-model pass, no grad)",
}
BAR = 1.15  # DESIGN.md: within 1.15x of the three-matmul floor on an H100


def _ok(r):
    return r.get("status") == "ok"


def _index(results):
    return {(r["kind"], r["case"], r["shape"]): r for r in results}


def _shapes(results):
    return list(OrderedDict.fromkeys(r["shape"] for r in results))


def _ms(s: Optional[float]) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _x(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / MiB:.0f}"


def _time(idx, kind, case, shape):
    r = idx.get((kind, case, shape))
    return r["time_s"] if r is not None and _ok(r) else None


def _peak(r, minus_grads=False):
    if r is None or not _ok(r) or r.get("peak_bytes") is None:
        return None
    return max(0, r["peak_bytes"] - r.get("grad_bytes", 0)) if minus_grads else r["peak_bytes"]


def _check_delta(idx, r) -> str:
    if r.get("check") is None:
        return "-"
    if r["case"] == "ref:eager":
        return "(ref)"
    for ref_case in ("ref:eager", "ref:compile", "ours:torch"):
        ref = idx.get((r["kind"], ref_case, r["shape"]))
        if ref is not None and _ok(ref) and ref.get("check") is not None and ref is not r:
            denom = abs(ref["check"]) or 1.0
            return f"{abs(r['check'] - ref['check']) / denom:.0e}"
    return "-"


def shape_table(results: List[Dict], kind: str, shape: str, gpu: bool) -> str:
    idx = _index(results)
    rows = [r for r in results if r["kind"] == kind and r["shape"] == shape]
    peers = [p for p in RATIO_PEERS if any(r["case"] == p and _ok(r) for r in rows)]
    floors = ["floor:real", "floor"] if kind == "loss" else []
    floors = [f for f in floors if _time(idx, "floor", f, shape) is not None]
    head = ["case", "time ms"] + [f"÷ {f}" for f in floors] + [f"÷ {p}" for p in peers]
    head += ["peak MiB", "peak−grads MiB", "mem ÷ ref:eager", "Δcheck"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref_mem = idx.get((kind, "ref:eager", shape))
    all_rows = rows + ([idx[("floor", f, shape)] for f in floors] if kind == "loss" else [])
    for r in all_rows:
        if not _ok(r):
            continue
        t = r["time_s"]
        cells = [f"`{r['case']}`", _ms(t)]
        cells += [_x(t, _time(idx, "floor", f, shape)) for f in floors]
        cells += [_x(t, _time(idx, kind, p, shape)) for p in peers]
        cells += [_mib(_peak(r)), _mib(_peak(r, True)), _x(_peak(r), _peak(ref_mem)), _check_delta(idx, r)]
        out.append("| " + " | ".join(cells) + " |")
    skipped = [r for r in rows if not _ok(r)]
    for r in skipped:
        out.append(f"\n- `{r['case']}` {r['status']}: {r.get('reason', '')}")
    return "\n".join(out)


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def key_figures(results: List[Dict], gpu: bool) -> str:
    idx = _index(results)
    shapes = _shapes(results)
    ours = sorted({r["case"] for r in results if r["group"] == "ours" and r["kind"] == "loss" and _ok(r)})
    chunked = ours + ["liger", "trl:chunked"]  # every method that avoids the full [N, V] logits by design
    lines = []
    # memory at N=4096, V=32768 (every H / dtype of the set)
    mem_shapes = [s for s in shapes if any(r["shape"] == s and r["N"] == 4096 and r["V"] == 32768 for r in results)]
    for s in mem_shapes:
        ref = idx.get(("loss", "ref:eager", s))
        for c in chunked:
            r = idx.get(("loss", c, s))
            if r is None or not _ok(r) or _peak(ref) is None or _peak(r) is None:
                continue
            lines.append(
                f"- memory, {s}, `{c}` vs materialized reference: peak {_mib(_peak(r))} / {_mib(_peak(ref))} MiB"
                f" = **{_x(_peak(r), _peak(ref))}**; beyond inputs and grads {_mib(_peak(r, True))} /"
                f" {_mib(_peak(ref, True))} MiB = **{_x(_peak(r, True), _peak(ref, True))}**")
    # speed: geometric mean over shapes of time(ours) / time(peer); floor ratios
    for kind in ("loss", "logprobs"):
        for c in sorted({r["case"] for r in results if r["group"] == "ours" and r["kind"] == kind and _ok(r)}):
            parts = []
            for p in RATIO_PEERS:
                ratios = [(_time(idx, kind, c, s) or 0) / t for s in shapes
                          if (t := _time(idx, kind, p, s)) and _time(idx, kind, c, s)]
                g = _geomean(ratios)
                if g is not None:
                    parts.append(f"÷ {p} {g:.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} shapes)")
            if kind == "loss":
                for f in ("floor:real", "floor"):
                    ratios = [(_time(idx, kind, c, s) or 0) / t for s in shapes
                              if (t := _time(idx, "floor", f, s)) and _time(idx, kind, c, s)]
                    if ratios:
                        bar = (f"; within the {BAR}x bar on {sum(x <= BAR for x in ratios)} of {len(ratios)} shapes"
                               if gpu and f == "floor:real" else "")
                        parts.append(f"÷ {f} max {max(ratios):.2f}x, geomean {_geomean(ratios):.2f}x{bar}")
            if parts:
                lines.append(f"- speed, {kind}, `{c}`: " + "; ".join(parts))
    lines.append("- ratios are time(row) ÷ time(column case) on the same shape: below 1 is faster; "
                 "`Δcheck` is the relative difference of ||grad_hidden|| (loss) or the masked logp sum "
                 "(logprobs) from `ref:eager`, a guard that every row computes the same thing.")
    return "\n".join(lines)


def markdown(results: List[Dict], meta: Dict[str, str]) -> str:
    gpu = meta.get("device_type") == "cuda"
    parts = [f"### {meta['title']}", ""]
    parts += [f"- {k}: {v}" for k, v in meta.items() if k not in ("title", "device_type", "set")]
    parts += ["", "#### Key figures", "", key_figures(results, gpu), ""]
    for kind in ("loss", "logprobs"):
        shapes = [s for s in _shapes(results) if any(r["kind"] == kind and r["shape"] == s for r in results)]
        if not shapes:
            continue
        parts += [f"#### {KIND_TITLES[kind]}", ""]
        for s in shapes:
            label = next(r for r in results if r["shape"] == s)
            real = next((r.get("real_tokens") for r in results if r["shape"] == s and r.get("real_tokens")), None)
            parts += [f"**{s}** (N={label['N']}, real tokens {real}, H={label['H']}, V={label['V']}, {label['dtype']})",
                      "", shape_table(results, kind, s, gpu), ""]
    return "\n".join(parts)


def plot(results: List[Dict], path_prefix: str) -> List[str]:
    """time and peak memory vs N, one column per (H, V, dtype), one figure per kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    written = []
    for kind in ("loss", "logprobs"):
        rows = [r for r in results if _ok(r) and (r["kind"] == kind or (kind == "loss" and r["kind"] == "floor"))]
        if not any(r["kind"] == kind for r in rows):
            continue
        cols = list(OrderedDict.fromkeys((r["H"], r["V"], r["dtype"]) for r in rows))
        fig, axes = plt.subplots(2, len(cols), figsize=(max(6.0, 4.2 * len(cols)), 7), squeeze=False)
        for j, (H, V, dt) in enumerate(cols):
            sub = [r for r in rows if (r["H"], r["V"], r["dtype"]) == (H, V, dt)]
            for case in OrderedDict.fromkeys(r["case"] for r in sub):
                pts = sorted((r["N"], r["time_s"] * 1e3, _peak(r)) for r in sub if r["case"] == case)
                style = "k--x" if case.startswith("floor") else ("-o" if case.startswith("ours") else ":s")
                if case == "floor:real":
                    style = "k:+"
                axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], style, label=case, ms=4)
                if pts[0][2] is not None and not case.startswith("floor"):
                    axes[1][j].plot([p[0] for p in pts], [(p[2] or 0) / MiB for p in pts], style, label=case, ms=4)
            axes[0][j].set_title(f"H={H} V={V} {dt}", fontsize=9)
            for i, ylabel in enumerate(("time (ms)", "peak MiB beyond inputs")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (positions)")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(KIND_TITLES[kind], fontsize=10)
        fig.tight_layout()
        path = f"{path_prefix}_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
