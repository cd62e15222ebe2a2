"""DINOv3 entry points and ConvNeXt students: every release's official key layout loads strictly (big sizes on the
meta device, never allocated), the URLs are the real ones (never fetched), ConvNeXt outputs equal an independent
reference, and the eval / extract / visualisation paths run on a tiny v3 checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hubconf
from dino.errors import UserError
from dino.hub import load_backbone, load_dinov3

ATOL = 1e-5

# the releases as FACTS.md / STATE-OF-THE-ART.md state them: D, depth, heads, ffn ('mlp' or SwiGLU hidden), qkv bias,
# local_cls_norm, expected key count
VIT_RELEASES = {
    "dinov3_vits16": (384, 12, 6, "mlp", True, False, 188),
    "dinov3_vits16plus": (384, 12, 6, 1536, True, False, 212),
    "dinov3_vitb16": (768, 12, 12, "mlp", True, False, 188),
    "dinov3_vitl16": (1024, 24, 16, "mlp", True, False, 368),
    "dinov3_vitl16plus": (1024, 24, 16, 4096, True, False, None),
    "dinov3_vith16plus": (1280, 32, 20, 5120, True, False, 552),
    "dinov3_vit7b16": (4096, 40, 32, 8192, False, True, 610),
}
CONVNEXT_RELEASES = {
    "dinov3_convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "dinov3_convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "dinov3_convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "dinov3_convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
URL_HASHES = {
    "dinov3_vits16": "08c60483",
    "dinov3_vits16plus": "4057cbaa",
    "dinov3_vitb16": "73cec8be",
    "dinov3_vitl16": "8aa4cbdd",
    "dinov3_vith16plus": "7c1da9a5",
    "dinov3_vit7b16": "a955f4ea",
    "dinov3_convnext_tiny": "21b726bb",
    "dinov3_convnext_small": "296db49d",
    "dinov3_convnext_base": "801f2ba9",
    "dinov3_convnext_large": "61fa432d",
}


def vit_layout(dim, depth, heads, ffn, qkv_bias, local_cls_norm, patch=16):
    """{key: shape} of an official DINOv3 ViT file, from the documented key list."""
    shapes = {
        "cls_token": (1, 1, dim),
        "storage_tokens": (1, 4, dim),
        "mask_token": (1, dim),
        "rope_embed.periods": (dim // heads // 4,),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if local_cls_norm:
        shapes.update({"local_cls_norm.weight": (dim,), "local_cls_norm.bias": (dim,)})
    for i in range(depth):
        p = f"blocks.{i}."
        for name in ("norm1", "norm2"):
            shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = (dim,)
        shapes[p + "attn.qkv.weight"] = (3 * dim, dim)
        if qkv_bias:
            shapes[p + "attn.qkv.bias"] = shapes[p + "attn.qkv.bias_mask"] = (3 * dim,)
        shapes[p + "attn.proj.weight"], shapes[p + "attn.proj.bias"] = (dim, dim), (dim,)
        shapes[p + "ls1.gamma"] = shapes[p + "ls2.gamma"] = (dim,)
        if ffn == "mlp":
            shapes.update(
                {
                    p + "mlp.fc1.weight": (4 * dim, dim),
                    p + "mlp.fc1.bias": (4 * dim,),
                    p + "mlp.fc2.weight": (dim, 4 * dim),
                    p + "mlp.fc2.bias": (dim,),
                }
            )
        else:
            shapes.update(
                {
                    p + "mlp.w1.weight": (ffn, dim),
                    p + "mlp.w1.bias": (ffn,),
                    p + "mlp.w2.weight": (ffn, dim),
                    p + "mlp.w2.bias": (ffn,),
                    p + "mlp.w3.weight": (dim, ffn),
                    p + "mlp.w3.bias": (dim,),
                }
            )
    return shapes


def convnext_layout(depths, dims):
    shapes = {
        "downsample_layers.0.0.weight": (dims[0], 3, 4, 4),
        "downsample_layers.0.0.bias": (dims[0],),
        "downsample_layers.0.1.weight": (dims[0],),
        "downsample_layers.0.1.bias": (dims[0],),
    }
    for i in range(1, 4):
        shapes.update(
            {
                f"downsample_layers.{i}.0.weight": (dims[i - 1],),
                f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                f"downsample_layers.{i}.1.bias": (dims[i],),
            }
        )
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            shapes.update(
                {
                    p + "dwconv.weight": (dim, 1, 7, 7),
                    p + "dwconv.bias": (dim,),
                    p + "norm.weight": (dim,),
                    p + "norm.bias": (dim,),
                    p + "pwconv1.weight": (4 * dim, dim),
                    p + "pwconv1.bias": (4 * dim,),
                    p + "pwconv2.weight": (dim, 4 * dim),
                    p + "pwconv2.bias": (dim,),
                    p + "gamma": (dim,),
                }
            )
    for prefix in ("norm.", "norms.3."):  # the official model registers its final norm twice
        shapes[prefix + "weight"] = shapes[prefix + "bias"] = (dims[-1],)
    return shapes


def random_state_dict(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(*shape, generator=g) * 0.05 for k, shape in layout.items()}
    for k in sd:
        if k.endswith("bias_mask"):
            third = sd[k].shape[0] // 3
            sd[k] = torch.cat([torch.ones(third), torch.zeros(third), torch.ones(third)])
        elif k.endswith("periods"):
            n = sd[k].shape[0]
            sd[k] = torch.tensor([100.0 ** (i / n) for i in range(n)])
    if "norms.3.weight" in sd:
        sd["norms.3.weight"], sd["norms.3.bias"] = sd["norm.weight"], sd["norm.bias"]
    return sd


@pytest.mark.parametrize("name", list(VIT_RELEASES) + list(CONVNEXT_RELEASES))
def test_entry_point_layout_is_the_official_one(name):
    """Built on the meta device (the 7B allocates nothing): exactly the official keys and shapes."""
    if name in VIT_RELEASES:
        *spec, count = VIT_RELEASES[name]
        expected = vit_layout(*spec)
        if count is not None:
            assert len(expected) == count
    else:
        expected = convnext_layout(*CONVNEXT_RELEASES[name])
    model = getattr(hubconf, name)(pretrained=False, device="meta")
    assert all(t.is_meta for t in model.state_dict().values())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected


@pytest.mark.parametrize(
    "name", ["dinov3_vits16", "dinov3_vits16plus", "dinov3_convnext_tiny"]
)  # the rest: layout on meta
def test_official_layout_files_load_strictly_through_entry_point_and_load_backbone(tmp_path, name):
    layout = vit_layout(*VIT_RELEASES[name][:-1]) if name in VIT_RELEASES else convnext_layout(*CONVNEXT_RELEASES[name])
    sd = random_state_dict(layout)
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    via_entry = getattr(hubconf, name)(weights=str(path)).eval()
    via_file = load_backbone(str(path))
    for model in (via_entry, via_file):
        state = model.state_dict()
        assert set(state) == set(sd)
        assert all(torch.equal(state[k], sd[k]) for k in sd)  # buffers included
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(via_entry(x), via_file(x), atol=0, rtol=0)


def test_release_file_is_assigned_without_a_copy(tmp_path):
    """A release file is assigned into a meta-built model: the weights are the file's tensors, not copies."""
    sd = random_state_dict(vit_layout(*VIT_RELEASES["dinov3_vits16"][:-1]))
    model = load_dinov3("dinov3_vits16", weights=None, pretrained=False)
    assert not any(t.is_meta for t in model.state_dict().values())
    import dino.hub as hub

    loaded = hub.build_backbone_from_state_dict(sd)
    assert loaded.cls_token.data_ptr() == sd["cls_token"].data_ptr()


def test_urls_are_the_official_ones_and_pretrained_reads_them(monkeypatch):
    import dino.hub as hub
    from dino.models.dinov3 import dinov3_url

    for name, digest in URL_HASHES.items():
        stem = name[len("dinov3_") :]
        assert dinov3_url(name) == (
            f"https://dl.fbaipublicfiles.com/dinov3/dinov3_{stem}/dinov3_{stem}_pretrain_lvd1689m-{digest}.pth"
        )
    assert dinov3_url("dinov3_vitl16", "SAT493M").endswith("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")
    with pytest.raises(UserError, match="no SAT493M release"):
        load_dinov3("dinov3_vits16", weights="SAT493M")

    read = []
    sat = random_state_dict(vit_layout(1024, 24, 16, "mlp", True, True))

    def fake_read(source, allow_pickle=False, network="teacher"):  # no download in tests
        read.append(source)
        return sat

    monkeypatch.setattr(hub, "load_checkpoint_file", fake_read)
    model = hubconf.dinov3_vitl16(weights="SAT493M")  # the SAT ViT-L carries local_cls_norm
    assert read == [dinov3_url("dinov3_vitl16", "SAT493M")]
    assert model.local_cls_norm is not None
    with pytest.raises(UserError, match="unexpected keys: local_cls_norm"):
        hubconf.dinov3_vitl16(weights="LVD1689M", untie_global_and_local_cls_norm=False)
    # the eval scripts without --pretrained_weights: --arch names the release
    sat.clear()
    sat.update(random_state_dict(vit_layout(*VIT_RELEASES["dinov3_vits16"][:-1])))
    model = hub.resolve_backbone(None, arch="dinov3_vits16")
    assert read[-1] == dinov3_url("dinov3_vits16") and not model.training


def test_torch_hub_load_local():
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = torch.hub.load(repo, "dinov3_vits16", source="local", pretrained=False)
    out = model.forward_features(torch.randn(1, 3, 32, 48))
    assert out["x_norm_patchtokens"].shape == (1, 6, 384) and out["x_storage_tokens"].shape == (1, 4, 384)


# ---- ConvNeXt against an independent reference ---------------------------------------------------------------
def ref_ln_channels(x, w, b, eps=1e-6):  # over C of (B, C, H, W)
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w[:, None, None] + b[:, None, None]


def ref_ln_last(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_convnext_stages(sd, x):
    outs = []
    for i in range(4):
        d = f"downsample_layers.{i}."
        if i == 0:
            x = F.conv2d(x, sd[d + "0.weight"], sd[d + "0.bias"], stride=4)
            x = ref_ln_channels(x, sd[d + "1.weight"], sd[d + "1.bias"])
        else:
            x = ref_ln_channels(x, sd[d + "0.weight"], sd[d + "0.bias"])
            x = F.conv2d(x, sd[d + "1.weight"], sd[d + "1.bias"], stride=2)
        j = 0
        while f"stages.{i}.{j}.gamma" in sd:
            p = f"stages.{i}.{j}."
            y = F.conv2d(x, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=3, groups=x.shape[1])
            y = ref_ln_last(y.permute(0, 2, 3, 1), sd[p + "norm.weight"], sd[p + "norm.bias"])
            y = y @ sd[p + "pwconv1.weight"].T + sd[p + "pwconv1.bias"]
            y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
            y = (y @ sd[p + "pwconv2.weight"].T + sd[p + "pwconv2.bias"]) * sd[p + "gamma"]
            x = x + y.permute(0, 3, 1, 2)
            j += 1
        outs.append(x)
    return outs


@pytest.fixture(scope="module")
def convnext_tiny():
    sd = random_state_dict(convnext_layout(*CONVNEXT_RELEASES["dinov3_convnext_tiny"]), seed=3)
    for k in sd:
        if k.endswith("gamma"):
            sd[k] = 1 + sd[k] * 4  # order-one LayerScale so every block matters
    import dino.hub as hub

    return sd, hub.build_backbone_from_state_dict(sd).eval()


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (70, 100)], ids=["square", "non-square", "not-multiple-of-32"])
def test_convnext_forward_features_match_reference(convnext_tiny, size):
    sd, model = convnext_tiny
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model.forward_features(x)
        cls = model(x)
    last = ref_convnext_stages(sd, x)[-1]
    tokens = last.flatten(2).transpose(1, 2)
    normed = ref_ln_last(torch.cat([last.mean((2, 3))[:, None], tokens], 1), sd["norm.weight"], sd["norm.bias"])
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["x_prenorm"], tokens, atol=ATOL, rtol=0)
    torch.testing.assert_close(cls, normed[:, 0], atol=ATOL, rtol=0)
    assert out["x_storage_tokens"].shape == (2, 0, 768)


@pytest.mark.parametrize("norm", [True, False])
def test_convnext_intermediate_layers_match_reference(convnext_tiny, norm):
    sd, model = convnext_tiny
    x = torch.randn(1, 3, 64, 96)
    stages = ref_convnext_stages(sd, x)
    with torch.no_grad():
        outs = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, norm=norm)
        flat = model.get_intermediate_layers(x, n=[3], norm=norm)
    for (maps, cls), ref, last in zip(outs, stages[2:], (False, True)):
        ref_cls, ref_maps = ref.mean((2, 3)), ref
        if norm and last:  # norms = [Identity ×3, final LayerNorm]
            ref_cls = ref_ln_last(ref_cls, sd["norm.weight"], sd["norm.bias"])
            ref_maps = ref_ln_channels(ref, sd["norm.weight"], sd["norm.bias"])
        torch.testing.assert_close(maps, ref_maps, atol=ATOL, rtol=0)
        torch.testing.assert_close(cls, ref_cls, atol=ATOL, rtol=0)
    (tokens,) = flat
    assert tokens.shape == (1, 2 * 3, 768)


def test_convnext_pseudo_patch_size_resamples_maps(convnext_tiny):
    sd, _ = convnext_tiny
    import dino.hub as hub

    model = hub.build_backbone_from_state_dict(sd, patch_size=16).eval()
    assert model.patch_size == 16
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        (maps,) = model.get_intermediate_layers(x, n=1, reshape=True, norm=False)
    ref = F.interpolate(ref_convnext_stages(sd, x)[-1], size=(4, 6), mode="bilinear", antialias=True)
    torch.testing.assert_close(maps, ref, atol=ATOL, rtol=0)
    with pytest.raises(UserError, match="no self-attention"):
        model.get_last_selfattention(x)


# ---- eval / extract / visualisation on a tiny v3 checkpoint ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_v3_checkpoint(tmp_path_factory):
    from test_models_v3 import official_v3_vit_state_dict

    sd = official_v3_vit_state_dict(dim=64, depth=2, heads=4, seed=5)
    path = tmp_path_factory.mktemp("tiny_v3") / "tiny_v3.pth"
    torch.save(sd, path)
    return path


def test_tiny_v3_runs_through_extract_and_visualisation(tiny_v3_checkpoint, tmp_path):
    import numpy as np
    from PIL import Image

    from dino.data.transforms import make_eval_transform
    from dino.eval.features import extract_features
    from dino.eval.visualization import cls_attention_maps, patch_feature_grids, patch_token_norms
    from dino.inference.extract import ExtractionSettings, extract_features_to_folder, load_extracted

    model = load_backbone(str(tiny_v3_checkpoint))
    assert type(model).__name__ == "DinoV3VisionTransformer" and model.num_register_tokens == 4
    images = torch.randn(2, 3, 48, 64)
    maps = cls_attention_maps(model, images)
    assert maps.shape[:2] == (2, 4) and maps.shape[-2:] == (3, 4)
    assert patch_feature_grids(model, images)[0].shape[:2] == (3, 4)
    assert patch_token_norms(model, images).shape[-2:] == (3, 4)

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(str(root / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(paths[-1])
    transform = make_eval_transform(36, 32)
    settings = ExtractionSettings(batch_size=2, num_workers=0, progress=False)
    summary = extract_features_to_folder(
        model, paths, tmp_path / "feats", transform, 32, settings, device=torch.device("cpu")
    )
    features, listed, _ = load_extracted(tmp_path / "feats")
    assert features.shape == (3, 64) and listed == paths, summary
    del extract_features  # imported to check the eval feature module loads with v3 installed


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_backbone_round_trip(tmp_path, suffix):
    """Our own exports of v3 models (ConvNeXt's final norm is stored under two names, as copies) load back."""
    from dino.hub import save_backbone
    from dino.models.convnext import ConvNeXt
    from dino.models.vision_transformer import DinoV3VisionTransformer

    x = torch.randn(1, 3, 64, 64)
    for model in (
        ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
        DinoV3VisionTransformer(embed_dim=32, depth=1, num_heads=2),
    ):
        model.eval()
        path = tmp_path / f"{type(model).__name__}{suffix}"
        save_backbone(model, path)
        loaded = load_backbone(str(path))
        assert type(loaded) is type(model)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert loaded.rope_embed.periods.dtype == torch.float32
