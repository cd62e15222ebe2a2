"""DINOv3 backbones against an independent reference written here, on random weights in the official key layout.

The reference follows the documented behaviour of facebookresearch/dinov3 (see ../shared/reference/FACTS.md,
"DINOv3"), computed another way than dino/models: RoPE as complex multiplication of (x_i, x_{i+d/2}) pairs with
angles from explicit per-patch loops, patches by unfold + matmul, attention one head at a time, LayerNorm by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino.errors import UserError
from dino.hub import build_backbone_from_state_dict, describe_state_dict, load_backbone, load_dinov3

ATOL = 1e-5
S_DIM, S_HEADS, DEPTH = 384, 6, 2  # ViT-S width (head_dim 64) with two blocks to stay fast


# ---- random tensors in the official layout, written from the key list in FACTS.md (not from our model) -------
def official_v3_vit_state_dict(
    dim=S_DIM,
    depth=DEPTH,
    swiglu_hidden=None,
    qkv_bias=True,
    storage=4,
    patch=16,
    heads=S_HEADS,
    local_cls_norm=False,
    seed=0,
    meta=False,
):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05, base=0.0):
        if meta:
            return torch.empty(*shape, device="meta")
        return base + torch.randn(*shape, generator=g) * s

    head_dim = dim // heads
    sd = {"cls_token": r(1, 1, dim), "storage_tokens": r(1, storage, dim), "mask_token": r(1, dim)}
    sd["rope_embed.periods"] = (
        torch.empty(head_dim // 4, device="meta")
        if meta
        else torch.tensor([100.0 ** (i / (head_dim / 4)) for i in range(head_dim // 4)])
    )
    sd["patch_embed.proj.weight"] = r(dim, 3, patch, patch, s=0.02)
    sd["patch_embed.proj.bias"] = r(dim)
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = r(dim, base=1.0), r(dim)
        sd[p + "attn.qkv.weight"] = r(3 * dim, dim)
        if qkv_bias:
            sd[p + "attn.qkv.bias"] = r(3 * dim, s=0.3)  # large k bias: RoPE makes it matter unless masked
            sd[p + "attn.qkv.bias_mask"] = (
                torch.empty(3 * dim, device="meta")
                if meta
                else torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
            )
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(dim, dim), r(dim)
        sd[p + "ls1.gamma"] = r(dim, s=0.3, base=1.0)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = r(dim, base=1.0), r(dim)
        if swiglu_hidden:
            for name, shape in (
                ("w1", (swiglu_hidden, dim)),
                ("w2", (swiglu_hidden, dim)),
                ("w3", (dim, swiglu_hidden)),
            ):
                # smaller than the MLP's: SwiGLU's product of two projections would otherwise grow the residual
                # stream to where fp32 rounding alone is ~1e-5
                sd[p + f"mlp.{name}.weight"], sd[p + f"mlp.{name}.bias"] = r(*shape, s=0.03), r(shape[0])
        else:
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * dim, dim), r(4 * dim)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(dim, 4 * dim), r(dim)
        sd[p + "ls2.gamma"] = r(dim, s=0.3, base=1.0)
    sd["norm.weight"], sd["norm.bias"] = r(dim, base=1.0), r(dim)
    if local_cls_norm:
        sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = r(dim, base=1.0), r(dim)
    return sd


# ---- the independent reference -------------------------------------------------------------------------------
def ref_layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_rope_angles(periods, h, w):
    """(h·w, head_dim/2) angles: [2π y/period_k]_k then [2π x/period_k]_k, y/x the patch centres in [-1, 1]."""
    rows = []
    for i in range(h):
        for j in range(w):
            y, x = 2 * (i + 0.5) / h - 1, 2 * (j + 0.5) / w - 1
            rows.append([2 * math.pi * y / float(p) for p in periods] + [2 * math.pi * x / float(p) for p in periods])
    return torch.tensor(rows, dtype=torch.float64)


def ref_rotate(t, angles):
    """Rotate-half RoPE as complex multiplication: pair (t_i, t_{i+d/2}) ↦ (t_i + i·t_{i+d/2})·e^{iθ_i}."""
    half = t.shape[-1] // 2
    z = torch.complex(t[..., :half].double(), t[..., half:].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)


def ref_vit_blocks(sd, x, heads=S_HEADS, masks=None, eps=1e-5):
    """Return (outputs of every block, last block's attention maps, grid) for images x."""
    B, C, H, W = x.shape
    p = sd["patch_embed.proj.weight"].shape[-1]
    dim = sd["cls_token"].shape[-1]
    h, w = H // p, W // p  # the conv floors: the remainder rows/columns are never seen
    patches = x[:, :, : h * p, : w * p].unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, h * w, -1)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(dim, -1).T + sd["patch_embed.proj.bias"]
    if masks is not None:
        tok = torch.where(masks[..., None], sd["mask_token"][None], tok)
    storage = sd["storage_tokens"]
    tok = torch.cat([sd["cls_token"].expand(B, 1, dim), storage.expand(B, -1, dim), tok], dim=1)
    prefix = 1 + storage.shape[1]
    angles = ref_rope_angles(sd["rope_embed.periods"], h, w)
    hd = dim // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    outputs, maps = [], None
    for i in range(depth):
        b = f"blocks.{i}."
        y = ref_layernorm(tok, sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv = y @ sd[b + "attn.qkv.weight"].T
        if b + "attn.qkv.bias" in sd:
            bias = sd[b + "attn.qkv.bias"].clone()
            bias[dim : 2 * dim] = 0  # the released models never use their k bias
            qkv = qkv + bias
        q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
        outs, head_maps = [], []
        for hh in range(heads):
            qh, kh, vh = (t[..., hh * hd : (hh + 1) * hd] for t in (q, k, v))
            qh = torch.cat([qh[:, :prefix], ref_rotate(qh[:, prefix:], angles)], dim=1)
            kh = torch.cat([kh[:, :prefix], ref_rotate(kh[:, prefix:], angles)], dim=1)
            logits = qh @ kh.transpose(1, 2) / math.sqrt(hd)
            a = torch.exp(logits - logits.max(-1, keepdim=True).values)
            a = a / a.sum(-1, keepdim=True)
            head_maps.append(a)
            outs.append(a @ vh)
        attn = torch.cat(outs, dim=-1) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        tok = tok + sd[b + "ls1.gamma"] * attn
        y = ref_layernorm(tok, sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        if b + "mlp.w1.weight" in sd:
            a1 = y @ sd[b + "mlp.w1.weight"].T + sd[b + "mlp.w1.bias"]
            a2 = y @ sd[b + "mlp.w2.weight"].T + sd[b + "mlp.w2.bias"]
            ffn = (a1 * torch.sigmoid(a1) * a2) @ sd[b + "mlp.w3.weight"].T + sd[b + "mlp.w3.bias"]
        else:
            hid = y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]
            hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
            ffn = hid @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
        tok = tok + sd[b + "ls2.gamma"] * ffn
        outputs.append(tok)
        maps = torch.stack(head_maps, dim=1)
    return outputs, maps, (h, w)


def ref_v3_features(sd, x, **kw):
    outputs, _, _ = ref_vit_blocks(sd, x, **kw)
    last = outputs[-1]
    normed = ref_layernorm(last, sd["norm.weight"], sd["norm.bias"])
    s = sd["storage_tokens"].shape[1]
    return {
        "x_norm_clstoken": normed[:, 0],
        "x_storage_tokens": normed[:, 1 : 1 + s],
        "x_norm_patchtokens": normed[:, 1 + s :],
        "x_prenorm": last,
    }


def swiglu_hidden(dim, ratio, align=8):
    d = int(dim * ratio * 2 / 3)
    return d + (-d % align)


CASES = {
    "S/16": dict(),
    "S+/16": dict(swiglu_hidden=swiglu_hidden(S_DIM, 6)),
}


@pytest.fixture(scope="module", params=list(CASES))
def loaded(request, tmp_path_factory):
    sd = official_v3_vit_state_dict(**CASES[request.param])
    path = tmp_path_factory.mktemp("v3") / "backbone.pth"
    torch.save(sd, path)
    model = load_backbone(str(path))  # recognised from keys and shapes, loaded strictly
    return request.param, sd, model


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (70, 90)], ids=["square", "non-square", "not-multiple-of-16"])
def test_forward_features_match_reference(loaded, size):
    _, sd, model = loaded
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model.forward_features(x)
        ref = ref_v3_features(sd, x)
        cls = model(x)
    assert ours["x_norm_patchtokens"].shape[1] == (size[0] // 16) * (size[1] // 16)
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, atol=ATOL, rtol=0, msg=key)
    torch.testing.assert_close(cls, ref["x_norm_clstoken"], atol=ATOL, rtol=0)
    assert ours["masks"] is None


def test_masked_input_matches_reference(loaded):
    _, sd, model = loaded
    x = torch.randn(2, 3, 48, 64)
    masks = torch.rand(2, 12) < 0.4
    with torch.no_grad():
        ours = model.forward_features(x, masks=masks)
        ref = ref_v3_features(sd, x, masks=masks)
    torch.testing.assert_close(ours["x_norm_patchtokens"], ref["x_norm_patchtokens"], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["x_norm_clstoken"], ref["x_norm_clstoken"], atol=ATOL, rtol=0)
    assert ours["masks"] is masks


def test_list_input_gives_one_dict_per_resolution(loaded):
    _, sd, model = loaded
    xs = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 48)]
    with torch.no_grad():
        outs = model.forward_features(xs)
    assert isinstance(outs, list) and len(outs) == 2
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out["x_norm_clstoken"], ref_v3_features(sd, x)["x_norm_clstoken"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm", [True, False])
def test_intermediate_layers_match_reference(loaded, norm):
    _, sd, model = loaded
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        outs = model.get_intermediate_layers(
            x, n=2, reshape=True, return_class_token=True, return_extra_tokens=True, norm=norm
        )
        plain = model.get_intermediate_layers(x, n=[0], norm=norm)
    ref_outs, _, (h, w) = ref_vit_blocks(sd, x)
    if norm:
        ref_outs = [ref_layernorm(o, sd["norm.weight"], sd["norm.bias"]) for o in ref_outs]
    assert len(outs) == 2
    for (patches, cls, extra), ref in zip(outs, ref_outs):
        assert patches.shape == (1, S_DIM, h, w)
        torch.testing.assert_close(patches, ref[:, 5:].reshape(1, h, w, S_DIM).permute(0, 3, 1, 2), atol=ATOL, rtol=0)
        torch.testing.assert_close(cls, ref[:, 0], atol=ATOL, rtol=0)
        torch.testing.assert_close(extra, ref[:, 1:5], atol=ATOL, rtol=0)
    (first,) = plain
    torch.testing.assert_close(first, ref_outs[0][:, 5:], atol=ATOL, rtol=0)


def test_last_selfattention_matches_reference(loaded):
    _, sd, model = loaded
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        maps = model.get_last_selfattention(x)
    _, ref_maps, _ = ref_vit_blocks(sd, x)
    assert maps.shape == (1, S_HEADS, 5 + 8, 5 + 8)
    torch.testing.assert_close(maps, ref_maps, atol=ATOL, rtol=0)


def test_k_bias_is_masked_and_matters():
    """The k third of the qkv bias never reaches the attention (RoPE would make it matter if it did)."""
    sd = official_v3_vit_state_dict()
    model = build_backbone_from_state_dict(sd).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].attn.qkv.bias.data[S_DIM : 2 * S_DIM] += 5.0
        assert torch.allclose(model(x), before, atol=1e-6)
        model.blocks[0].attn.qkv.bias_mask.fill_(1.0)  # unmasked, the same change moves the output
        assert not torch.allclose(model(x), before, atol=1e-3)


def test_rope_tables_and_train_time_rescale():
    from dino.models.rope import RopePositionEmbedding

    rope = RopePositionEmbedding(384, num_heads=6, base=100.0, rescale_coords=2.0)
    expected = torch.tensor([100.0 ** (i / 16) for i in range(16)])
    torch.testing.assert_close(rope.periods, expected, rtol=1e-6, atol=0)
    assert rope.periods.dtype == torch.float32 and "periods" in rope.state_dict()
    rope.eval()
    sin, cos = rope(H=3, W=5)
    angles = ref_rope_angles(rope.periods, 3, 5).float()
    torch.testing.assert_close(sin, torch.sin(angles).tile(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos, torch.cos(angles).tile(2), atol=1e-6, rtol=0)
    base = rope.coordinates(4, 6)  # even sizes: no zero coordinate to divide by
    rope.train()
    factors = set()
    for _ in range(50):
        ratio = rope.coordinates(4, 6) / base
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)  # one factor, both axes
        factors.add(round(ratio.flatten()[0].item(), 6))
    assert len(factors) > 40 and min(factors) >= 0.5 - 1e-6 and max(factors) <= 2.0 + 1e-6


def test_half_precision_keeps_fp32_rope_tables():
    sd = official_v3_vit_state_dict()
    model = build_backbone_from_state_dict(sd).eval()
    x = torch.randn(1, 3, 32, 48)
    model_bf16 = build_backbone_from_state_dict(sd).eval().to(torch.bfloat16)
    sin, _ = model_bf16.rope_tables(2, 3)
    assert sin.dtype == torch.float32  # the tables stay fp32 (the releases' setting) in a bf16 model
    with torch.no_grad():
        cos_sim = F.cosine_similarity(model(x), model_bf16(x.bfloat16()).float()).item()
    assert cos_sim > 0.99


def test_local_cls_norm_only_for_local_crops_in_training():
    sd = official_v3_vit_state_dict(local_cls_norm=True)
    sd["local_cls_norm.weight"] = sd["local_cls_norm.weight"] * 3
    model = build_backbone_from_state_dict(sd)
    assert model.local_cls_norm is not None
    xs = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    model.eval()
    with torch.no_grad():
        eval_out = model.forward_features(xs)
        ref_local = ref_v3_features(sd, xs[1])
        torch.testing.assert_close(eval_out[1]["x_norm_clstoken"], ref_local["x_norm_clstoken"], atol=ATOL, rtol=0)
        model.train()
        model.rope_embed.rescale_coords = None  # keep the tables deterministic for the comparison
        train_out = model.forward_features(xs)
    prenorm = train_out[1]["x_prenorm"]
    expected = ref_layernorm(prenorm[:, 0], sd["local_cls_norm.weight"], sd["local_cls_norm.bias"])
    torch.testing.assert_close(train_out[1]["x_norm_clstoken"], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        train_out[0]["x_norm_clstoken"],
        ref_layernorm(train_out[0]["x_prenorm"][:, 0], sd["norm.weight"], sd["norm.bias"]),
        atol=ATOL,
        rtol=0,
    )


def test_v3_recognised_and_wrong_file_named(tmp_path):
    sd = official_v3_vit_state_dict(swiglu_hidden=swiglu_hidden(S_DIM, 6))
    info = describe_state_dict(sd)
    assert info["kind"] == "vit" and info["embed_dim"] == S_DIM and info["depth"] == DEPTH
    assert info["model_kwargs"]["ffn_layer"] == "swiglu_w123" and info["model_kwargs"]["mlp_ratio"] == 6.0
    full = official_v3_vit_state_dict(depth=12, seed=1)
    assert describe_state_dict(full)["name"] == "dinov3_vits16"
    path = tmp_path / "s16.pth"
    torch.save(full, path)
    model = load_dinov3("dinov3_vits16", weights=str(path))
    assert type(model).__name__ == "DinoV3VisionTransformer"
    with pytest.raises(
        UserError,
        match=r"does not fit dinov3_vitb16: it holds a DINOv3 ViT vit_small .*"
        r"load it with the 'dinov3_vits16' entry point",
    ):
        load_dinov3("dinov3_vitb16", weights=str(path))
    from dino.hub import load_official

    with pytest.raises(UserError, match=r"does not fit dinov2_vits14.*the 'dinov3_vits16' entry point"):
        load_official("dinov2_vits14", weights=str(path))
    with pytest.raises(UserError, match="patch_size=14"):
        load_backbone(str(path), patch_size=14)
    v2_path = tmp_path / "v2.pth"
    from test_models import official_v2_state_dict

    torch.save(official_v2_state_dict(), v2_path)
    with pytest.raises(UserError, match=r"it holds a DINOv2 ViT vit_small .*patch 14"):
        load_dinov3("dinov3_vits16", weights=str(v2_path))


def test_onnx_trace_keeps_rope_tables_in_the_graph(tmp_path):
    """Traced to ONNX (torch.onnx's TorchScript path, what `dino export` uses) with dynamic batch and image size,
    the RoPE tables are computed in the graph from the input size: the same outputs at sizes never traced,
    a size that is not a multiple of 16 included. (An in-place RoPE on the fused qkv was exported wrong here.)"""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = build_backbone_from_state_dict(official_v3_vit_state_dict(dim=64, depth=2, heads=4)).eval()

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model.forward_features(x)
            return out["x_norm_clstoken"], out["x_norm_patchtokens"]

    path = tmp_path / "v3.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Tokens().eval(),
            (torch.randn(2, 3, 64, 96),),
            str(path),
            dynamo=False,
            input_names=["x"],
            opset_version=17,
            dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}},
        )
    model.eval()
    session = ort.InferenceSession(str(path))
    for shape in [(1, 3, 64, 64), (3, 3, 48, 80), (2, 3, 70, 90)]:
        x = torch.randn(*shape)
        cls, patches = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = model.forward_features(x)
        torch.testing.assert_close(torch.from_numpy(cls), expected["x_norm_clstoken"], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(patches), expected["x_norm_patchtokens"], atol=1e-5, rtol=0)
