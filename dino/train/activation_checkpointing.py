"""`train.activation_checkpointing`: trade compute for activation memory in the student's transformer blocks.

- `none`: every block keeps its activations for the backward pass (fastest, most memory).
- `full`: a block keeps only its input; its forward runs again during the backward pass (≈ +1 forward of the
  blocks, ~+33 % step FLOPs; activation memory of the blocks falls to one tensor per block).
- `selective`: a block keeps the outputs of its matrix products and of attention and recomputes the cheap
  rest (layer norms, GELU/SwiGLU, residual adds, LayerScale, drop path) — torchtitan's "op-level selective
  AC". Most of the memory of the element-wise intermediates goes, almost none of the FLOPs come back.

Only the student is wrapped: the teacher runs without gradients and keeps no activations. The block keeps its
class name's attributes, parameters and state-dict keys (its class is swapped for a subclass whose `forward`
runs under `torch.utils.checkpoint`), so checkpoints, parameter groups, the EMA update, `compile` and FSDP2
see the same modules. Drop-path masks are the same in the recomputation (the RNG state is replayed).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
# What `selective` keeps: outputs of the matmuls and of every attention kernel (the expensive ops)
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls_and_attention)


# Newer PyTorch lets what selective checkpointing keeps go through saved-tensor hooks (memory accounting,
# offloading) like any other saved tensor; older releases have no such switch and bypass them.
_HOOK_OPTION = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    else {}
)


class _CheckpointedForward:
    """Mixin placed before a block's own class: its forward runs under `torch.utils.checkpoint`."""

    activation_checkpointing: str = "full"

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # teacher-style and evaluation calls keep nothing anyway
            return super().forward(*args, **kwargs)
        context = (
            {"context_fn": _selective_context, **_HOOK_OPTION} if self.activation_checkpointing == "selective" else {}
        )
        return checkpoint(super().forward, *args, use_reentrant=False, **context, **kwargs)


@functools.cache
def _checkpointed_class(cls: type) -> type:
    return type(f"Checkpointed{cls.__name__}", (_CheckpointedForward, cls), {"__module__": cls.__module__})


def apply_activation_checkpointing(blocks: nn.ModuleList | list[nn.Module], mode: str) -> None:
    """Run every block in `blocks` under activation checkpointing `mode` ('none' | 'full' | 'selective')."""
    if mode not in MODES:
        raise ValueError(f"unknown activation checkpointing {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    for block in blocks:
        base = type(block)
        if isinstance(block, _CheckpointedForward):
            base = next(c for c in base.__mro__[1:] if not issubclass(c, _CheckpointedForward))
        block.__class__ = _checkpointed_class(base)
        block.activation_checkpointing = mode
