"""Attention maps, thresholding, PCA maps, image helpers and the visualize_attention / visualize_pca scripts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.errors import UserError
from dino.eval.visualization import (
    attention_figure_for_tensorboard,
    cls_attention_maps,
    colorize,
    demo_image,
    head_mean_heatmaps,
    image_to_tensor,
    make_grid,
    overlay,
    overlay_mask,
    patch_feature_grids,
    patch_token_norms,
    pca_feature_maps,
    pca_figure_for_tensorboard,
    resize_to_patch_multiple,
    target_size,
    tensor_to_image,
    threshold_attention,
)
from dino.hub import save_backbone
from dino.models import build_backbone

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=64, num_heads=4, depth=2)


def load_script(name: str):
    """Import a top-level script (visualize_attention.py, ...) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(num_register_tokens: int = 0, sharpen: float = 1.0, seed: int = 0):
    """A 2-block ViT; `sharpen` scales the last block's q/k weights so its attention is far from uniform."""
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", 16, num_register_tokens=num_register_tokens, **TINY).eval()
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight[: 2 * TINY["embed_dim"]].mul_(sharpen)
        if model.register_tokens is not None:
            model.register_tokens.normal_(std=1.0)
    return model


# ------------------------------------------------------------------------------------------ attention


def test_last_selfattention_is_a_distribution_over_tokens():
    model = tiny_model(num_register_tokens=2, sharpen=20.0)
    attention = model.get_last_selfattention(torch.randn(2, 3, 32, 48))
    assert attention.shape == (2, 4, 1 + 2 + 6, 1 + 2 + 6)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 9))


@pytest.mark.parametrize("height,width", [(32, 32), (32, 64), (48, 32)])
def test_cls_attention_maps_have_the_patch_grid_shape(height, width):
    model = tiny_model(sharpen=20.0)
    images = torch.randn(2, 3, height, width)
    maps = cls_attention_maps(model, images)
    h, w = height // 16, width // 16
    assert maps.shape == (2, 4, h, w)
    assert (maps >= 0).all()
    # patch (i, j) is token 1 + i * w + j: rows of the map follow rows of the image
    attention = model.get_last_selfattention(images)
    torch.testing.assert_close(maps[:, :, 1, 0], attention[:, :, 0, 1 + w])
    # with the [CLS] self-attention the row is a full softmax row again
    torch.testing.assert_close(maps.sum((-2, -1)) + attention[:, :, 0, 0], torch.ones(2, 4))


def test_cls_attention_maps_exclude_register_tokens():
    model = tiny_model(num_register_tokens=4, sharpen=20.0)
    images = torch.randn(1, 3, 32, 48)
    maps = cls_attention_maps(model, images)
    attention = model.get_last_selfattention(images)
    assert maps.shape == (1, 4, 2, 3) and maps[0, 0].numel() == 6
    torch.testing.assert_close(maps.flatten(-2), attention[:, :, 0, 5:])
    with_registers = attention[:, :, 0, 1:7]  # what ignoring the registers would wrongly take
    assert not torch.allclose(maps.flatten(-2), with_registers)


def test_cls_attention_maps_reject_sizes_off_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        cls_attention_maps(tiny_model(), torch.randn(1, 3, 30, 32))


def test_patch_features_and_norms_have_grid_shapes():
    model = tiny_model(num_register_tokens=4)
    images = torch.randn(2, 3, 32, 48)
    grids = patch_feature_grids(model, images)
    assert len(grids) == 2 and grids[0].shape == (2, 3, 64)
    tokens = model.forward_features(images)["x_norm_patchtokens"]
    torch.testing.assert_close(grids[1][1, 2], tokens[1, 5])
    assert patch_token_norms(model, images).shape == (2, 2, 3)


# ------------------------------------------------------------------------------------------ threshold


@pytest.mark.parametrize("keep_fraction", [0.05, 0.3, 0.6, 0.9, 1.0])
def test_threshold_keeps_the_smallest_set_holding_the_fraction(keep_fraction):
    generator = torch.Generator().manual_seed(1)
    attention = torch.rand(5, 40, generator=generator) ** 3  # skewed, not normalised
    masks = threshold_attention(attention, keep_fraction)
    assert masks.dtype == torch.bool and masks.shape == attention.shape
    mass = attention.double() / attention.double().sum(-1, keepdim=True)
    for row_mass, mask in zip(mass, masks):
        kept = row_mass[mask]
        assert kept.sum() >= keep_fraction - 1e-12
        assert kept.sum() - kept.min() < keep_fraction  # minimal: dropping the smallest kept patch falls short
        assert (~mask).sum() == 0 or kept.min() >= row_mass[~mask].max()  # the largest patches are the ones kept


def test_threshold_exact_boundary_and_scale_invariance():
    attention = torch.tensor([[0.25, 0.5, 0.25]])
    assert threshold_attention(attention, 0.75).tolist() == [[True, True, False]]
    assert threshold_attention(attention, 0.76).tolist() == [[True, True, True]]
    assert threshold_attention(attention * 7, 0.75).tolist() == [[True, True, False]]
    with pytest.raises(ValueError):
        threshold_attention(attention, 0.0)


def test_head_mean_heatmaps():
    maps = torch.rand(2, 4, 3, 5)
    heat = head_mean_heatmaps(maps)
    assert heat.shape == (2, 3, 5) and heat.amin() == 0 and heat.amax() == 1
    shares = head_mean_heatmaps(maps, keep_fraction=0.5)
    assert set(torch.unique(shares * 4).tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


# ------------------------------------------------------------------------------------------ PCA


def synthetic_grid(
    height: int, width: int, box: tuple[int, int, int, int], rng: np.random.Generator, dim: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """Patch features: background one cluster, a box of foreground patches another, made of two parts.

    The parts differ less from each other than the object from the background, as object parts do.
    """
    background, foreground = rng.normal(size=(2, dim)) * 3
    part_offset = rng.normal(size=dim)
    foreground_left, foreground_right = foreground + part_offset, foreground - part_offset
    features = background + 0.1 * rng.normal(size=(height, width, dim))
    mask = np.zeros((height, width), dtype=bool)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = True
    middle = (left + right) // 2
    features[top:bottom, left:middle] = foreground_left + 0.1 * rng.normal(size=(bottom - top, middle - left, dim))
    features[top:bottom, middle:right] = foreground_right + 0.1 * rng.normal(size=(bottom - top, right - middle, dim))
    return features, mask


def test_pca_separates_foreground_from_background():
    rng = np.random.default_rng(0)
    # the box covers most of the first image: the sign rule must still call the border background
    first, first_mask = synthetic_grid(8, 8, (1, 1, 7, 7), rng)
    second, second_mask = synthetic_grid(6, 10, (2, 3, 5, 7), rng)
    # the same object in both images: take the second image's clusters from the first one
    second[second_mask] = first[first_mask][: second_mask.sum()]
    maps = pca_feature_maps([torch.from_numpy(first), second], fg_threshold=0.5)
    np.testing.assert_array_equal(maps.foreground[0], first_mask)
    np.testing.assert_array_equal(maps.foreground[1], second_mask)
    assert maps.rgb[0].shape == (8, 8, 3) and maps.rgb[1].shape == (6, 10, 3)
    for rgb, mask in zip(maps.rgb, (first_mask, second_mask)):
        assert (rgb[~mask] == 0).all()  # background black
        assert rgb.min() >= 0 and rgb.max() <= 1
    # the two parts of the object get clearly different colours
    left, right = maps.rgb[0][3, 2], maps.rgb[0][3, 5]
    assert np.abs(left - right).max() > 0.5
    assert maps.first_component[0][first_mask].min() > maps.first_component[0][~first_mask].max()


def test_pca_sign_rule_is_independent_of_the_feature_sign():
    rng = np.random.default_rng(3)
    features, mask = synthetic_grid(7, 7, (2, 2, 5, 5), rng)
    for sign in (1.0, -1.0):
        maps = pca_feature_maps([sign * features])
        np.testing.assert_array_equal(maps.foreground[0], mask)


def test_pca_without_background_removal_colours_every_patch():
    rng = np.random.default_rng(4)
    features, _ = synthetic_grid(6, 6, (1, 1, 5, 5), rng)
    maps = pca_feature_maps([features], remove_background=False)
    assert maps.foreground[0].all()
    assert (maps.rgb[0].sum(-1) > 0).mean() > 0.9


# ------------------------------------------------------------------------------------------ images


def test_target_size_rounds_to_patch_multiples():
    assert target_size(100, 50, 16) == (96, 48)
    assert target_size(100, 50, 14, 224) == (448, 224)
    assert target_size(100, 50, 16, (44, 70)) == (64, 48)
    assert target_size(5, 5, 16) == (16, 16)
    resized = resize_to_patch_multiple(demo_image((50, 70)), 16, 32)
    assert resized.size == (48, 32)


def test_image_helpers_produce_pil_images():
    image = demo_image((32, 48), seed=2)
    assert image.size == (48, 32) and image.mode == "RGB"
    restored = tensor_to_image(image_to_tensor(image))
    assert np.abs(np.asarray(restored, dtype=int) - np.asarray(image, dtype=int)).max() <= 1
    heat = colorize(np.arange(6.0).reshape(2, 3), "viridis")
    assert heat.size == (3, 2)
    assert np.asarray(heat)[0, 0].tolist() == [68, 1, 84] and np.asarray(heat)[1, 2].tolist() == [253, 231, 37]
    assert overlay(image, np.random.rand(2, 3)).size == image.size
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, 0] = True
    masked = np.asarray(overlay_mask(image, mask, color=(255, 0, 0), alpha=1.0))
    assert masked[5, 5].tolist() == [255, 0, 0]
    assert np.array_equal(masked[25, 40], np.asarray(image)[25, 40])
    grid = make_grid([image, image, image], columns=2, padding=2)
    assert grid.size == (2 * 48 + 3 * 2, 2 * 32 + 3 * 2)


# ------------------------------------------------------------------------------------------ tensorboard


def test_tensorboard_figures(tmp_path):
    model = tiny_model(num_register_tokens=4).train()
    images = torch.randn(2, 3, 32, 48)
    attention = attention_figure_for_tensorboard(model, images, max_heads=2)
    assert attention.dtype == torch.uint8 and attention.shape[0] == 3
    assert attention.shape[1] == 2 * 32 + 3 * 2 and attention.shape[2] == 4 * 48 + 5 * 2  # input, mean, 2 heads
    pca = pca_figure_for_tensorboard(model, images)
    assert pca.dtype == torch.uint8 and pca.shape == (3, 2 * 32 + 3 * 2, 2 * 48 + 3 * 2)
    assert model.training  # mode restored

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        writer.add_image("attention", attention, 0)
        writer.add_image("pca", pca, 0)
    assert any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ scripts


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "backbone.pth"
    kwargs = dict(TINY, num_register_tokens=4)
    save_backbone(tiny_model(num_register_tokens=4), path, dict(arch="vit_tiny", patch_size=16, **kwargs))
    return str(path)


def test_visualize_attention_writes_pngs(tmp_path, saved_backbone):
    image_path = tmp_path / "photo.jpg"
    demo_image((40, 70)).save(image_path)
    out = tmp_path / "out"
    written = load_script("visualize_attention").main(
        [
            "--image_path",
            str(image_path),
            "--pretrained_weights",
            saved_backbone,
            "--image_size",
            "32",
            "48",
            "--threshold",
            "0.6",
            "--output_dir",
            str(out),
            "--device",
            "cpu",
        ]
    )
    names = {Path(p).name for p in written}
    expected = {f"attn-head{i}.png" for i in range(4)} | {f"attn-mask-head{i}.png" for i in range(4)}
    assert expected | {"attn-overlay-grid.png", "input.png", "patch-norms.png"} == names
    for name in names:
        assert (out / name).is_file()
    with Image.open(out / "attn-head0.png") as head:
        assert head.format == "PNG" and head.size == (48, 32)


def test_visualize_attention_uses_a_demo_image_without_image_path(tmp_path, saved_backbone):
    written = load_script("visualize_attention").main(
        ["--pretrained_weights", saved_backbone, "--image_size", "32", "--output_dir", str(tmp_path), "--device", "cpu"]
    )
    assert (tmp_path / "attn-overlay-grid.png").is_file()
    assert not any("mask" in p for p in written)


def test_visualize_attention_rejects_missing_and_non_image_files(tmp_path, saved_backbone):
    script = load_script("visualize_attention")
    with pytest.raises(UserError, match="does not exist"):
        script.main(["--image_path", str(tmp_path / "missing.jpg"), "--pretrained_weights", saved_backbone])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not pixels")
    with pytest.raises(UserError, match="cannot read image"):
        script.main(["--image_path", str(not_an_image), "--pretrained_weights", saved_backbone])
    with pytest.raises(UserError, match="threshold"):
        script.main(["--threshold", "1.5", "--pretrained_weights", saved_backbone])


def test_visualize_pca_writes_grid_and_maps(tmp_path, saved_backbone):
    paths = []
    for seed, size in enumerate([(32, 48), (48, 32)]):
        paths.append(tmp_path / f"image{seed}.png")
        demo_image(size, seed=seed).save(paths[-1])
    out = tmp_path / "out"
    load_script("visualize_pca").main(
        [
            "--image_paths",
            *map(str, paths),
            "--pretrained_weights",
            saved_backbone,
            "--image_size",
            "32",
            "--output_dir",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert {p.name for p in out.iterdir()} == {"pca-grid.png", "pca-0.png", "pca-1.png"}
    with Image.open(out / "pca-1.png") as second:
        assert second.size == (32, 48)
    with pytest.raises(UserError, match="does not exist"):
        load_script("visualize_pca").main(
            ["--image_paths", str(tmp_path / "nope.png"), "--pretrained_weights", saved_backbone]
        )
