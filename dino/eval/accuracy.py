"""Top-k classification accuracy, once for the k-NN, linear-probe and logistic-regression evaluations."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def topk_hits(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """How many rows have their label among their k highest scores, for each k of `ks`.

    scores (B, C), labels (B,). Returns a (len(ks),) long tensor on the scores' device (no host sync, so it
    can be summed over batches and across ranks); a k above C counts as C.
    """
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels.to(top.device)[:, None]  # (B, k_max): at most one True per row
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """Percentage of rows whose label is among the k highest scores (nan for no rows)."""
    if len(labels) == 0:
        return float("nan")
    return 100.0 * float(topk_hits(scores, labels, (k,))[0]) / len(labels)
