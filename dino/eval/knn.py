"""Weighted k-nearest-neighbour classification of frozen features (the k-NN protocol of DINO v1 / DINOv2).

Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination"), as used by
DINO v1's `eval_knn.py`: with L2-normalised features, a test image x looks at its k most similar training
images x_j (cosine similarity s_j = x·x_j) and each neighbour votes for its class with weight exp(s_j / T):

    score(c) = Σ_{j in top-k} exp(s_j / T) · [y_j = c],        prediction = argmax_c score(c)

T = 0.07 and k ∈ {10, 20, 100, 200} are the papers' settings.  Top-1 / top-5 are the percentages of test
images whose label is the best / among the five best scores.  DINOv2 normalises the same weights with a
softmax over the neighbours, which divides every score of a test image by one constant: same ranking.

The similarity matrix of an ImageNet-size bank (1.28 M training images) does not fit in memory at once, so
test images are processed in chunks sized to keep the chunk × bank block within a memory budget.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dino.config_validation import output_dir_problem
from dino.distributed import DeviceContext, barrier, init_distributed, is_main_process
from dino.errors import UserError
from dino.eval.accuracy import topk_hits
from dino.eval.checkpointing import write_json_atomic
from dino.eval.features import features_from_config
from dino.log import get_logger

logger = get_logger(__name__)

# Elements of one (test chunk × training bank) similarity block: 2**28 float32 values = 1 GiB.
DEFAULT_SIMILARITY_BUDGET = 2**28


def default_chunk_size(num_train: int, budget_elements: int = DEFAULT_SIMILARITY_BUDGET) -> int:
    """Test images per chunk so that chunk × num_train similarities stay within `budget_elements`."""
    return max(1, budget_elements // max(1, num_train))


def _validate(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise UserError(
            f"k-NN needs 2-D feature matrices, got {tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise UserError("k-NN needs at least one training and one test feature")
    if train_features.shape[1] != test_features.shape[1]:
        raise UserError(
            f"train features have dimension {train_features.shape[1]} but test features {test_features.shape[1]}"
        )
    if train_labels.shape[0] != train_features.shape[0] or test_labels.shape[0] != test_features.shape[0]:
        raise UserError("every feature needs exactly one label")
    if int(train_labels.min()) < 0:
        raise UserError("k-NN needs labelled training images (found negative labels: an unlabelled dataset?)")


def clip_k_values(k_values: Sequence[int], num_train: int) -> dict[int, int]:
    """Requested k → k actually used: at most the number of training features (with a warning)."""
    clipped = {}
    for k in k_values:
        if int(k) < 1:
            raise UserError(f"k must be at least 1, got {k}")
        clipped[int(k)] = min(int(k), num_train)
        if int(k) > num_train:
            warnings.warn(f"k={k} is larger than the {num_train} training features; using k={num_train}", stacklevel=3)
    return clipped


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k_values: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[int, tuple[float, float | None]]:
    """Weighted k-NN accuracy: {k: (top-1 %, top-5 %)}; top-5 is None with fewer than 5 classes.

    Features are L2-normalised here (cosine similarity).  `chunk_size` test images are compared with the
    whole bank at once (default: `default_chunk_size`).  A k larger than the bank is clipped with a warning
    (the result is still keyed by the requested k).  `device`: where to compute (default: where the
    training features are); the bank is moved there once.
    """
    _validate(train_features, train_labels, test_features, test_labels)
    if temperature <= 0:
        raise UserError(f"the k-NN temperature must be positive, got {temperature}")
    device = torch.device(device) if device is not None else train_features.device
    num_train = train_features.shape[0]
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    used_k = clip_k_values(k_values, num_train)
    max_k = max(used_k.values())
    chunk_size = chunk_size or default_chunk_size(num_train)
    num_top = min(5, num_classes)

    bank = F.normalize(train_features.to(device, torch.float32), dim=1)
    bank_labels = train_labels.to(device, torch.long)
    top1_correct = {k: 0 for k in used_k}
    top5_correct = {k: 0 for k in used_k}
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].to(device, torch.float32), dim=1)
        targets = test_labels[start : start + chunk_size].to(device, torch.long)
        similarity = queries @ bank.T  # (chunk, num_train)
        top_sim, top_index = similarity.topk(max_k, dim=1)  # sorted, most similar first
        neighbour_labels = bank_labels[top_index]  # (chunk, max_k)
        # exp((s - s_max)/T) = exp(s/T) / exp(s_max/T): one constant per test image, so the class ranking is
        # that of exp(s/T), and small temperatures cannot overflow float32
        weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)
        for requested, k in used_k.items():
            scores = torch.zeros(queries.shape[0], num_classes, device=device)
            scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            top1_hits, top5_hits = topk_hits(scores, targets, (1, num_top)).tolist()
            top1_correct[requested] += top1_hits
            top5_correct[requested] += top5_hits
    num_test = test_features.shape[0]
    return {
        k: (100.0 * top1_correct[k] / num_test, 100.0 * top5_correct[k] / num_test if num_classes >= 5 else None)
        for k in used_k
    }


def format_knn_table(results: dict[int, tuple[float, float | None]]) -> str:
    """A small text table: one row per k with top-1 and top-5 (%)."""
    lines = [f"{'k':>6}  {'top-1':>7}  {'top-5':>7}"]
    for k, (top1, top5) in results.items():
        lines.append(f"{k:>6}  {top1:>7.2f}  {top5:>7.2f}" if top5 is not None else f"{k:>6}  {top1:>7.2f}  {'-':>7}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the protocol


def run_knn(cfg) -> dict:
    """The k-NN evaluation a config describes (configs/eval/knn.yaml); returns the summary written to JSON.

    Loads the backbone and the `<data_path>/{train,val}` ImageFolders (or `--load_features`), extracts
    normalised [CLS] features (all ranks), classifies on rank 0, prints a table and writes
    `<output_dir>/knn_results.json`.
    """
    try:  # key=value overrides arrive unconverted: `knn.nb_knn=[ten]` is a user error, not a traceback
        k_values = [int(k) for k in cfg.knn.nb_knn]
        temperature = float(cfg.knn.temperature)
    except (TypeError, ValueError):
        raise UserError(
            f"--nb_knn needs integers and --temperature a number, got {list(cfg.knn.nb_knn)!r} "
            f"and {cfg.knn.temperature!r}"
        ) from None
    # everything the user can get wrong is checked before minutes (or hours) of feature extraction
    problems = []
    if not k_values:
        problems.append("--nb_knn needs at least one k")
    bad_k = [k for k in k_values if k < 1]
    if bad_k:
        problems.append(f"--nb_knn values must be at least 1, got {', '.join(map(str, bad_k))}")
    if temperature <= 0:
        problems.append(f"--temperature must be positive, got {temperature}")
    for what, folder in (("--output_dir", cfg.output_dir), ("--dump_features", cfg.dump_features)):
        if folder and (problem := output_dir_problem(str(folder), what)):
            problems.append(problem)
    if problems:
        raise UserError("; ".join(problems))
    device_ctx = DeviceContext.create(cfg.device, precision=str(cfg.precision))
    init_distributed(device_ctx.backend)
    if is_main_process():
        logger.info(f"k-NN protocol: weighted votes exp(cos/T), T={temperature}, k={k_values}")
    split = features_from_config(cfg, device_ctx)
    if not is_main_process():
        barrier()
        return {}

    results = knn_classify(
        split.train_features,
        split.train_labels,
        split.val_features,
        split.val_labels,
        k_values,
        temperature,
        num_classes=split.num_classes,
        device=device_ctx.device,
    )
    skipped = split.protocol.get("skipped_val", 0)
    logger.info(
        f"weighted k-NN (T={temperature}) on {len(split.train_labels)} train / {len(split.val_labels)} val images, "
        f"{split.num_classes} classes" + (f" ({skipped} unreadable val image(s) skipped)" if skipped else "")
    )
    logger.info(format_knn_table(results))
    summary = dict(
        protocol=dict(split.protocol, k=k_values, temperature=temperature, weights="exp(cos/T)"),
        num_train=len(split.train_labels),
        num_val=len(split.val_labels),
        num_classes=split.num_classes,
        num_skipped_train=split.protocol.get("skipped_train", 0),
        num_skipped_val=split.protocol.get("skipped_val", 0),
        results={str(k): dict(top1=top1, top5=top5) for k, (top1, top5) in results.items()},
    )
    path = os.path.join(cfg.output_dir, "knn_results.json")
    write_json_atomic(summary, path)
    logger.info(f"results written to {path}")
    barrier()
    return summary
