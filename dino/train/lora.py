"""LoRA adapters on a frozen backbone (`model.lora_rank`, `--lora_rank`): continued pretraining on small GPUs.

Each adapted linear layer W (d_out × d_in) of every transformer block (`model.lora_targets`, default the
attention's `qkv` and `proj`) keeps its weights frozen and gains a low-rank update (Hu et al. 2021):

    y = W x + b + (α / r) · B A x,    A ∈ R^{r × d_in} (Kaiming-uniform), B ∈ R^{d_out × r} (zeros: starts at W)

Only A, B and the heads train, so neither gradients nor AdamW state (2 fp32 values per parameter) are kept for
the backbone: 2·r·(d_in + d_out) trained values per adapted layer instead of d_in·d_out (ViT-L/14 at r = 8 on
qkv + proj: 1.2 M instead of 304 M). The adapters live next to the backbone (`network.lora`, so the backbone's
state dict keeps the official layout), are EMA'd into the teacher like every parameter, checkpointed and
resumed with it, and merged into W for the exported backbone (`export_backbone`): the file is a plain backbone
that any tool loads.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino.errors import UserError

# linear layers called as modules in every block (so a forward hook sees them), by their name in the block
LORA_TARGETS = ("qkv", "proj", "fc1")


class LoRA(nn.Module):
    """The low-rank update (α / r) · B A of one linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = float(alpha) / rank

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def delta_weight(self) -> Tensor:
        return (self.B @ self.A) * self.scale


def _targets(backbone: nn.Module, targets) -> dict[str, nn.Linear]:
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise UserError("LoRA adapters need a transformer backbone (blocks.*); this one has none (a ConvNeXt?)")
    found = {}
    for target in targets:
        if str(target) not in LORA_TARGETS:
            raise UserError(
                f"model.lora_targets: {target!r} cannot be adapted; choose from {', '.join(LORA_TARGETS)} "
                "(fc2 runs fused with the GELU in training, bypassing a hook)"
            )
    for index, block in enumerate(blocks):
        for target in targets:
            module = block
            for part in str(target).split("."):
                module = getattr(module, part, None) if module is not None else None
            if module is None:
                module = getattr(getattr(block, "attn", None), str(target), None) or getattr(
                    getattr(block, "mlp", None), str(target), None
                )
            if not isinstance(module, nn.Linear):
                raise UserError(f"model.lora_targets: block {index} has no linear layer {target!r}")
            found[f"{index}_{target}".replace(".", "_")] = module
    return found


def add_lora(network: nn.Module, rank: int, alpha: float | None = None, targets=("qkv", "proj")) -> nn.ModuleDict:
    """Freeze `network.backbone` and attach adapters to its linear layers (forward hooks); returns them, also set
    as `network.lora`. Call it on student and teacher separately (hooks are not copied safely by deepcopy)."""
    alpha = float(alpha if alpha is not None else rank)
    layers = _targets(network.backbone, targets)
    adapters = nn.ModuleDict()
    for name, linear in layers.items():
        adapter = LoRA(linear.in_features, linear.out_features, int(rank), alpha).to(linear.weight.device)
        adapters[name] = adapter
        linear.register_forward_hook(lambda module, inputs, output, adapter=adapter: output + adapter(inputs[0]))
    for param in network.backbone.parameters():
        param.requires_grad_(False)
    network.lora = adapters
    network.lora_layers = layers  # not a module attribute of the state dict: the same Linear objects as the backbone's
    return adapters


def add_lora_to_networks(student: nn.Module, teacher: nn.Module, rank: int, alpha: float | None, targets) -> None:
    """Adapters on both networks, the teacher's a copy of the student's (frozen, moved by the EMA)."""
    add_lora(student, rank, alpha, targets)
    add_lora(teacher, rank, alpha, targets)
    teacher.lora.load_state_dict(student.lora.state_dict())
    for param in teacher.lora.parameters():
        param.requires_grad_(False)


@torch.no_grad()
def export_backbone(network: nn.Module) -> nn.Module:
    """The backbone to write: `network.backbone` itself, or with LoRA a copy with every update merged into W."""
    adapters = getattr(network, "lora", None)
    if adapters is None:
        return network.backbone
    merged = copy.deepcopy(network.backbone)
    merged._forward_hooks.clear()
    names = dict(network.backbone.named_modules())
    merged_modules = dict(merged.named_modules())
    for name, linear in network.lora_layers.items():
        path = next(key for key, module in names.items() if module is linear)
        target = merged_modules[path]
        target._forward_hooks.clear()
        target.weight.add_(adapters[name].delta_weight().to(target.weight.dtype))
    return merged
