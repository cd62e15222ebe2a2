"""Video object segmentation by label propagation with frozen patch features (DINO v1 `eval_video_segmentation.py`).

The first frame's annotation is given.  For every later frame t:

1. patch features of the last block (after the final norm) are extracted and L2-normalised;
2. the context is the first frame plus the `n_last_frames` most recent frames, with their (soft) labels at
   patch resolution — the first frame's one-hot annotation, then the propagated, not arg-maxed, labels;
3. affinity of every target patch q to every context patch s: a_qs = exp(⟨f_q, f_s⟩ / 0.1), set to 0 when s
   lies outside the (2r+1)×(2r+1) window around q's grid position (r = `size_mask_neighborhood`, 0: no
   window);
4. top-k sparsification over all context patches of all context frames: affinities below the k-th largest
   are zeroed, the rest divided by their sum — a softmax with temperature 0.1 restricted to the top k
   (ties at the k-th value are all kept, as in DINO v1);
5. target labels = Σ_s a_qs · labels_s (C channels at patch resolution);
6. for the output: bilinear upsampling by the patch size, per-channel min-max normalisation (DINO v1's
   `norm_mask`), arg-max, nearest-neighbour resize to the original frame size, palette PNG.

Frames are resized as DINO v1 reads them: the shorter side to `frame_size` (480) and the longer side to
frame_size·aspect rounded down to a multiple of 64, bilinear without antialiasing (OpenCV's INTER_LINEAR),
normalised with mean (0.485, 0.456, 0.406) and DINO v1's video std (0.228, 0.224, 0.225).  The first
annotation is shrunk to the patch grid with nearest-neighbour resampling.

Differences to DINO v1, all confined to cases DAVIS does not contain: void (255) pixels of the first
annotation are read as background instead of becoming a 256th channel; square frames use the same size rule
as the annotation (DINO v1 swaps the 64-rounding between frame and annotation there); a channel that is
constant and positive after propagation is set to 1 instead of nan by the min-max normalisation.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dino.errors import UserError
from dino.eval.davis import VOID_LABEL, DavisSequence, read_label_png, write_label_png
from dino.log import get_logger

logger = get_logger(__name__)

AFFINITY_TEMPERATURE = 0.1
VIDEO_MEAN = (0.485, 0.456, 0.406)
VIDEO_STD = (0.228, 0.224, 0.225)  # DINO v1's video script uses 0.228 (not 0.229) for red
SIZE_MULTIPLE = 64
# target patches processed at once; bounds the (context patches × targets) affinity block in memory
_MAX_AFFINITY_ELEMENTS = 64 * 2**20


# ------------------------------------------------------------------------------------------- frames


def frame_size_for(height: int, width: int, short_side: int = 480) -> tuple[int, int]:
    """(H', W') DINO v1 resizes a frame to: shorter side = short_side, longer side scaled and rounded down
    to a multiple of 64."""
    if short_side < SIZE_MULTIPLE:
        raise UserError(
            f"frame size {short_side} is below {SIZE_MULTIPLE}; the longer side is rounded to a multiple of {SIZE_MULTIPLE}"
        )
    if height > width:
        return int((short_side * height / width) // SIZE_MULTIPLE * SIZE_MULTIPLE), short_side
    return short_side, int((short_side * width / height) // SIZE_MULTIPLE * SIZE_MULTIPLE)


def read_frame(path: str, short_side: int = 480) -> tuple[Tensor, int, int]:
    """(normalised frame (3, H', W'), original height, original width)."""
    from dino.data.datasets import load_image

    image = load_image(path)
    original_height, original_width = image.height, image.width
    target = frame_size_for(original_height, original_width, short_side)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    # bilinear with half-pixel centres and no antialiasing = OpenCV INTER_LINEAR, rounded to 8 bit like cv2's output
    resized = F.interpolate(pixels[None], size=target, mode="bilinear", align_corners=False, antialias=False)[0]
    resized = resized.round().clamp(0, 255) / 255.0
    mean = torch.tensor(VIDEO_MEAN).view(3, 1, 1)
    std = torch.tensor(VIDEO_STD).view(3, 1, 1)
    return (resized - mean) / std, original_height, original_width


def first_frame_labels(
    annotation: np.ndarray, frame_shape: tuple[int, int], patch_size: int, num_objects: int
) -> Tensor:
    """One-hot (1 + num_objects, h, w) labels of the first annotation on the patch grid of a frame of
    `frame_shape` (nearest-neighbour shrink; void pixels as background)."""
    height, width = frame_shape
    grid = (width // patch_size, height // patch_size)  # PIL wants (width, height)
    small = np.array(Image.fromarray(annotation).resize(grid, Image.NEAREST))
    small = np.where(small == VOID_LABEL, 0, small).astype(np.int64)
    one_hot = F.one_hot(torch.from_numpy(small), num_classes=num_objects + 1)
    return one_hot.permute(2, 0, 1).float()


# ------------------------------------------------------------------------------------------- features


def patch_features(model: nn.Module, frame: Tensor) -> tuple[Tensor, int, int]:
    """(L2-normalised last-block patch tokens (h·w, D), h, w) of one frame (3, H, W) already on the device."""
    patch_size = model.patch_size
    height, width = frame.shape[-2:]
    h, w = height // patch_size, width // patch_size
    # DINO v1's stride-p convolution ignores the last H mod p rows / W mod p columns; cropping is the same
    cropped = frame[None, :, : h * patch_size, : w * patch_size]
    (tokens,) = model.get_intermediate_layers(cropped, n=1, reshape=False, norm=True)
    return F.normalize(tokens[0].float(), dim=-1, p=2), h, w


# ------------------------------------------------------------------------------------------ propagation


def neighbourhood_mask(
    h: int, w: int, radius: int, targets: Tensor | None = None, device: torch.device | None = None
) -> Tensor:
    """(h·w sources, len(targets)) boolean: source within the (2r+1)×(2r+1) window around each target."""
    positions = torch.arange(h * w, device=device)
    targets = positions if targets is None else targets
    rows, cols = positions // w, positions % w
    return ((rows[:, None] - (targets // w)[None]).abs() <= radius) & (
        (cols[:, None] - (targets % w)[None]).abs() <= radius
    )


def propagate_labels(
    target_features: Tensor,
    context_features: Sequence[Tensor],
    context_labels: Sequence[Tensor],
    h: int,
    w: int,
    topk: int = 5,
    size_mask_neighborhood: int = 12,
    temperature: float = AFFINITY_TEMPERATURE,
) -> Tensor:
    """Soft labels (C, h, w) of a target frame from its context frames (DINO v1 `label_propagation`).

    target_features: (h·w, D) L2-normalised; context_features: M tensors (h·w, D), L2-normalised;
    context_labels: M tensors (C, h, w).  For each target patch q,

        a_qs = exp(⟨f_q, f_s⟩ / T) · [s in q's window],   kept only when ≥ the k-th largest a_q·,
        labels_q = Σ_s a_qs labels_s / Σ_s a_qs.
    """
    sources = torch.cat([f for f in context_features], dim=0)  # (M·N, D), frame-major like DINO v1
    labels = torch.cat([frame.reshape(frame.shape[0], -1) for frame in context_labels], dim=1)  # (C, M·N)
    num_context, num_targets = len(context_features), target_features.shape[0]
    k = min(topk, sources.shape[0])
    chunk = max(1, _MAX_AFFINITY_ELEMENTS // max(1, sources.shape[0]))
    outputs = []
    for start in range(0, num_targets, chunk):
        targets = torch.arange(start, min(start + chunk, num_targets), device=sources.device)
        affinity = torch.exp(sources @ target_features[targets].T / temperature)  # (M·N, chunk)
        if size_mask_neighborhood > 0:
            window = neighbourhood_mask(h, w, size_mask_neighborhood, targets, device=sources.device)
            affinity = affinity * window.repeat(num_context, 1)
        kth_largest = torch.topk(affinity, k=k, dim=0).values.min(dim=0).values
        affinity = torch.where(affinity < kth_largest, torch.zeros_like(affinity), affinity)
        affinity = affinity / affinity.sum(dim=0, keepdim=True)
        outputs.append(labels @ affinity)
    return torch.cat(outputs, dim=1).reshape(labels.shape[0], h, w)


def normalise_channels(labels: Tensor) -> Tensor:
    """DINO v1's `norm_mask`: every channel with a positive maximum is min-max scaled to [0, 1]."""
    result = labels.clone()
    for c in range(labels.shape[0]):
        channel = labels[c]
        if channel.max() > 0:
            shifted = channel - channel.min()
            peak = shifted.max()
            result[c] = shifted / peak if peak > 0 else torch.ones_like(channel)
    return result


def labels_to_mask(soft_labels: Tensor, patch_size: int, original_size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) soft labels → uint8 label map at the original (height, width)."""
    upsampled = F.interpolate(
        soft_labels[None], scale_factor=patch_size, mode="bilinear", align_corners=False, recompute_scale_factor=False
    )[0]
    hard = normalise_channels(upsampled).argmax(dim=0).to(torch.uint8).cpu().numpy()
    height, width = original_size
    return np.array(Image.fromarray(hard).resize((width, height), Image.NEAREST))


@torch.inference_mode()
def segment_video(
    model: nn.Module,
    frame_paths: Sequence[str],
    first_annotation: np.ndarray,
    device: torch.device,
    n_last_frames: int = 7,
    size_mask_neighborhood: int = 12,
    topk: int = 5,
    frame_size: int = 480,
    autocast=None,
    progress: bool = True,
    desc: str = "",
) -> list[np.ndarray]:
    """Label maps (original size, uint8) of every frame; the first is the given annotation."""
    from contextlib import nullcontext

    from tqdm import tqdm

    autocast = autocast or nullcontext
    annotation = np.where(first_annotation == VOID_LABEL, 0, first_annotation)
    num_objects = int(annotation.max())
    first_frame, _, _ = read_frame(frame_paths[0], frame_size)
    with autocast():
        first_features, h, w = patch_features(model, first_frame.to(device))
    first_labels = first_frame_labels(
        first_annotation, tuple(first_frame.shape[-2:]), model.patch_size, num_objects
    ).to(device)
    if first_labels.shape[-2:] != (h, w):
        raise RuntimeError(f"annotation grid {tuple(first_labels.shape[-2:])} differs from the feature grid {(h, w)}")
    recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=max(0, n_last_frames))
    masks = [first_annotation]
    for path in tqdm(frame_paths[1:], desc=desc or "frames", disable=not progress, dynamic_ncols=True, leave=False):
        frame, original_height, original_width = read_frame(path, frame_size)
        with autocast():
            features, fh, fw = patch_features(model, frame.to(device))
        if (fh, fw) != (h, w):
            raise UserError(f"{path} has a different size from the first frame of its sequence")
        context = [(first_features, first_labels)] + list(recent)
        soft = propagate_labels(
            features, [c[0] for c in context], [c[1] for c in context], h, w, topk, size_mask_neighborhood
        )
        if n_last_frames > 0:
            recent.append((features, soft))
        masks.append(labels_to_mask(soft.float(), model.patch_size, (original_height, original_width)))
    return masks


# ------------------------------------------------------------------------------------------------ run


def write_sequence_predictions(
    sequence: DavisSequence, masks: Sequence[np.ndarray], output_dir: str, palette: list[int] | None
) -> None:
    """`<output_dir>/<sequence>/<frame>.png` for every frame, the DAVIS results layout."""
    folder = os.path.join(output_dir, sequence.name)
    for path, mask in zip(sequence.frame_paths, masks):
        write_label_png(os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + ".png"), mask, palette)


def run_video_segmentation(cfg: Any) -> dict:
    """Propagate the first-frame labels of every sequence of the split (unless `eval_only`), then score the
    predictions with the DAVIS metrics; print a table and write `<output_dir>/davis_results.json` plus the
    official evaluation's CSV files.  Returns the results dict."""
    from dino.distributed import DeviceContext, barrier, get_rank, get_world_size, init_distributed, is_main_process
    from dino.eval.davis import GLOBAL_MEASURES, evaluate_davis, load_davis, write_davis_csv
    from dino.eval.features import load_eval_backbone
    from dino.eval.tables import print_table, write_json

    if not cfg.data_path:
        raise UserError(
            "--data_path is required: the DAVIS-2017 folder holding JPEGImages/, Annotations/ and ImageSets/"
        )
    sequences = load_davis(cfg.data_path, cfg.split, need_frames=not cfg.eval_only)
    output_dir = cfg.output_dir
    if not cfg.eval_only:
        device_ctx = DeviceContext.create(cfg.device, precision=str(cfg.precision))
        init_distributed(device_ctx.backend)
        model = load_eval_backbone(cfg.model, device_ctx)
        logger.info(
            f"label propagation on DAVIS {cfg.split}: {len(sequences)} sequences; last-block patch features "
            f"(patch {model.patch_size}), frames at {cfg.frame_size}p, n_last_frames {cfg.n_last_frames}, "
            f"size_mask_neighborhood {cfg.size_mask_neighborhood}, topk {cfg.topk}"
        )
        rank, world_size = get_rank(), get_world_size()
        for index, sequence in enumerate(sequences):
            if index % world_size != rank:  # sequences are independent: each rank takes every W-th one
                continue
            annotation_path = os.path.join(
                os.path.dirname(sequence.annotation_paths[0]),
                os.path.splitext(os.path.basename(sequence.frame_paths[0]))[0] + ".png",
            )
            first_annotation, palette = read_label_png(annotation_path)
            masks = segment_video(
                model,
                sequence.frame_paths,
                first_annotation,
                device_ctx.device,
                int(cfg.n_last_frames),
                int(cfg.size_mask_neighborhood),
                int(cfg.topk),
                int(cfg.frame_size),
                autocast=device_ctx.autocast,
                progress=is_main_process(),
                desc=f"[{index + 1}/{len(sequences)}] {sequence.name}",
            )
            write_sequence_predictions(sequence, masks, output_dir, palette)
        barrier()
    results: dict = {}
    if is_main_process():
        scores = evaluate_davis(cfg.data_path, output_dir, cfg.split)
        results = {
            "units": "fraction",
            "results": scores["global"],
            "per_object": scores["per_object"],
            "protocol": {
                "split": cfg.split,
                "sequences": scores["num_sequences"],
                "objects": scores["num_objects"],
                "eval_only": bool(cfg.eval_only),
                "n_last_frames": int(cfg.n_last_frames),
                "size_mask_neighborhood": int(cfg.size_mask_neighborhood),
                "topk": int(cfg.topk),
                "frame_size": int(cfg.frame_size),
                "pretrained_weights": None if cfg.eval_only else (cfg.model.pretrained_weights or "official"),
            },
        }
        print_table(
            list(GLOBAL_MEASURES),
            [[scores["global"][m] for m in GLOBAL_MEASURES]],
            title=f"DAVIS-2017 {cfg.split} ({scores['num_objects']} objects)",
            decimals=3,
        )
        path = write_json(os.path.join(output_dir, "davis_results.json"), results)
        write_davis_csv(scores, output_dir, cfg.split)
        logger.info(f"results written to {path}")
    barrier()
    return results
