"""Gradient clipping as each official recipe does it (neither is one clip over all parameters).

* DINO v1 (``utils.clip_gradients``): every parameter tensor on its own, g ← g · min(1, c / (‖g‖ + 1e-6)).
* DINOv2 (FSDP ``clip_grad_norm_`` per sub-module): the global norm of each sub-module (backbone, DINO
  head, iBOT head) separately, g ← g · min(1, c / (‖g_module‖ + 1e-6)).

Both go through `torch.nn.utils.clip_grad_norm_`, whose rule is exactly the one above and which handles
DTensor (FSDP2) gradients.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn


def _full_norm(norm: torch.Tensor) -> torch.Tensor:
    # clip_grad_norm_ returns a DTensor for DTensor gradients; callers want a plain tensor.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_gradients_per_parameter(module: nn.Module, max_norm: float) -> list[float]:
    """DINO v1: clip each parameter's gradient to norm ≤ `max_norm` independently.

    Returns the gradient norms before clipping, one per parameter that has a gradient.
    """
    norms = [
        _full_norm(torch.nn.utils.clip_grad_norm_([param], max_norm))
        for param in module.parameters()
        if param.grad is not None
    ]
    # One host transfer for all norms instead of one per parameter.
    return torch.stack(norms).tolist() if norms else []


def clip_grad_norm_per_module(modules: Mapping[str, nn.Module], max_norm: float) -> dict[str, torch.Tensor]:
    """DINOv2: clip the global gradient norm of each named sub-module to ≤ `max_norm`, separately.

    Returns each sub-module's total gradient norm before clipping (0 when it has no gradients).
    """
    norms: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        params = [param for param in module.parameters() if param.grad is not None]
        norms[name] = _full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return norms
