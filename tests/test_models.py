"""Our ViT against an independent reference computation on weights in the official key layouts."""

import math

import pytest
import torch
import torch.nn.functional as F

from dino.errors import UserError
from dino.hub import build_backbone_from_state_dict, describe_state_dict
from dino.models import DINOHead, build_backbone

D, HEADS, DEPTH = 384, 6, 2  # vit_small width (so the arch is recognised), two blocks to stay fast


def official_v2_state_dict(patch=14, grid=37, registers=0, layerscale=True, swiglu=False, mask_token=True, seed=0):
    """Random tensors with the official DINOv2 / DINO v1 hub key names and shapes, written independently of our model."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.05: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + grid * grid, D)}
    if registers:
        sd["register_tokens"] = r(1, registers, D)
    if mask_token:
        sd["mask_token"] = r(1, D)
    sd["patch_embed.proj.weight"] = r(D, 3, patch, patch)
    sd["patch_embed.proj.bias"] = r(D)
    hidden = 4 * D
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1 + r(D)
        sd[p + "norm1.bias"] = r(D)
        sd[p + "attn.qkv.weight"] = r(3 * D, D)
        sd[p + "attn.qkv.bias"] = r(3 * D)
        sd[p + "attn.proj.weight"] = r(D, D)
        sd[p + "attn.proj.bias"] = r(D)
        sd[p + "norm2.weight"] = 1 + r(D)
        sd[p + "norm2.bias"] = r(D)
        if swiglu:
            h = (int(hidden * 2 / 3) + 7) // 8 * 8
            sd[p + "mlp.w12.weight"] = r(2 * h, D)
            sd[p + "mlp.w12.bias"] = r(2 * h)
            sd[p + "mlp.w3.weight"] = r(D, h)
            sd[p + "mlp.w3.bias"] = r(D)
        else:
            sd[p + "mlp.fc1.weight"] = r(hidden, D)
            sd[p + "mlp.fc1.bias"] = r(hidden)
            sd[p + "mlp.fc2.weight"] = r(D, hidden)
            sd[p + "mlp.fc2.bias"] = r(D)
        if layerscale:
            sd[p + "ls1.gamma"] = 1 + r(D, s=0.3)
            sd[p + "ls2.gamma"] = 1 + r(D, s=0.3)
    sd["norm.weight"] = 1 + r(D)
    sd["norm.bias"] = r(D)
    return sd


# ---- an independent reference, written from the papers' equations and the documented official behaviour ----
def ref_layernorm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_pos_embed(pos, h0, w0, H, W, offset, antialias):
    n = pos.shape[1] - 1
    m = int(math.isqrt(n))
    if h0 * w0 == n and H == W:
        return pos
    grid = pos[:, 1:].reshape(1, m, m, D).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(
            grid,
            scale_factor=((h0 + offset) / m, (w0 + offset) / m),
            mode="bicubic",
            align_corners=False,
            antialias=antialias,
        )
    else:
        grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, D)], dim=1)


def ref_tokens(sd, x, patch, offset, antialias, masks=None):
    B, C, H, W = x.shape
    h0, w0 = H // patch, W // patch
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # B,C,h0,w0,p,p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, h0 * w0, C * patch * patch)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    if masks is not None:
        tok = torch.where(masks[..., None], sd["mask_token"][None], tok)
    tok = torch.cat([sd["cls_token"].expand(B, 1, D), tok], dim=1)
    tok = tok + ref_pos_embed(sd["pos_embed"], h0, w0, H, W, offset, antialias)
    if "register_tokens" in sd:
        R = sd["register_tokens"].shape[1]
        tok = torch.cat([tok[:, :1], sd["register_tokens"].expand(B, R, D), tok[:, 1:]], dim=1)
    return tok


def ref_attention(sd, p, x):
    B, N, _ = x.shape
    hd = D // HEADS
    qkv = x @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    outs, maps = [], []
    for h in range(HEADS):
        qh, kh, vh = (t[..., h * hd : (h + 1) * hd] for t in (q, k, v))
        logits = qh @ kh.transpose(1, 2) / math.sqrt(hd)
        a = torch.exp(logits - logits.max(-1, keepdim=True).values)
        a = a / a.sum(-1, keepdim=True)
        maps.append(a)
        outs.append(a @ vh)
    out = torch.cat(outs, dim=-1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    return out, torch.stack(maps, dim=1)


def ref_blocks(sd, tok):
    outputs, last_attn = [], None
    for i in range(DEPTH):
        p = f"blocks.{i}."
        ls1 = sd.get(p + "ls1.gamma", torch.ones(D))
        ls2 = sd.get(p + "ls2.gamma", torch.ones(D))
        a, last_attn = ref_attention(sd, p, ref_layernorm(tok, sd[p + "norm1.weight"], sd[p + "norm1.bias"]))
        tok = tok + ls1 * a
        y = ref_layernorm(tok, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        if p + "mlp.w12.weight" in sd:
            x12 = y @ sd[p + "mlp.w12.weight"].T + sd[p + "mlp.w12.bias"]
            x1, x2 = x12.chunk(2, dim=-1)
            y = (x1 * torch.sigmoid(x1) * x2) @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
        else:
            y = (
                ref_gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T
                + sd[p + "mlp.fc2.bias"]
            )
        tok = tok + ls2 * y
        outputs.append(tok)
    return outputs, last_attn


def load(sd, **kw):
    return build_backbone_from_state_dict(sd, **kw).eval()


CASES = {
    "dinov2": dict(sd=dict(patch=14, grid=37), offset=0.1, antialias=False, stored={}),
    "dinov2_reg": dict(sd=dict(patch=14, grid=37, registers=4), offset=0.0, antialias=True, stored={}),
    "dinov2_swiglu": dict(sd=dict(patch=14, grid=37, swiglu=True), offset=0.1, antialias=False, stored={}),
    "dino_v1": dict(
        sd=dict(patch=16, grid=14, layerscale=False, mask_token=False), offset=0.1, antialias=False, stored={}
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("size", [(224, 224), (224, 168), (98, 154)])
def test_forward_features_matches_reference(case, size):
    spec = CASES[case]
    sd = official_v2_state_dict(**spec["sd"])
    model = load(sd)
    patch = spec["sd"]["patch"]
    H, W = (s // patch * patch for s in size)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        out = model.forward_features(x)
        tok = ref_tokens(sd, x, patch, spec["offset"], spec["antialias"])
        blocks, last_attn = ref_blocks(sd, tok)
        ref = ref_layernorm(blocks[-1], sd["norm.weight"], sd["norm.bias"])
        R = spec["sd"].get("registers", 0)
        torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["x_norm_regtokens"], ref[:, 1 : 1 + R], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 1 + R :], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["x_prenorm"], blocks[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), ref[:, 0], atol=1e-5, rtol=1e-5)
        attn = model.get_last_selfattention(x)
        torch.testing.assert_close(attn, last_attn, atol=1e-5, rtol=1e-5)


def test_masked_input_matches_reference():
    sd = official_v2_state_dict(patch=14, grid=37, registers=4)
    model = load(sd)
    x = torch.randn(2, 3, 112, 140)
    masks = torch.rand(2, 8 * 10) < 0.4
    with torch.no_grad():
        out = model.forward_features(x, masks=masks)
        blocks, _ = ref_blocks(sd, ref_tokens(sd, x, 14, 0.0, True, masks=masks))
        ref = ref_layernorm(blocks[-1], sd["norm.weight"], sd["norm.bias"])
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 5:], atol=1e-5, rtol=1e-5)
    assert out["masks"] is masks


def test_position_embedding_uses_offset_scale_factor_not_size():
    """The official offset-0.1 path resizes by scale factor; passing the size instead gives other numbers."""
    sd = official_v2_state_dict(patch=14, grid=37)
    model = load(sd)
    pos = model.interpolate_pos_encoding(1 + 16 * 16, 224, 224)
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, D)
    assert pos.shape == (1, 257, D)
    assert not torch.allclose(pos[:, 1:], by_size, atol=1e-4)
    # the stored grid is used untouched at the native square resolution
    assert model.interpolate_pos_encoding(1 + 37 * 37, 518, 518) is model.pos_embed


def test_get_intermediate_layers_api():
    sd = official_v2_state_dict(patch=14, grid=37, registers=4)
    model = load(sd)
    x = torch.randn(1, 3, 70, 98)
    with torch.no_grad():
        blocks, _ = ref_blocks(sd, ref_tokens(sd, x, 14, 0.0, True))
        last2 = model.get_intermediate_layers(x, n=2)
        assert len(last2) == 2 and last2[0].shape == (1, 35, D)
        normed = ref_layernorm(blocks[0], sd["norm.weight"], sd["norm.bias"])
        torch.testing.assert_close(last2[0], normed[:, 5:], atol=1e-5, rtol=1e-5)
        by_index = model.get_intermediate_layers(x, n=[1], reshape=True, return_class_token=True, norm=False)
        patch_map, cls = by_index[0]
        assert patch_map.shape == (1, D, 5, 7)
        torch.testing.assert_close(cls, blocks[1][:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(patch_map.flatten(2).transpose(1, 2), blocks[1][:, 5:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=[5])


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_attention_backends_agree(backend):
    model = build_backbone("vit_tiny", 16, depth=2).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        model.set_attn_backend("explicit")
        ref = model(x)
        model.set_attn_backend(backend)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_attention_maps_sum_to_one_and_include_registers():
    model = build_backbone("vit_tiny", 16, depth=2, num_register_tokens=4).eval()
    with torch.no_grad():
        attn = model.get_last_selfattention(torch.randn(2, 3, 64, 80))
    assert attn.shape == (2, 3, 1 + 4 + 4 * 5, 1 + 4 + 4 * 5)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 25))


def test_layerscale_init_and_drop_path_schedules():
    model = build_backbone("vit_tiny", 16, depth=4, init_values=1e-5, drop_path_rate=0.3)
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    uniform = build_backbone("vit_tiny", 16, depth=4, drop_path_rate=0.3, drop_path_uniform=True)
    assert [b.drop_path.drop_prob for b in uniform.blocks] == pytest.approx([0.3] * 4)


def test_sizes_and_errors():
    assert build_backbone("vit_small", 16, depth=1).embed_dim == 384
    with pytest.raises(UserError, match="vit_small"):
        build_backbone("vit_smal", 16)
    model = build_backbone("vit_tiny", 16, depth=1)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 50, 64))
    no_mask = build_backbone("vit_tiny", 16, depth=1, use_mask_token=False)
    with pytest.raises(ValueError, match="mask_token"):
        no_mask.forward_features(torch.randn(1, 3, 32, 32), masks=torch.zeros(1, 4, dtype=torch.bool))


def test_describe_state_dict_reads_the_architecture():
    info = describe_state_dict(official_v2_state_dict(patch=14, grid=37, registers=4, swiglu=True))
    assert info["arch"] == "vit_small" and info["patch_size"] == 14 and info["num_register_tokens"] == 4
    assert info["ffn_layer"] == "swiglu" and info["init_values"] == 1.0 and info["img_size"] == 518


def test_dino_head_matches_formula_and_official_keys():
    head = DINOHead(32, 50, nlayers=3, hidden_dim=16, bottleneck_dim=8)
    keys = set(head.state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v", "mlp.0.weight", "mlp.2.weight", "mlp.4.weight"} <= keys
    assert not head.last_layer.weight_g.requires_grad
    x = torch.randn(5, 32)
    h = x
    for i in (0, 2):
        h = ref_gelu(h @ head.mlp[i].weight.T + head.mlp[i].bias)
    h = h @ head.mlp[4].weight.T + head.mlp[4].bias
    h = h / h.norm(dim=-1, keepdim=True)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = h @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-5)
    # every prototype has unit norm while weight_g is fixed at 1
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    assert DINOHead(32, 50, norm_last_layer=False).last_layer.weight_g.requires_grad


@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_recomputing_gelu_gives_autograd_values_and_keeps_less(autocast):
    """The training MLP keeps fc1's output only (GELU recomputed in backward): same outputs and gradients."""
    import copy

    from dino.models.vision_transformer import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    plain = copy.deepcopy(mlp)
    x = torch.randn(3, 7, 16, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = mlp(x)
        expected = plain.fc2(plain.act(plain.fc1(x_plain)))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            mlp(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().square().sum().backward()
    expected.float().square().sum().backward()
    torch.testing.assert_close(x.grad, x_plain.grad)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        got, want = mlp.get_parameter(name).grad, plain.get_parameter(name).grad
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, msg=name)
    hidden_sized = [t for t in saved if t.shape[-1] == 64 and t.dim() == 3]
    assert len(hidden_sized) == 1  # fc1's output, not also GELU's
    with torch.no_grad():  # inference takes the plain path
        torch.testing.assert_close(mlp(x), plain(x))
