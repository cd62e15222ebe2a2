"""Copy detection on Copydays "strong", with DINO v1's protocol (`eval_copy_detection.py`).

Dataset (Jégou et al., INRIA Copydays), as distributed:

    <data_path>/original/NNNNNN.jpg   the 157 original photos (the database)
    <data_path>/strong/NNNNNN.jpg     the 229 strongly attacked copies (the queries)

A strong copy's positives are the originals whose file names share its first four characters (the photo
series).  Optional: `distractors_path`, a folder of images added to the database (DINO v1: 10k random
YFCC100M images), and `whitening_path`, a folder of images on which the PCA-whitening is learned (DINO v1:
20k other YFCC100M images).

Protocol (DINO v1):

- images resized to `imsize` × `imsize` (bicubic, aspect not kept; DINO v1 uses 320), ImageNet-normalised;
- feature = [CLS] ‖ GeM(p = 4) of the patch tokens of the last block (both after the final LayerNorm),
  GeM(x) = (mean over patches of max(x, 1e-6)^4)^(1/4) per channel;
- PCA-whitening learned on the whitening set (see `learn_whitening`), applied to queries and database, then
  L2 normalisation.  **Without a whitening set DINO v1 does not whiten** (features are only L2-normalised);
  that is our default too.  `whiten_on_database` learns the whitening on the database (originals +
  distractors) instead, a fallback that DINO v1 does not have;
- cosine similarity; DINO v1 scores only the `top` = 20 best database images of each query;
- AP of each query by the trapezoid rule (`dino.eval.retrieval.compute_ap`, identical to the Holidays
  `score_ap_from_ranks_1` DINO v1 uses), divided by the number of positives; mAP = mean over all queries.

DINO v1 also evaluates the jpegqual/ and crops/ blocks when they exist; only "strong" is reported here (it is
the one the paper reports).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from dino.errors import UserError, require_path
from dino.eval.retrieval import compute_ap, crop_to_patch_multiple, rank_database
from dino.log import get_logger

logger = get_logger(__name__)

GEM_POWER = 4.0
GEM_EPS = 1e-6
# the eigenvalue floor of DINO v1's PCA: eigenvalues below max(λ)·1e-5 are raised to it
EIGENVALUE_FLOOR = 1e-5
DEFAULT_TOP = 20
# DINO v1's default backbone for this evaluation
DEFAULT_ARCH, DEFAULT_PATCH_SIZE = "vit_base", 8


# ------------------------------------------------------------------------------------------- dataset


def list_jpegs(folder: str) -> list[str]:
    """Sorted names of the .jpg files in `folder` (not recursive, as the Copydays layout is flat)."""
    from dino.data.datasets import list_images

    return [os.path.basename(p) for p in list_images(folder, recursive=False, extensions=(".jpg", ".jpeg"))]


def strong_positives(original_names: Sequence[str], strong_names: Sequence[str]) -> list[np.ndarray]:
    """For every strong copy, the indices of the originals whose names share its first 4 characters."""
    return [
        np.asarray([j for j, original in enumerate(original_names) if original[:4] == query[:4]], dtype=np.int64)
        for query in strong_names
    ]


@dataclass
class CopydaysData:
    root: str
    original_names: list[str]
    strong_names: list[str]

    @property
    def original_paths(self) -> list[str]:
        return [os.path.join(self.root, "original", n) for n in self.original_names]

    @property
    def strong_paths(self) -> list[str]:
        return [os.path.join(self.root, "strong", n) for n in self.strong_names]

    @property
    def positives(self) -> list[np.ndarray]:
        return strong_positives(self.original_names, self.strong_names)


def load_copydays(data_path: str) -> CopydaysData:
    """Read and validate `<data_path>/original/*.jpg` and `<data_path>/strong/*.jpg`.

    A missing or empty folder, or a strong copy without any original of its series, is a UserError naming it.
    """
    root = require_path(data_path, "--data_path", must_be_dir=True)
    for block in ("original", "strong"):
        folder = os.path.join(root, block)
        if not os.path.isdir(folder):
            raise UserError(
                f"Copydays folder {folder} does not exist (expected <data_path>/original/*.jpg and <data_path>/strong/*.jpg)"
            )
    names = {}
    for block in ("original", "strong"):
        folder = os.path.join(root, block)
        names[block] = list_jpegs(folder)
        if not names[block]:
            raise UserError(f"Copydays folder {folder} holds no .jpg images")
    data = CopydaysData(root, names["original"], names["strong"])
    orphans = [name for name, positives in zip(data.strong_names, data.positives) if positives.size == 0]
    if orphans:
        raise UserError(
            f"{len(orphans)} strong copies have no original sharing their first 4 characters in "
            f"{os.path.join(root, 'original')}: {', '.join(orphans[:5])}"
        )
    return data


class ImagePaths(Dataset):
    """(transform(image), index) for a list of image files."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from dino.data.datasets import load_image

        return self.transform(load_image(self.paths[index])), index


def make_copydays_transform(imsize: int):
    """Square bicubic resize to imsize × imsize and ImageNet normalisation (DINO v1)."""
    from torchvision import transforms

    from dino.data.transforms import BICUBIC, make_normalize

    return transforms.Compose([transforms.Resize((imsize, imsize), interpolation=BICUBIC), make_normalize()])


# ------------------------------------------------------------------------------------------ features


def gem_pool(patch_tokens: Tensor, p: float = GEM_POWER, eps: float = GEM_EPS) -> Tensor:
    """Generalised mean over the patches: (mean_n max(x_n, eps)^p)^(1/p), per channel; (B, N, D) → (B, D)."""
    return patch_tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def copydays_feature(model: nn.Module, images: Tensor) -> Tensor:
    """[CLS] ‖ GeM(p=4) of the last block's patch tokens, both after the final norm: (B, 2D)."""
    images = crop_to_patch_multiple(images, model.patch_size)
    ((patch_tokens, cls_token),) = model.get_intermediate_layers(images, n=1, return_class_token=True, norm=True)
    return torch.cat((cls_token.float(), gem_pool(patch_tokens.float())), dim=1)


# ------------------------------------------------------------------------------------------ whitening


@dataclass
class PCAWhitening:
    """x ↦ P (x − mean), with P = diag(λ^−power) Vᵀ (rows sorted by decreasing eigenvalue)."""

    mean: Tensor
    projection: Tensor

    def apply(self, features: Tensor) -> Tensor:
        return (features.double() - self.mean) @ self.projection.T


def learn_whitening(features: Tensor, power: float = 0.5, eigenvalue_floor: float = EIGENVALUE_FLOOR) -> PCAWhitening:
    """Learn DINO v1's PCA-whitening on a set of features (n, D).

    mean = mean of the features; C = XᵀX / n — note: DINO v1 takes the second-moment matrix of the
    **uncentred** features here, while it subtracts the mean before projecting; we do the same so the
    operator is DINO v1's.  C = V diag(λ) Vᵀ; eigenvalues below max(λ)·1e-5 are raised to that floor (so
    rank-deficient sets stay finite); P = diag(λ^−power) Vᵀ, all D components kept (power 0.5 = whitening).
    Computed in float64.
    """
    x = features.double()
    if x.shape[0] < 2:
        raise UserError(f"cannot learn a whitening from {x.shape[0]} image(s)")
    mean = x.mean(dim=0)
    second_moment = x.T @ x / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    floor = eigenvalues.max() * eigenvalue_floor
    eigenvalues = torch.where(eigenvalues < floor, floor, eigenvalues)
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    projection = torch.diag(eigenvalues.pow(-power)) @ eigenvectors.T
    return PCAWhitening(mean, projection)


# ----------------------------------------------------------------------------------------- evaluation


def copy_detection_map(ranking: np.ndarray, positives: Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
    """mAP over queries; ranking (top, n_queries) holds database indices, best first.

    AP_q = compute_ap(positions of q's positives in its ranking, |positives_q|) — positives outside the
    scored top count as not found (DINO v1 scores the top 20).
    """
    ranking = np.asarray(ranking)
    aps = np.zeros(len(positives))
    for q, query_positives in enumerate(positives):
        positions = np.flatnonzero(np.isin(ranking[:, q], query_positives))
        aps[q] = compute_ap(positions, len(query_positives))
    return float(aps.mean()), aps


def _model_config_with_default(model_cfg: Any) -> Any:
    """Without weights and arch, evaluate DINO v1's default for this protocol (the official ViT-B/8)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(model_cfg, resolve=True)
    if not values.get("pretrained_weights") and not values.get("arch") and not values.get("patch_size"):
        values.update(arch=DEFAULT_ARCH, patch_size=DEFAULT_PATCH_SIZE)
    return OmegaConf.create(values)


def run_copy_detection(cfg: Any) -> dict:
    """Extract features, whiten, rank and score Copydays strong; print a table and write
    `<output_dir>/copy_detection.json`.  Returns the results dict."""
    from dino.data.datasets import list_images
    from dino.distributed import DeviceContext, barrier, init_distributed, is_main_process
    from dino.eval.features import extract_features, load_eval_backbone
    from dino.eval.tables import print_table, write_json

    if not cfg.data_path:
        raise UserError("--data_path is required: the Copydays folder holding original/ and strong/")
    data = load_copydays(cfg.data_path)
    extra_sets: dict[str, list[str]] = {}
    for key, flag in (("distractors_path", "--distractors_path"), ("whitening_path", "--whitening_path")):
        if cfg[key]:
            folder = require_path(cfg[key], f"{flag} folder", must_be_dir=True)
            extra_sets[key] = list_images(folder)
            if not extra_sets[key]:
                raise UserError(f"{flag} folder {folder} holds no images")
    distractor_paths = extra_sets.get("distractors_path", [])
    whitening_paths = extra_sets.get("whitening_path", [])

    device_ctx = DeviceContext.create(cfg.device, precision=str(cfg.precision))
    init_distributed(device_ctx.backend)
    model = load_eval_backbone(_model_config_with_default(cfg.model), device_ctx)
    transform = make_copydays_transform(int(cfg.imsize))

    def features_of(paths: list[str], desc: str) -> Tensor:
        features, _ = extract_features(
            model,
            ImagePaths(paths, transform),
            device_ctx,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            feature_fn=copydays_feature,
            desc=desc,
        )
        return features

    if whitening_paths:
        whitening_source = f"{len(whitening_paths)} images of {cfg.whitening_path}"
    elif cfg.whiten_on_database:
        whitening_source = "the database (originals + distractors)"
    else:
        whitening_source = "none (no whitening set, as DINO v1)"
    logger.info(
        f"copy detection on Copydays strong: {len(data.strong_names)} queries, {len(data.original_names)} originals "
        f"+ {len(distractor_paths)} distractors; [CLS] + GeM(p=4) patch tokens at {cfg.imsize}x{cfg.imsize}; "
        f"whitening: {whitening_source}; AP over the top {cfg.top}"
    )

    queries = features_of(data.strong_paths, "query features")
    database = features_of(data.original_paths + distractor_paths, "database features")
    whitening = None
    if whitening_paths:
        whitening = learn_whitening(features_of(whitening_paths, "whitening features"))
    elif cfg.whiten_on_database:
        whitening = learn_whitening(database)
    if whitening is not None:
        queries, database = whitening.apply(queries), whitening.apply(database)
    queries = F.normalize(queries.float(), dim=1)
    database = F.normalize(database.float(), dim=1)

    ranking = rank_database(database, queries, cfg.ranking, top=int(cfg.top))
    mean_ap, aps = copy_detection_map(ranking, data.positives)
    results = {
        "units": "percent",
        "results": {"strong": {"mAP": 100.0 * mean_ap}},
        "protocol": {
            "feature": "[CLS] + GeM(p=4) patch tokens",
            "imsize": int(cfg.imsize),
            "queries": len(data.strong_names),
            "originals": len(data.original_names),
            "distractors": len(distractor_paths),
            "whitening": whitening_source,
            "top": int(cfg.top),
            "pretrained_weights": cfg.model.pretrained_weights or "official",
        },
        "per_query_ap": {name: 100.0 * float(ap) for name, ap in zip(data.strong_names, aps)},
        "top1_correct": int(sum(ranking[0, q] in p for q, p in enumerate(data.positives))),
    }
    if is_main_process():
        print_table(
            ["block", "queries", "database", "mAP"],
            [["strong", len(data.strong_names), database.shape[0], 100.0 * mean_ap]],
            title="Copydays copy detection (percent)",
        )
        path = write_json(os.path.join(cfg.output_dir, "copy_detection.json"), results)
        logger.info(f"results written to {path}")
    barrier()
    return results
