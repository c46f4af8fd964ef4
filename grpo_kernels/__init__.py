"""grpo_kernels: a fused, memory-lean GRPO loss that never materializes [N, V] logits."""
from grpo_kernels.advantage_kernels import group_advantages
from grpo_kernels.advantages import kl_penalized_rewards, process_advantages
from grpo_kernels.api import GRPOLoss, backend_for, grpo_loss, token_logprobs, token_statistics
from grpo_kernels.distill import DistillMetrics, distill_loss
from grpo_kernels.metrics import GRPOMetrics
from grpo_kernels.options import ExecutionOptions, GRPOOptions
from grpo_kernels.topk_distill import topk_forward_kl

__all__ = [
    "grpo_loss",
    "GRPOLoss",
    "GRPOOptions",
    "ExecutionOptions",
    "backend_for",
    "GRPOMetrics",
    "token_logprobs",
    "token_statistics",
    "group_advantages",
    "process_advantages",
    "kl_penalized_rewards",
    "distill_loss",
    "DistillMetrics",
    "topk_forward_kl",
]
__version__ = "0.1.0"
