"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"), used by DINOv2.

Derived from the Kozachenko–Leonenko differential-entropy estimator: with x_i L2-normalised and
ρ_i the distance to its nearest neighbour in the batch,

    L_koleo = −(1/n) Σ_i log(ρ_i + ε)

Minimising it pushes features apart, i.e. spreads them uniformly on the sphere. DINOv2 applies it (weight
0.1) to the backbone [CLS] of each global crop separately and sums the two values.

Exact conventions of the official code: normalisation eps 1e-8; nearest neighbour by largest dot product
with the diagonal set to −1; ρ_i = ‖x_i − x_nn(i) + 1e-8‖ (``PairwiseDistance(eps=1e-8)``); the log adds
1e-8 too. Duplicated samples therefore give ρ = 1e-8·√D, a large but finite loss.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    # The estimator is computed in fp32: log of tiny distances is meaningless in half precision.
    is_available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    if is_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def nearest_neighbour_indices(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row, for unit rows: argmax of the dot product, self excluded."""
    with torch.no_grad():
        dots = torch.mm(x, x.t())
        dots.fill_diagonal_(-1)  # −1 is the smallest possible cosine: a point never picks itself
        return torch.max(dots, dim=1).indices


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of a batch of features x (n, D): −mean log(‖x̂ − x̂_nn + eps‖ + eps), x̂ = x/‖x‖."""
    with _autocast_disabled(x.device.type):
        unit = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        neighbours = unit[nearest_neighbour_indices(unit)]
        distances = torch.linalg.vector_norm(unit - neighbours + eps, ord=2, dim=-1)
        return -torch.log(distances + eps).mean()


class KoLeoLoss(nn.Module):
    """Module form of `koleo_loss` (no parameters or state)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return koleo_loss(x, self.eps)
