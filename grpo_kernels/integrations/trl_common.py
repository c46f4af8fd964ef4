"""What the TRL trainers of this package share: importing TRL on first use, and recognising the
multimodal batches they leave to TRL.

Imports only the standard library: ``grpo_kernels.integrations.trl`` and
``grpo_kernels.integrations.trl_distill`` both build their trainer classes through ``import_trl``.
"""
from __future__ import annotations

__all__ = ["import_trl", "batch_unsupported_features"]

# the vision inputs TRL's trainers pass to the model; the fused trainers do not reimplement
# TRL's per-family slicing of them
_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def import_trl():
    """The ``trl`` module, or an ImportError that says how to install it (TRL is optional)."""
    try:
        import trl
    except ImportError as exc:  # pragma: no cover - exercised only without TRL
        raise ImportError(
            "grpo_kernels.integrations.trl needs TRL >= 1.16: pip install 'trl>=1.16' (or grpo_kernels[trl])"
        ) from exc
    return trl


def batch_unsupported_features(inputs) -> list:
    """The keys of a training batch that the fused TRL trainers cannot handle (multimodal inputs)."""
    present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
    return [f"multimodal inputs ({', '.join(present)})"] if present else []
