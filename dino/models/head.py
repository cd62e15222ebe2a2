"""The DINO projection head (Caron et al., 2021).

x ↦ W_last · normalize(MLP(x)): an MLP (Linear-GELU × (nlayers−1), then Linear to a bottleneck), L2
normalisation, and a weight-normalised linear layer without bias to `out_dim` prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias, W = g · v / ‖v‖ per output row (Salimans & Kingma, 2016).

    Stores `weight_g` (out, 1) and `weight_v` (out, in) as plain parameters — the key names of the official
    checkpoints (made with `torch.nn.utils.weight_norm`, dim 0) — without forward hooks, so it works
    unchanged under DDP, FSDP2 and torch.compile.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> Tensor:
        # v · (g / ‖v‖), as torch's weight_norm computes it: the (out, 1) factor first, so autograd keeps no
        # second (out, in) product (65,536 × 256 at the papers' sizes) alive for the backward pass
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP → L2-normalise → weight-normalised prototypes.

    Args:
        in_dim: backbone embedding size.
        out_dim: number of prototypes K (65536 in the papers).
        norm_last_layer: keep the norm g of every prototype fixed at 1 (DINO v1 default; DINOv2 trains it).
        nlayers, hidden_dim, bottleneck_dim: MLP shape (3, 2048, 256 in the papers).
        use_bn: BatchNorm after the hidden linear layers (DINO v1 option).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out, bias=mlp_bias))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # eps as in the official head: a zero vector stays zero instead of producing NaN
        x = F.normalize(x, dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)
