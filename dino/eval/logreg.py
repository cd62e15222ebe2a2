"""Multinomial logistic regression on frozen features, with the regularisation chosen on held-out data.

The log-reg evaluation of DINOv2 (Oquab et al. 2023, the few-shot / low-shot protocol): on L2-normalised
features x_i with labels y_i, fit W (C×D) and b (C) minimising the L2-penalised multinomial
cross-entropy — scikit-learn's objective divided by C·N, which has the same minimiser:

    L(W, b) = (1/N) Σ_i −log softmax(W x_i + b)_{y_i}  +  ‖W‖² / (2·C·N)        (the bias is not penalised)

full batch with L-BFGS (strong-Wolfe line search) on the evaluation device.  The inverse regularisation C
is swept over a log grid: each C is fitted on most of the training split and scored on a held-out,
class-stratified part of it; the best C is refitted on the whole training split and evaluated once on val.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dino.distributed import DeviceContext, barrier, init_distributed, is_main_process
from dino.errors import UserError
from dino.eval.accuracy import topk_accuracy
from dino.eval.checkpointing import write_json_atomic
from dino.eval.features import features_from_config
from dino.log import get_logger

logger = get_logger(__name__)


@dataclass
class LinearModel:
    """Weights (C, D) and bias (C,) of a linear classifier: logits = x Wᵀ + b."""

    weight: Tensor
    bias: Tensor

    def logits(self, features: Tensor) -> Tensor:
        return features.to(self.weight) @ self.weight.T + self.bias


def c_grid(log10_min: float, log10_max: float, num: int) -> list[float]:
    """C values evenly spaced in log10 (DINOv2 sweeps 10^[-6 … 5])."""
    if num < 1 or log10_min > log10_max:
        raise UserError(f"bad C grid: 10^[{log10_min} … {log10_max}] with {num} values")
    return [float(c) for c in torch.logspace(log10_min, log10_max, num, dtype=torch.float64)]


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    c_value: float,
    max_iter: int = 1000,
    init: LinearModel | None = None,
    device: torch.device | str | None = None,
) -> LinearModel:
    """Minimise L(W, b) above with full-batch L-BFGS; `init` warm-starts (used along a sweep of C)."""
    if c_value <= 0:
        raise UserError(f"the inverse regularisation C must be positive, got {c_value}")
    device = torch.device(device) if device is not None else features.device
    x = features.to(device, torch.float32)
    y = labels.to(device, torch.long)
    num_samples, dim = x.shape
    weight = torch.zeros(num_classes, dim, device=device) if init is None else init.weight.detach().to(device).clone()
    bias = torch.zeros(num_classes, device=device) if init is None else init.bias.detach().to(device).clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    penalty = 1.0 / (2.0 * c_value * num_samples)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + penalty * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearModel(weight.detach(), bias.detach())


def stratified_holdout_split(labels: Tensor, holdout_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(fit indices, held-out indices): round(fraction·n_c) random images of each class c are held out
    (none of a class with a single image, so every class stays in the fit part)."""
    if not 0 < holdout_fraction < 1:
        raise UserError(f"the held-out fraction must be in (0, 1), got {holdout_fraction}")
    generator = torch.Generator().manual_seed(seed)
    fit, held_out = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(len(members) - 1, max(1, round(holdout_fraction * len(members)))) if len(members) > 1 else 0
        held_out.append(members[:count])
        fit.append(members[count:])
    fit_indices, held_out_indices = torch.cat(fit).sort().values, torch.cat(held_out).sort().values
    if len(held_out_indices) == 0:
        raise UserError("no training image can be held out to choose C (every class has a single image)")
    return fit_indices, held_out_indices


@dataclass
class RegularisationSweep:
    """Held-out top-1 (%) of every C tried, and the C chosen."""

    c_values: list[float]
    holdout_top1: list[float]
    best_c: float


def sweep_regularisation(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    c_values: Sequence[float],
    holdout_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 1000,
    device: torch.device | str | None = None,
) -> RegularisationSweep:
    """Fit each C on the fit part of a stratified split and pick the best held-out top-1.

    C goes from small to large and each fit starts from the previous solution (weaker regularisation
    moves the optimum outwards); among equal accuracies the smallest C, the strongest regularisation, wins.
    """
    fit_idx, held_idx = stratified_holdout_split(labels, holdout_fraction, seed)
    ordered = sorted(float(c) for c in c_values)
    accuracies: list[float] = []
    model = None
    for c_value in ordered:
        model = fit_logistic_regression(
            features[fit_idx], labels[fit_idx], num_classes, c_value, max_iter, model, device
        )
        accuracies.append(topk_accuracy(model.logits(features[held_idx].to(model.weight.device)), labels[held_idx], 1))
    best = max(range(len(ordered)), key=lambda i: (accuracies[i], -i))
    return RegularisationSweep(ordered, accuracies, ordered[best])


def logistic_regression_eval(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    c_values: Sequence[float],
    holdout_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 1000,
    device: torch.device | str | None = None,
) -> dict:
    """The whole protocol: normalise, sweep C on held-out train data, refit on all train data, score val.

    Returns {best_c, sweep: [{c, holdout_top1}], top1, top5 (None below 5 classes)} in percent.
    """
    if train_features.shape[1] != val_features.shape[1]:
        raise UserError(
            f"train features have dimension {train_features.shape[1]} but val features {val_features.shape[1]}"
        )
    if int(train_labels.min()) < 0:
        raise UserError("logistic regression needs labelled training images (found negative labels)")
    train_x, val_x = F.normalize(train_features.float(), dim=1), F.normalize(val_features.float(), dim=1)
    sweep = sweep_regularisation(train_x, train_labels, num_classes, c_values, holdout_fraction, seed, max_iter, device)
    model = fit_logistic_regression(train_x, train_labels, num_classes, sweep.best_c, max_iter, device=device)
    logits = model.logits(val_x.to(model.weight.device))
    return dict(
        best_c=sweep.best_c,
        sweep=[dict(c=c, holdout_top1=acc) for c, acc in zip(sweep.c_values, sweep.holdout_top1)],
        top1=topk_accuracy(logits, val_labels, 1),
        top5=topk_accuracy(logits, val_labels, 5) if num_classes >= 5 else None,
    )


def format_sweep_table(result: dict) -> str:
    """Held-out top-1 for every C, the chosen one marked."""
    lines = [f"{'C':>10}  {'held-out top-1':>14}"]
    for row in result["sweep"]:
        marker = "  <- best" if row["c"] == result["best_c"] else ""
        lines.append(f"{row['c']:>10.3g}  {row['holdout_top1']:>14.2f}{marker}")
    return "\n".join(lines)


def run_logreg(cfg) -> dict:
    """`eval_linear.py --protocol logreg`: features of `cfg` (extracted or loaded), the C sweep, val accuracy,
    a table on stdout and `<output_dir>/logreg_results.json`."""
    settings = cfg.logreg
    c_values = c_grid(float(settings.c_log10_min), float(settings.c_log10_max), int(settings.num_c))
    device_ctx = DeviceContext.create(cfg.device, precision=str(cfg.precision))
    init_distributed(device_ctx.backend)
    if is_main_process():
        logger.info(
            f"log-reg protocol: L2-normalised features, L-BFGS (max {settings.max_iter} iterations), "
            f"C in 10^[{settings.c_log10_min} … {settings.c_log10_max}] ({len(c_values)} values) chosen on "
            f"{100 * float(settings.holdout_fraction):g}% of train held out, refit on all train"
        )
    split = features_from_config(cfg, device_ctx)
    if not is_main_process():
        barrier()
        return {}
    result = logistic_regression_eval(
        split.train_features,
        split.train_labels,
        split.val_features,
        split.val_labels,
        split.num_classes,
        c_values,
        float(settings.holdout_fraction),
        int(settings.seed),
        int(settings.max_iter),
        device_ctx.device,
    )
    logger.info(format_sweep_table(result))
    top5 = f", top-5 {result['top5']:.2f}" if result["top5"] is not None else ""
    logger.info(
        f"logistic regression (C={result['best_c']:.3g}) on {len(split.val_labels)} val images: "
        f"top-1 {result['top1']:.2f}{top5}"
    )
    summary = dict(
        protocol=dict(
            split.protocol,
            method="multinomial logistic regression, L-BFGS",
            c_values=c_values,
            holdout_fraction=float(settings.holdout_fraction),
            max_iter=int(settings.max_iter),
        ),
        num_train=len(split.train_labels),
        num_val=len(split.val_labels),
        num_classes=split.num_classes,
        **result,
    )
    path = os.path.join(cfg.output_dir, "logreg_results.json")
    write_json_atomic(summary, path)
    logger.info(f"results written to {path}")
    barrier()
    return summary
