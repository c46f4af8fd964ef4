"""Benchmark shapes and their inputs.

A shape is one prompt-group batch: ``B = groups * G`` completions of ``T`` tokens each
(N = B * T positions), right-padded with about 20% padding (completion lengths spread
evenly over [0.6 T, T]), an lm_head of ``V x H`` and one dtype. Advantages are
group-normalized random rewards; the policy is on-policy (old_logps = None), beta = 0,
loss_type "dapo": TRL 1.16's defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

GENERATIONS = 4  # G: completions per prompt


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    V: int
    dtype: str  # "float32" | "bfloat16" | ...
    pad: float = 0.2

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def name(self) -> str:
        return f"N{self.N}-H{self.H}-V{self.V}-{_SHORT[self.dtype]}"

    @property
    def label(self) -> str:
        return f"N={self.N} (B={self.B}, T={self.T}), H={self.H}, V={self.V}, {self.dtype}"


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

# CPU: a few minutes on 2 cores. GPU: bf16, one run under 8 minutes on an H100.
CPU_SET: List[Shape] = [Shape(B, 256, 1024, 32768, "float32") for B in (4, 16)]
QUICK_SET: List[Shape] = CPU_SET[:1]
GPU_SET: List[Shape] = [
    Shape(N // 1024, 1024, H, V, "bfloat16")
    for H in (2048, 4096)
    for V in (32768, 151936)
    for N in (4096, 8192, 16384)
]
SETS: Dict[str, List[Shape]] = {"quick": QUICK_SET, "cpu": CPU_SET, "gpu": GPU_SET}
ALL: Dict[str, Shape] = {s.name: s for shapes in SETS.values() for s in shapes}


def default_set(device: torch.device, quick: bool = False) -> str:
    if quick:
        return "quick"
    return "gpu" if device.type == "cuda" else "cpu"


@dataclass
class Inputs:
    hidden: torch.Tensor  # [B, T, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    targets: torch.Tensor  # [B, T] int64
    advantages: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, T] bool, right padding

    def zero_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    @property
    def grad_bytes(self) -> int:
        """Bytes of grad_hidden + grad_weight in the inputs' dtype."""
        return (self.hidden.numel() + self.weight.numel()) * self.hidden.element_size()

    @property
    def real_tokens(self) -> int:
        return int(self.mask.sum())


def completion_mask(B: int, T: int, pad: float, device) -> torch.Tensor:
    """[B, T] bool: row lengths spread evenly over [(1 - 2 pad) T, T], shuffled (mean (1 - pad) T)."""
    lo = max(1, round((1 - 2 * pad) * T))
    lengths = torch.linspace(lo, T, B).round().long() if B > 1 else torch.tensor([round((1 - pad) * T)])
    lengths = lengths[torch.randperm(B, generator=torch.Generator().manual_seed(1))]
    return (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(device)


def make_inputs(shape: Shape, device: torch.device, seed: int = 0, requires_grad: bool = True) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    dt = shape.torch_dtype
    B, T, H, V = shape.B, shape.T, shape.H, shape.V
    hidden = torch.randn(B, T, H, device=device, dtype=dt, generator=g)
    weight = torch.randn(V, H, device=device, dtype=dt, generator=g).mul_(H ** -0.5 * 2)
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    rewards = torch.randn(B // GENERATIONS if B >= GENERATIONS else 1, min(B, GENERATIONS), device=device,
                          generator=g)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)
    adv = torch.nan_to_num(adv)[:B].float()
    mask = completion_mask(B, T, shape.pad, device)
    return Inputs(hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), targets, adv, mask)


def shapes_for(set_name: str, n_filter: Optional[List[int]] = None) -> List[Shape]:
    shapes = SETS[set_name]
    return [s for s in shapes if not n_filter or s.N in n_filter]
