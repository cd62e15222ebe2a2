"""Image retrieval on the revisited Oxford and Paris benchmarks (revisitop), with DINO v1's protocol.

Dataset (Radenović et al., "Revisiting Oxford and Paris", CVPR 2018), as distributed:

    <data_path>/<roxford5k|rparis6k>/jpg/<name>.jpg
    <data_path>/<roxford5k|rparis6k>/gnd_<dataset>.pkl   dict with 'imlist', 'qimlist' and 'gnd', one dict per
                                                          query: 'bbx' [x1, y1, x2, y2], 'easy', 'hard', 'junk'
                                                          (0-based indices into imlist)

Metrics follow the official revisitop `compute_map` exactly: junk images are removed from the ranking (the
positions of the positives move up by the number of junk images ranked before them), AP is the trapezoid
rule over the precision-recall curve, a query without positives gets AP nan and is left out of the mean,
and precision@k divides by min(k, position of the last positive).

Features follow DINO v1's `eval_image_retrieval.py`:

- every image is shrunk with PIL's thumbnail so its longer side is at most `imsize` (aspect kept, never
  enlarged), then ImageNet-normalised; batch size 1 because the sizes differ;
- the feature is the backbone's normalised [CLS] token, L2-normalised;
- multi-scale (`multiscale`): the [CLS] features of the image at scales 1, 1/√2 and 1/2 (bilinear resize
  of the normalised tensor) are **averaged** and the mean is L2-normalised — DINO v1's combination, i.e.
  GeM with p = 1, not a p > 1 power mean;
- queries are the **full** query images by default, as in DINO v1 (which never crops them); the revisitop
  protocol crops them to their `bbx`, which `crop_queries` enables.  Numbers with and without the crop are
  not comparable;
- ranking by cosine similarity (torch, or a FAISS inner-product index when faiss is installed).

A ViT needs inputs that are a multiple of its patch size; DINO v1's patch-embedding convolution silently
drops the last H mod p rows and W mod p columns, so cutting the top-left multiple of p gives the same
features (see `crop_to_patch_multiple`).
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from dino.errors import UserError, require_path
from dino.eval.neighbours import exact_search, faiss_available
from dino.log import get_logger

logger = get_logger(__name__)

REVISITOP_DATASETS = ("roxford5k", "rparis6k")
PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)
# DINO v1's multi-scale set
MULTISCALE_FACTORS = (1.0, 1.0 / math.sqrt(2.0), 0.5)


# ------------------------------------------------------------------------------------------- metrics


def compute_ap(ranks_of_positives: Sequence[int], n_positives: int) -> float:
    """Average precision of one query by the trapezoid rule (revisitop `compute_ap`, Holidays package).

    ranks_of_positives: sorted 0-based positions r_0 < r_1 < … of the retrieved positives in the ranking
    (junk already removed); n_positives: number of positives of the query in the whole database.

        AP = Σ_j ½ (P0_j + P1_j) / n_positives,   P0_j = j / r_j (1 when r_j = 0),   P1_j = (j + 1) / (r_j + 1)

    i.e. each positive adds a trapezoid of width 1/n_positives between the precision just before and just
    after it.  Positives missing from a truncated ranking add nothing.
    """
    if n_positives <= 0:
        raise ValueError("compute_ap needs at least one positive")
    recall_step = 1.0 / n_positives
    ap = 0.0
    for j, rank in enumerate(ranks_of_positives):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_after = (j + 1) / (rank + 1)
        ap += (precision_before + precision_after) * recall_step / 2.0
    return ap


class RetrievalScores(NamedTuple):
    """mAP, per-query APs (nan for queries without positives), mP@k per kappa, per-query P@k (nq × len(kappas))."""

    map: float
    aps: np.ndarray
    mp_at_k: np.ndarray
    p_at_k: np.ndarray


def positions_without_junk(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in `ranking` after the junk images are taken out of it.

    A positive at position p moves up by the number of junk images ranked strictly before it (revisitop).
    """
    positive_positions = np.flatnonzero(np.isin(ranking, positives))
    junk_positions = np.flatnonzero(np.isin(ranking, junk))
    return positive_positions - np.searchsorted(junk_positions, positive_positions, side="left")


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = DEFAULT_KAPPAS) -> RetrievalScores:
    """mAP and mean precision@k of a set of queries with revisitop's semantics.

    ranks: (n_db, n_queries) array; column q lists database indices from most to least similar to query q
    (it may be truncated to the top rows).  gnd[q]: {'ok': positive indices, 'junk': ignored indices}.

    - AP per query by `compute_ap` on the junk-free positions, with n_positives = len(ok);
    - P@k = |{positives at 1-based position ≤ k'}| / k' with k' = min(k, position of the last positive):
      a query with fewer than k positives is not penalised for the missing ones;
    - queries with no positives get nan AP and P@k and are excluded from both means (nan when all are).
    A query none of whose positives appear in a truncated ranking scores AP 0 and P@k 0.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (n_db, n_queries={len(gnd)}), got shape {ranks.shape}")
    kappas = [int(k) for k in kappas]
    n_queries = len(gnd)
    aps = np.full(n_queries, np.nan)
    p_at_k = np.full((n_queries, len(kappas)), np.nan)
    for q in range(n_queries):
        positives = np.asarray(gnd[q].get("ok", []), dtype=np.int64).ravel()
        if positives.size == 0:
            continue  # revisitop: no positives → nan, skipped from the average
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64).ravel()
        positions = positions_without_junk(ranks[:, q], positives, junk)
        aps[q] = compute_ap(positions, len(positives))
        if positions.size == 0:
            p_at_k[q] = 0.0
            continue
        one_based = positions + 1
        for i, k in enumerate(kappas):
            cutoff = min(int(one_based.max()), k)
            p_at_k[q, i] = np.count_nonzero(one_based <= cutoff) / cutoff
    valid = ~np.isnan(aps)
    if not valid.any():
        return RetrievalScores(float("nan"), aps, np.full(len(kappas), np.nan), p_at_k)
    return RetrievalScores(float(aps[valid].mean()), aps, p_at_k[valid].mean(axis=0), p_at_k)


def protocol_ground_truth(gnd: Sequence[dict], protocol: str) -> list[dict]:
    """Positives ('ok') and ignored images ('junk') of every query under a revisitop protocol.

    easy:   ok = easy,          junk = junk + hard
    medium: ok = easy + hard,   junk = junk
    hard:   ok = hard,          junk = junk + easy
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")

    def ids(query: dict, key: str) -> np.ndarray:
        return np.asarray(query.get(key, []), dtype=np.int64).ravel()

    result = []
    for query in gnd:
        easy, hard, junk = ids(query, "easy"), ids(query, "hard"), ids(query, "junk")
        if protocol == "easy":
            result.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            result.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            result.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return result


def evaluate_protocols(
    ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> dict[str, RetrievalScores]:
    """`compute_map` under the Easy, Medium and Hard protocols; gnd holds the raw revisitop query dicts."""
    return {protocol: compute_map(ranks, protocol_ground_truth(gnd, protocol), kappas) for protocol in PROTOCOLS}


# ------------------------------------------------------------------------------------------- dataset


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles only builtins and numpy arrays: a ground-truth file never needs more, and refusing the
    rest means a tampered file cannot run code."""

    _ALLOWED = {
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "str"),
        ("builtins", "bytes"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_ground_truth(path: str) -> dict:
    """Read a revisitop `gnd_<dataset>.pkl` (Python-2 era pickles load with latin1 strings)."""
    try:
        with open(path, "rb") as handle:
            return _GroundTruthUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"cannot read the ground-truth file {path}: {err}") from None


@dataclass
class RevisitopData:
    """One revisitop dataset: database and query image names, their files, and the per-query ground truth."""

    name: str
    root: str
    db_names: list[str]
    query_names: list[str]
    gnd: list[dict]

    @property
    def images_dir(self) -> str:
        return os.path.join(self.root, "jpg")

    def image_path(self, name: str) -> str:
        return os.path.join(self.images_dir, name + ".jpg")

    @property
    def db_paths(self) -> list[str]:
        return [self.image_path(n) for n in self.db_names]

    @property
    def query_paths(self) -> list[str]:
        return [self.image_path(n) for n in self.query_names]

    @property
    def query_boxes(self) -> list[tuple[float, float, float, float] | None]:
        return [tuple(float(v) for v in q["bbx"]) if q.get("bbx") is not None else None for q in self.gnd]


def _dataset_folder(data_path: str, dataset: str) -> str:
    """`<data_path>/<dataset>`, or `data_path` itself when it already is the dataset folder."""
    inside = os.path.join(data_path, dataset)
    if not os.path.isdir(inside) and os.path.isfile(os.path.join(data_path, f"gnd_{dataset}.pkl")):
        return data_path
    return inside


def load_revisitop(data_path: str, dataset: str) -> RevisitopData:
    """Read and validate `<data_path>/<dataset>/gnd_<dataset>.pkl` and `<data_path>/<dataset>/jpg/*.jpg`.

    Every layout problem (unknown dataset name, missing folder, pkl or image, malformed ground truth) is a
    UserError naming what was expected where.
    """
    if dataset not in REVISITOP_DATASETS:
        from dino.errors import suggest

        raise UserError(
            f"unknown retrieval dataset {dataset!r}; choose one of {', '.join(REVISITOP_DATASETS)}."
            + suggest(dataset, REVISITOP_DATASETS)
        )
    data_path = require_path(data_path, "--data_path", must_be_dir=True)
    root = _dataset_folder(data_path, dataset)
    layout = f"expected <data_path>/{dataset}/jpg/*.jpg and <data_path>/{dataset}/gnd_{dataset}.pkl"
    if not os.path.isdir(root):
        raise UserError(f"dataset folder {root} does not exist ({layout})")
    gnd_path = os.path.join(root, f"gnd_{dataset}.pkl")
    if not os.path.isfile(gnd_path):
        raise UserError(f"ground-truth file {gnd_path} does not exist ({layout}; it comes with the revisitop download)")
    images_dir = os.path.join(root, "jpg")
    if not os.path.isdir(images_dir):
        raise UserError(f"image folder {images_dir} does not exist ({layout})")
    content = read_ground_truth(gnd_path)
    if not isinstance(content, dict) or not {"imlist", "qimlist", "gnd"} <= set(content):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise UserError(f"{gnd_path} should be a dict with 'imlist', 'qimlist' and 'gnd'; it holds {keys}")
    db_names, query_names, gnd = list(content["imlist"]), list(content["qimlist"]), list(content["gnd"])
    if len(gnd) != len(query_names):
        raise UserError(f"{gnd_path}: {len(query_names)} query names but {len(gnd)} ground-truth entries")
    for q, query in enumerate(gnd):
        missing_keys = [k for k in ("easy", "hard", "junk") if k not in query]
        if missing_keys:
            raise UserError(f"{gnd_path}: ground truth of query {q} ({query_names[q]}) lacks {missing_keys}")
        indices = np.concatenate([np.asarray(query[k], dtype=np.int64).ravel() for k in ("easy", "hard", "junk")])
        if indices.size and (indices.min() < 0 or indices.max() >= len(db_names)):
            raise UserError(
                f"{gnd_path}: query {q} refers to database index {int(indices.max())}, "
                f"but imlist has {len(db_names)} images"
            )
    data = RevisitopData(dataset, root, db_names, query_names, gnd)
    missing = [p for p in dict.fromkeys(data.db_paths + data.query_paths) if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{len(missing)} image(s) listed in {gnd_path} are missing: {', '.join(missing[:3])}{more}")
    return data


class RetrievalImages(Dataset):
    """Images shrunk as DINO v1 does, returned as (normalised tensor (3, H, W), index).

    Each image is optionally cropped to a box [x1, y1, x2, y2] (PIL semantics: coordinates rounded, the box
    clipped to the image), then shrunk with `PIL.Image.thumbnail((imsize, imsize), LANCZOS)`.
    """

    def __init__(self, paths: Sequence[str], imsize: int | None, boxes: Sequence[Sequence[float] | None] | None = None):
        self.paths = list(paths)
        self.imsize = imsize
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        from dino.data.transforms import make_normalize

        self.normalize = make_normalize()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        from dino.data.datasets import load_image

        image = load_image(self.paths[index])
        box = self.boxes[index]
        if box is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            x1, y1 = max(0, x1), max(0, y1)
            x2, y2 = min(image.width, x2), min(image.height, y2)
            if x2 > x1 and y2 > y1:  # a degenerate box keeps the full image rather than an empty crop
                image = image.crop((x1, y1, x2, y2))
        if self.imsize:
            image.thumbnail((self.imsize, self.imsize), Image.LANCZOS)
        return self.normalize(image), index


# ------------------------------------------------------------------------------------------ features


def crop_to_patch_multiple(images: Tensor, patch_size: int) -> Tensor:
    """Keep the top-left (H − H mod p) × (W − W mod p) pixels: what DINO v1's stride-p patch convolution
    reads anyway.  A side shorter than one patch is resized up to p (bilinear) so tiny crops still work."""
    height, width = images.shape[-2:]
    if height < patch_size or width < patch_size:
        images = F.interpolate(
            images, size=(max(height, patch_size), max(width, patch_size)), mode="bilinear", align_corners=False
        )
        height, width = images.shape[-2:]
    return images[..., : height - height % patch_size, : width - width % patch_size]


def make_retrieval_feature_fn(patch_size: int, multiscale: bool):
    """feature_fn(model, images) → L2-normalised [CLS] features (B, D), single- or multi-scale (DINO v1)."""

    def feature_fn(model: nn.Module, images: Tensor) -> Tensor:
        scales = MULTISCALE_FACTORS if multiscale else (1.0,)
        total = None
        for scale in scales:
            scaled = (
                images
                if scale == 1.0
                else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            )
            features = model(crop_to_patch_multiple(scaled, patch_size)).float()
            total = features if total is None else total + features
        return F.normalize(total / len(scales), dim=-1, p=2)

    return feature_fn


# ------------------------------------------------------------------------------------------- ranking


def rank_database(
    db_features: Tensor, query_features: Tensor, backend: str = "auto", top: int | None = None
) -> np.ndarray:
    """(n_db or top, n_queries) database indices sorted by decreasing cosine similarity to each query.

    Features are L2-normalised here, so the inner product is the cosine.  backend: 'torch', 'faiss' (an exact
    inner-product index) or 'auto' (faiss when installed).  Ties keep database order with torch
    (`dino.eval.neighbours.exact_search`).
    """
    if backend not in ("auto", "torch", "faiss"):
        raise UserError(f"unknown ranking backend {backend!r}; choose auto, torch or faiss")
    db = F.normalize(db_features.float(), dim=1)
    queries = F.normalize(query_features.float(), dim=1)
    top = db.shape[0] if top is None else min(int(top), db.shape[0])
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    if use_faiss:
        if not faiss_available():
            raise UserError("ranking backend 'faiss' asked for but faiss is not installed (pip install faiss-cpu)")
        import faiss

        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db.numpy())
        _, ids = index.search(queries.numpy(), top)
        return ids.T.astype(np.int64)
    _, ids = exact_search(db, queries, top)  # (n_queries, top)
    return ids.T.numpy()


# ---------------------------------------------------------------------------------------------- run


def _scores_as_dict(scores: RetrievalScores, kappas: Sequence[int]) -> dict[str, float]:
    """mAP and mP@k in percent, as revisitop prints them."""
    result = {"mAP": 100.0 * scores.map}
    result.update({f"mP@{k}": 100.0 * float(v) for k, v in zip(kappas, scores.mp_at_k)})
    return result


def run_retrieval(cfg: Any) -> dict:
    """Extract features, rank, score Easy / Medium / Hard; print a table and write
    `<output_dir>/retrieval_<dataset>.json`.  Returns the results dict (on every rank)."""
    from dino.data.datasets import list_images
    from dino.distributed import DeviceContext, barrier, init_distributed, is_main_process
    from dino.eval.features import extract_features, load_eval_backbone
    from dino.eval.tables import print_table, write_json

    if not cfg.data_path:
        raise UserError("--data_path is required: the folder that holds roxford5k/ or rparis6k/ (revisitop layout)")
    data = load_revisitop(cfg.data_path, cfg.dataset)
    distractor_paths: list[str] = []
    if cfg.distractors:
        distractors_dir = require_path(cfg.distractors, "--distractors folder", must_be_dir=True)
        distractor_paths = list_images(distractors_dir)
        if not distractor_paths:
            raise UserError(f"--distractors folder {distractors_dir} holds no images")

    device_ctx = DeviceContext.create(cfg.device, precision=str(cfg.precision))
    init_distributed(device_ctx.backend)
    model = load_eval_backbone(cfg.model, device_ctx)
    kappas = [int(k) for k in cfg.kappas]
    crop = bool(cfg.crop_queries)
    logger.info(
        f"retrieval on {data.name}: {len(data.db_names)} database images (+{len(distractor_paths)} distractors), "
        f"{len(data.query_names)} queries; [CLS] feature, thumbnail {cfg.imsize}px, "
        f"{'multi-scale (1, 1/√2, 1/2) mean' if cfg.multiscale else 'single scale'}, "
        f"queries {'cropped to their bbx' if crop else 'not cropped (DINO v1)'}"
    )

    feature_fn = make_retrieval_feature_fn(model.patch_size, bool(cfg.multiscale))
    db_set = RetrievalImages(data.db_paths + distractor_paths, cfg.imsize)
    query_set = RetrievalImages(data.query_paths, cfg.imsize, data.query_boxes if crop else None)
    # images differ in size, hence batch size 1 (as DINO v1)
    db_features, _ = extract_features(
        model,
        db_set,
        device_ctx,
        batch_size=1,
        num_workers=cfg.num_workers,
        feature_fn=feature_fn,
        desc="database features",
    )
    query_features, _ = extract_features(
        model,
        query_set,
        device_ctx,
        batch_size=1,
        num_workers=cfg.num_workers,
        feature_fn=feature_fn,
        desc="query features",
    )

    ranks = rank_database(db_features, query_features, cfg.ranking)
    per_protocol = evaluate_protocols(ranks, data.gnd, kappas)
    results = {
        "dataset": data.name,
        "units": "percent",
        "protocol": {
            "feature": "normalised [CLS], L2-normalised",
            "imsize": cfg.imsize,
            "multiscale": bool(cfg.multiscale),
            "crop_queries": crop,
            "database_images": len(data.db_names),
            "distractors": len(distractor_paths),
            "queries": len(data.query_names),
            "pretrained_weights": cfg.model.pretrained_weights or "official",
        },
        "results": {p: _scores_as_dict(s, kappas) for p, s in per_protocol.items()},
        "per_query_ap": {
            p: {name: (100.0 * ap if not math.isnan(ap) else None) for name, ap in zip(data.query_names, s.aps)}
            for p, s in per_protocol.items()
        },
    }
    if is_main_process():
        headers = ["protocol", "mAP"] + [f"mP@{k}" for k in kappas]
        rows = [[p.capitalize()] + list(results["results"][p].values()) for p in PROTOCOLS]
        print_table(headers, rows, title=f"{data.name} retrieval (percent)")
        path = write_json(os.path.join(cfg.output_dir, f"retrieval_{data.name}.json"), results)
        logger.info(f"results written to {path}")
    barrier()
    return results
