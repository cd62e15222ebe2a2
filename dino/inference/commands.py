"""What the `dino` subcommands do with their composed config (the CLI in dino/cli.py only parses flags)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dino.errors import UserError
from dino.log import get_logger

logger = get_logger(__name__)


def _load_model(model_cfg, device_ctx):
    from dino.eval.features import load_eval_backbone

    return load_eval_backbone(model_cfg, device_ctx)


def _image_sizes(resize_size, crop_size: int) -> tuple[int, int]:
    resize = int(resize_size) if resize_size else int(round(crop_size * 256 / 224))
    return resize, int(crop_size)


PRECISIONS = ("fp32", "bf16", "int8", "int8_static")


def prepare_fast_model(model, precision: str, compile_model: bool, device_ctx, calibration=None, copy: bool = True):
    """The inference copy for a precision; returns (model, input dtype).

    fp32 | bf16 (weights) | int8 (dynamic activation ranges, CPU) | int8_static (CPU; activation ranges fixed
    by `calibration`: a batch of images, or the ranges stored by an earlier run as `fast.int8_ranges` gives them).
    `copy=False`: build it from `model` itself (no second copy of the weights; `model` is not usable afterwards).
    """
    from dino.inference.fast import load_int8_ranges, optimize_for_inference

    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    int8 = precision.startswith("int8")
    if int8 and device_ctx.type != "cpu":
        raise UserError(
            f"--precision {precision} (int8 quantisation) runs on the CPU only; use --device cpu or --precision bf16"
        )
    if precision == "int8_static" and calibration is None:
        raise UserError("--precision int8_static needs calibration images")
    dtype = torch.bfloat16 if precision == "bf16" else None
    images = calibration if isinstance(calibration, torch.Tensor) else None
    fast = optimize_for_inference(
        model.cpu() if int8 else model,
        dtype=dtype,
        int8=int8,
        compile=compile_model,
        device=device_ctx.device,
        calibration_images=images if precision == "int8_static" else None,
        copy=copy,
    )
    if precision == "int8_static" and images is None:
        try:
            load_int8_ranges(fast, calibration)
        except ValueError as error:  # grids stored for another model
            raise UserError(
                f"the stored int8_static ranges do not fit this model ({error}); use another --output_dir"
            ) from None
    return fast, fast.input_dtype


def _calibration_batch(paths: list[str], transform, count: int) -> torch.Tensor:
    """Up to `count` readable images from the start of `paths`, transformed like the images to embed."""
    from dino.data.datasets import CorruptImageError
    from dino.data.transforms import load_image_for, min_decode_side

    images = []
    for path in paths:
        if len(images) == count:
            break
        try:
            images.append(transform(load_image_for(path, min_decode_side(transform))))
        except CorruptImageError:
            continue  # listed as skipped by the extraction itself
    if not images:
        raise UserError("no readable image to calibrate int8_static on")
    return torch.stack(images)


def run_extract(cfg) -> dict:
    from dino.distributed import DeviceContext
    from dino.inference.extract import EvalTransform, ExtractionSettings, extract_features_to_folder, list_input_images

    if not cfg.data.source:
        raise UserError("no images given: pass --source FOLDER_OR_LIST")
    paths = list_input_images(cfg.data.source)
    device_ctx = DeviceContext.create(cfg.device)
    model = _load_model(cfg.model, device_ctx)
    resize, crop = _image_sizes(cfg.data.resize_size, cfg.data.crop_size)
    if crop % model.patch_size:
        raise UserError(f"--crop_size {crop} is not a multiple of the patch size {model.patch_size}")
    transform = EvalTransform(resize, crop)  # make_eval_transform's tensors without importing torchvision
    from dino.inference.extract import weights_fingerprint

    # `dino search` embeds new queries with the weights named in meta.json: the fingerprint lets it notice
    # when another file has since taken that path (wrong neighbours otherwise, and no error)
    extra_meta = dict(
        model=OmegaConf.to_container(cfg.model),
        resize_size=resize,
        crop_size=crop,
        precision=cfg.precision,
        weights_fingerprint=weights_fingerprint(model),
    )
    calibration, cosine = None, None
    if cfg.precision == "int8_static":
        stored = _stored_int8_ranges(cfg.output_dir)  # resuming: keep the grids the finished chunks were made with
        calibration = (
            stored if stored is not None else _calibration_batch(paths, transform, int(cfg.calibration_images))
        )
    # the inference copy is built from the loaded model itself (no second copy of the weights in memory), except
    # where int8_static compares it with the fp32 model below
    keep_source = cfg.precision == "int8_static" and isinstance(calibration, torch.Tensor)
    fast, input_dtype = prepare_fast_model(
        model, cfg.precision, bool(cfg.compile), device_ctx, calibration, copy=keep_source
    )
    if not keep_source:
        del model
    if cfg.precision == "int8_static":
        from dino.inference.fast import feature_cosine, int8_ranges

        extra_meta["int8_ranges"] = int8_ranges(fast)
        if isinstance(calibration, torch.Tensor):
            sample = calibration[:16]
            cosine = feature_cosine(model.cpu().eval(), fast, sample)
            logger.info(
                f"int8_static: calibrated on {len(calibration)} images; [CLS] cosine vs fp32 on {len(sample)} of them: "
                f"min {cosine:.4f}"
            )
    settings = ExtractionSettings(
        features=cfg.features,
        normalize=bool(cfg.normalize),
        batch_size=int(cfg.data.batch_size),
        num_workers=int(cfg.data.num_workers),
        chunk_size=int(cfg.chunk_size),
        output_format=cfg.output_format,
        progress=bool(cfg.progress),
        extra_meta=extra_meta,
    )
    summary = extract_features_to_folder(
        fast, paths, cfg.output_dir, transform, crop, settings, device=device_ctx.device, input_dtype=input_dtype
    )
    if cosine is not None:
        summary["int8_cosine_on_calibration"] = cosine
    return summary


def _stored_int8_ranges(output_dir) -> list | None:
    """int8 grids of an interrupted int8_static extraction in `output_dir`, if it wrote any."""
    import json

    path = os.path.join(output_dir, "settings.json")  # written before the first chunk
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle).get("int8_ranges")


def _query_paths(queries) -> list[str]:
    from dino.inference.extract import list_input_images

    paths = []
    for query in queries:
        if os.path.isdir(query) or str(query).lower().endswith(".txt"):
            paths.extend(list_input_images(query))
        elif os.path.isfile(query):
            paths.append(os.path.abspath(query))
        else:
            raise UserError(f"query does not exist: {query}")
    if not paths:
        raise UserError("no query images: pass --queries IMAGE [IMAGE ...]")
    return paths


def _embed_new_queries(paths: list[str], meta: dict, cfg) -> np.ndarray:
    """Features of query images that are not in the index, computed like the indexed ones (settings in meta.json)."""
    import tempfile

    from dino.distributed import DeviceContext
    from dino.inference.extract import EvalTransform, ExtractionSettings, extract_features_to_folder, load_extracted

    if "model" not in meta:
        raise UserError("the features folder has no meta.json with the model; only images already in it can be queried")
    from dino.inference.extract import weights_fingerprint

    device_ctx = DeviceContext.create(cfg.device)
    model = _load_model(OmegaConf.create(meta["model"]), device_ctx)
    recorded = meta.get("weights_fingerprint")
    if recorded is not None and weights_fingerprint(model) != recorded:
        source = meta["model"].get("pretrained_weights") or "the official release"
        raise UserError(
            f"the weights at {source} are not those the features in {cfg.features_dir} were extracted with "
            f"(fingerprint {weights_fingerprint(model)} ≠ {recorded}); put the original file back, or "
            "extract the features again with these weights"
        )
    # int8_static: the query goes through the grids the indexed images went through
    fast, input_dtype = prepare_fast_model(
        model, meta.get("precision", "fp32"), False, device_ctx, meta.get("int8_ranges"), copy=False
    )
    stored = meta["settings"]
    settings = ExtractionSettings(
        features=stored["features"],
        normalize=stored["normalize"],
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        progress=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = extract_features_to_folder(
            fast,
            paths,
            tmp,
            EvalTransform(meta["resize_size"], meta["crop_size"]),
            meta["crop_size"],
            settings,
            device=device_ctx.device,
            input_dtype=input_dtype,
        )
        if summary["num_skipped"]:
            raise UserError(f"cannot read query image(s): {', '.join(summary['skipped'])}")
        features, _, _ = load_extracted(tmp)
    return features


def _check_search_settings(cfg) -> None:
    """Values `dino search` would otherwise accept silently (k = 0: no neighbours) or fail on late."""
    problems = []
    for key, minimum in (("k", 1), ("pq_m", 1), ("nprobe", 1), ("batch_size", 1), ("num_workers", 0)):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"--{key} must be an integer ≥ {minimum}, got {value!r}")
    nlist = cfg.get("nlist")
    if nlist is not None and (isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1):
        problems.append(f"nlist must be null or an integer ≥ 1, got {nlist!r}")
    from dino.config_validation import output_dir_problem

    if problem := output_dir_problem(str(cfg.output_dir), "--output_dir"):
        problems.append(problem)
    if problems:
        raise UserError("; ".join(problems))


def run_search(cfg) -> dict:
    from dino.inference.extract import load_extracted
    from dino.inference.search import build_index, search, write_contact_sheet_html, write_contact_sheet_png

    _check_search_settings(cfg)
    features, paths, meta = load_extracted(cfg.features_dir)
    query_paths = _query_paths(list(cfg.queries))
    position = {p: i for i, p in enumerate(paths)}
    known = [p for p in query_paths if p in position]
    new = [p for p in query_paths if p not in position]
    query_features = {p: features[position[p]] for p in known}
    if new:
        query_features.update(zip(new, _embed_new_queries(new, meta, cfg)))
    queries = np.stack([query_features[p] for p in query_paths])
    index = build_index(features, cfg.index, nlist=cfg.nlist, pq_m=int(cfg.pq_m), nprobe=int(cfg.nprobe))
    scores, ids = search(index, queries, int(cfg.k))
    results = [
        [(paths[j], float(s)) for s, j in zip(row_scores, row_ids) if j >= 0]
        for row_scores, row_ids in zip(scores, ids)
    ]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            [
                {"query": q, "neighbours": [{"path": p, "similarity": s} for p, s in r]}
                for q, r in zip(query_paths, results)
            ],
            indent=2,
        )
    )
    sheets = []
    if cfg.contact_sheet in ("html", "both"):
        sheets.append(str(write_contact_sheet_html(query_paths, results, out / "contact_sheet.html")))
    if cfg.contact_sheet in ("png", "both"):
        sheets.append(str(write_contact_sheet_png(query_paths, results, out / "contact_sheet.png")))
    return dict(
        results=results, queries=query_paths, output_dir=str(out), contact_sheets=sheets, index=type(index).__name__
    )


def run_duplicates(cfg) -> dict:
    from dino.inference.extract import load_extracted
    from dino.inference.search import near_duplicates, write_duplicates_csv

    threshold = cfg.threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise UserError(f"--threshold must be a number, got {threshold!r}")
    features, paths, meta = load_extracted(cfg.features_dir)
    normalized = bool(meta.get("settings", {}).get("normalize", True))
    # with L2-normalised rows (the default) the inner product is a cosine: a threshold outside [-1, 1] either
    # lists nothing (7) or every pair (-2), silently
    if normalized and not -1.0 <= float(threshold) <= 1.0:
        raise UserError(
            f"--threshold {threshold} is not a cosine similarity: choose a value in [-1, 1] "
            "(e.g. 0.95 for near-duplicates)"
        )
    pairs = near_duplicates(features, float(threshold))
    csv = write_duplicates_csv(pairs, paths, cfg.output)
    return dict(
        num_pairs=len(pairs),
        output=str(csv),
        pairs=[(paths[p.first], paths[p.second], round(p.similarity, 6)) for p in pairs[:20]],
    )


def _export_image_size(cfg, fmt: str) -> int | None:
    """--image_size (top-level `image_size`): for onnx the traced example size (default `onnx.image_size`), for
    hf the size the position embedding is baked for (None: the stored grid's)."""
    size = cfg.get("image_size")
    if fmt == "onnx":
        return int(size if size is not None else cfg.onnx.image_size)
    return None if size is None else int(size)


def run_export(cfg) -> dict:
    from dino.distributed import DeviceContext

    fmt = cfg.format
    output = cfg.output or f"output/export/model.{fmt}"  # a folder for hf
    _check_export_target(cfg, fmt, output)  # before loading the model: a refused export costs nothing
    model = _load_model(cfg.model, DeviceContext.create("cpu")).float().eval()
    result: dict = dict(format=fmt, output=output)
    image_size = _export_image_size(cfg, fmt)
    if fmt == "onnx":
        p = model.patch_size
        from dino.inference.export.onnx import export_onnx, uses_rope, verify_onnx

        if uses_rope(model) and not hasattr(model, "blocks"):
            result["input_sizes"] = "any batch, height and width (the ConvNeXt's own graph)"
        else:
            result["input_sizes"] = (
                f"any batch; height and width ≥ {p}, cropped at the bottom and right to multiples of the patch size {p}"
            )
        export_onnx(model, output, image_size=image_size, opset=int(cfg.onnx.opset))
        if cfg.verify:
            result["max_abs_diff"] = _verify_if_installed("onnxruntime", lambda: verify_onnx(model, output, image_size))
    elif fmt == "gguf":
        from dino.inference.export.gguf import check_gguf_supported, export_gguf, verify_gguf

        check_gguf_supported(model)
        try:
            export_gguf(model, output, ftype=cfg.gguf.ftype, qkv_layout=cfg.gguf.qkv_layout)
        except ImportError:
            raise UserError("GGUF export needs the gguf package: pip install 'dino[gguf]'") from None
        if cfg.verify:
            result["tensors_verified"] = verify_gguf(
                model, output, ftype=cfg.gguf.ftype, qkv_layout=cfg.gguf.qkv_layout
            )
    elif fmt == "hf":
        from dino.inference.export.hf import export_hf, verify_hf

        export_hf(model, output, image_size=image_size)
        if cfg.verify:
            check = _verify_if_installed("transformers", lambda: verify_hf(model, output, image_size=image_size))
            if check is None:
                result["max_abs_diff"] = None
            else:
                result.update(
                    max_abs_diff=check["max_abs_diff"], max_abs_diff_by_size=check["sizes"], note=check["note"]
                )
                logger.info(f"hf export: {check['note']}")
    else:
        raise UserError(f"unknown export format {fmt!r}; choose onnx, gguf or hf")
    return result


def _check_export_target(cfg, fmt: str, output: str) -> None:
    """Refuse what would fail late or destroy something: an existing output (unless `overwrite`), a folder
    where a file goes (or the reverse), a non-positive --image_size."""
    problems = []
    overwrite = bool(cfg.get("overwrite", False))
    target = Path(output).expanduser()
    wants_folder = fmt == "hf"
    if target.exists() or target.is_symlink():
        if wants_folder and not target.is_dir():
            problems.append(f"--output {target} is a file; the hf format writes a folder")
        elif not wants_folder and target.is_dir():
            problems.append(
                f"--output {target} is a folder; the {fmt} format writes one file (e.g. {target / ('model.' + fmt)})"
            )
        elif not overwrite:
            problems.append(f"--output {target} already exists; choose another path, or pass --overwrite to replace it")
    else:
        from dino.config_validation import output_dir_problem

        parent_problem = output_dir_problem(str(target.parent), "the folder of --output")
        if parent_problem:
            problems.append(parent_problem)
    size = cfg.get("image_size")
    if fmt == "onnx" and size is None:
        size = cfg.onnx.image_size
    if fmt in ("onnx", "hf") and size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        problems.append(f"--image_size must be a positive integer (a multiple of the patch size), got {size!r}")
    if problems:
        raise UserError("; ".join(problems))


def _verify_if_installed(package: str, verify):
    try:
        __import__(package)
    except ImportError:
        logger.warning(f"{package} is not installed: the export was written but not verified")
        return None
    return verify()
