"""Contracts every backbone keeps, swept over the registries as timm sweeps its models.

Every hub entry point (`hubconf.py`: DINO v1, DINOv2 with and without registers, DINOv3 ViTs and ConvNeXts) and
every size of the three model factories (`ARCH_SIZES`, `V3_ARCH_SIZES`, `CONVNEXT_SIZES`) is built from its
registry, so a model added there is covered without touching this file (the released sizes are built through
the factories, so the factory test adds only the sizes no release uses):

* every model builds on the meta device (no memory: the 7B included), with the architecture its name says,
  and its forward, backward and `get_intermediate_layers` give the shapes of the hub API;
* every entry point also runs for real, built with its release settings but two blocks deep (ConvNeXts: one
  block per stage; skipped where even that is over `REAL_PARAMS`), as does every factory size no release covers:
  `forward` is the normed [CLS], `get_intermediate_layers` of the last block is what `forward_features`
  returns (reshaped on the right grid), images of a batch do not mix, and every parameter but the few that
  only some inputs use gets a finite gradient;
* one small model goes through `torch.compile` (forward and backward) and matches eager.

Inputs are tiny and non-square (2×3 patches), so a height/width mix-up cannot hide.
"""

from __future__ import annotations

import re

import pytest
import torch

import hubconf
from dino import hub
from dino.models import ARCH_SIZES, V3_ARCH_SIZES, build_backbone, dinov3_vision_transformer
from dino.models.convnext import CONVNEXT_SIZES, ConvNeXt, convnext
from dino.models.dinov3 import DINOV3_RELEASES
from dino.models.vision_transformer import DinoV3VisionTransformer, VisionTransformer

HUB_NAMES = sorted(set(hub.OFFICIAL_MODELS) | set(DINOV3_RELEASES))
FACTORIES = (
    [("v2", arch) for arch in ARCH_SIZES]
    + [("v3", arch) for arch in V3_ARCH_SIZES]
    + [("convnext", size) for size in CONVNEXT_SIZES]
)
REAL_PARAMS = 16_000_000  # two blocks above this are checked on the meta device only
GRID = (2, 3)  # patches (ViT) or stride-32 cells (ConvNeXt) of the test images, height × width

# parameters that only some inputs reach: the mask token (masked inputs), DINOv3's local-crop [CLS] norm
# (the second input of a list, in training) and the ConvNeXt's per-stage norms of `get_intermediate_layers`
UNUSED_BY_A_PLAIN_FORWARD = re.compile(r"^(mask_token|local_cls_norm\..*|norms\.[0-2]\..*)$")

_SIZE_LETTERS = {"s": "small", "b": "base", "l": "large", "g": "giant2", "h": "huge", "7b": "7b"}


def expected_architecture(name: str) -> dict:
    """What a hub name promises: generation, arch (a key of the factory tables), patch size, extra tokens."""
    if m := re.fullmatch(r"dinov3_convnext_(\w+)", name):
        return dict(generation="convnext", arch=m[1], patch_size=None, extra_tokens=0)
    m = re.fullmatch(r"dino(v2|v3)?_vit(s|b|l|g|h|7b)(\d+)(plus)?(_reg)?", name)
    assert m, f"hub name {name!r} does not follow dino[v2|v3]_vit<size><patch>[plus][_reg]"
    generation = m[1] or "v1"
    arch = f"vit_{_SIZE_LETTERS[m[2]]}" + ("_plus" if m[4] else "")
    extra = 4 if (m[5] or generation == "v3") else 0
    return dict(generation=generation, arch=arch, patch_size=int(m[3]), extra_tokens=extra)


def build_hub(name: str, device: str = "cpu", shallow: bool = False) -> torch.nn.Module:
    """The entry point's model with pretrained=False; `shallow`: two blocks of it (a ConvNeXt: one per stage)."""
    entry = getattr(hubconf, name)
    if name in DINOV3_RELEASES:
        if shallow and DINOV3_RELEASES[name][0] == "convnext":
            with torch.device(device):
                return ConvNeXt(depths=(1, 1, 1, 1), dims=CONVNEXT_SIZES[DINOV3_RELEASES[name][1]][1])
        return entry(pretrained=False, device=device, **(dict(depth=2) if shallow else {}))
    with torch.device(device):
        return entry(pretrained=False, **(dict(depth=2) if shallow else {}))


def build_factory(kind: str, arch: str, device: str = "cpu", shallow: bool = False) -> torch.nn.Module:
    kwargs = dict(depth=2) if shallow else {}
    with torch.device(device):
        if kind == "v2":
            return build_backbone(arch, 16, **kwargs)
        if kind == "v3":
            return dinov3_vision_transformer(arch, **kwargs)
        if shallow:
            return ConvNeXt(depths=(1, 1, 1, 1), dims=CONVNEXT_SIZES[arch][1])
        return convnext(arch)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stride(model: torch.nn.Module) -> int:
    return 32 if isinstance(model, ConvNeXt) else model.patch_size


def test_hubconf_exports_exactly_the_registered_releases():
    exported = {name for name in dir(hubconf) if not name.startswith("_") and callable(getattr(hubconf, name))}
    assert exported == set(HUB_NAMES)


# ------------------------------------------------------------------------------ every model, meta device


def check_hub_api_shapes(model: torch.nn.Module, device: str) -> None:
    """forward_features / forward / get_intermediate_layers shapes, and a backward reaching the parameters."""
    h, w = GRID
    batch, dim, extra = 2, model.embed_dim, model.num_register_tokens if hasattr(model, "blocks") else 0
    x = torch.randn(batch, 3, h * stride(model), w * stride(model), device=device)
    out = model.forward_features(x)
    assert tuple(out["x_norm_clstoken"].shape) == (batch, dim)
    assert tuple(out["x_norm_patchtokens"].shape) == (batch, h * w, dim)
    extra_key = "x_norm_regtokens" if isinstance(model, VisionTransformer) else "x_storage_tokens"
    assert tuple(out[extra_key].shape) == (batch, extra, dim)
    assert tuple(model(x).shape) == (batch, dim)
    (out["x_norm_clstoken"].sum() + out["x_norm_patchtokens"].sum()).backward()
    for pname, param in model.named_parameters():
        if param.grad is not None:
            assert param.grad.shape == param.shape, pname
        else:
            assert UNUSED_BY_A_PLAIN_FORWARD.match(pname), f"{pname} gets no gradient"
    layers = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, return_extra_tokens=True)
    assert len(layers) == 2
    patches, cls, extra_tokens = layers[-1]
    assert tuple(patches.shape) == (batch, dim, h, w)
    assert tuple(cls.shape) == (batch, dim) and tuple(extra_tokens.shape) == (batch, extra, dim)


def shallow(model: torch.nn.Module) -> torch.nn.Module:
    """The first and last blocks only: the same code paths and shapes for a fraction of the (meta) ops."""
    if hasattr(model, "blocks") and len(model.blocks) > 2:
        model.blocks = torch.nn.ModuleList([model.blocks[0], model.blocks[-1]])
    return model


@pytest.mark.parametrize("name", HUB_NAMES)
def test_hub_entry_point_builds_on_meta_as_named(name):
    model = build_hub(name, "meta")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    want = expected_architecture(name)
    if want["generation"] == "convnext":
        assert isinstance(model, ConvNeXt)
        depths, dims = CONVNEXT_SIZES[want["arch"]]
        assert [len(stage) for stage in model.stages] == list(depths) and model.embed_dim == dims[-1]
    else:
        table = V3_ARCH_SIZES if want["generation"] == "v3" else ARCH_SIZES
        embed_dim, depth = table[want["arch"]][:2]
        assert isinstance(model, DinoV3VisionTransformer if want["generation"] == "v3" else VisionTransformer)
        assert (model.embed_dim, len(model.blocks), model.patch_size) == (embed_dim, depth, want["patch_size"])
        assert model.num_register_tokens == want["extra_tokens"]
        if want["generation"] == "v1":  # no LayerScale, no mask token (DINO v1 had no iBOT)
            assert model.mask_token is None and isinstance(model.blocks[0].ls1, torch.nn.Identity)
        if want["generation"] == "v2":
            assert model.mask_token is not None
    check_hub_api_shapes(shallow(model), "meta")


# ------------------------------------------------------------------------------- two blocks, for real


def check_hub_api_values(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    model.eval()
    h, w = GRID
    x = torch.randn(2, 3, h * stride(model), w * stride(model))
    out = model.forward_features(x)
    cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
    assert torch.isfinite(cls).all() and torch.isfinite(patches).all()
    with torch.no_grad():
        torch.testing.assert_close(model(x), cls)
        # images of a batch do not mix
        torch.testing.assert_close(model(x[1:2]), cls[1:2], rtol=1e-4, atol=1e-5)
        # the last block's normed tokens are forward_features' tokens, and reshape puts patch (i, j) at [..., i, j]
        ((grid, last_cls),) = model.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
        assert tuple(grid.shape) == (x.shape[0], model.embed_dim, h, w)
        torch.testing.assert_close(grid.flatten(2).transpose(1, 2), patches)
        torch.testing.assert_close(grid[:, :, 1, 2], patches[:, 1 * w + 2])
        torch.testing.assert_close(last_cls, cls)
    (cls.square().mean() + patches.square().mean()).backward()
    without_grad = []
    for pname, param in model.named_parameters():
        if param.grad is None:
            without_grad.append(pname)
        else:
            assert torch.isfinite(param.grad).all(), pname
    assert all(UNUSED_BY_A_PLAIN_FORWARD.match(pname) for pname in without_grad), without_grad


def real_model(build) -> torch.nn.Module:
    """Two blocks of the model, for real (its full depth is checked on the meta device); skipped when even
    those are too large to run here."""
    if num_params(build("meta", shallow=True)) >= REAL_PARAMS:
        pytest.skip("even two blocks are too large to run here (the meta-device test covers it)")
    return build("cpu", shallow=True)


@pytest.mark.parametrize("name", HUB_NAMES)
def test_hub_entry_point_runs(name):
    check_hub_api_values(real_model(lambda device, shallow=False: build_hub(name, device, shallow)))


def _factory_of(name: str) -> tuple[str, str]:
    """(factory kind, arch) a release is built with: v1 and v2 share `build_backbone`."""
    want = expected_architecture(name)
    return ("v2" if want["generation"] in ("v1", "v2") else want["generation"]), want["arch"]


UNRELEASED_FACTORIES = [entry for entry in FACTORIES if entry not in {_factory_of(name) for name in HUB_NAMES}]


def test_every_released_size_is_a_factory_size():
    assert {_factory_of(name) for name in HUB_NAMES} <= set(FACTORIES)


@pytest.mark.parametrize("kind, arch", UNRELEASED_FACTORIES, ids=[f"{k}-{a}" for k, a in UNRELEASED_FACTORIES])
def test_factory_size_without_a_release(kind, arch):
    """The sizes no entry point builds (the released ones are built through the same factories above)."""
    model = build_factory(kind, arch, "meta")
    assert all(p.is_meta for p in model.parameters())
    if kind == "convnext":
        assert model.embed_dim == CONVNEXT_SIZES[arch][1][-1]
    else:
        table = V3_ARCH_SIZES if kind == "v3" else ARCH_SIZES
        assert (model.embed_dim, len(model.blocks)) == table[arch][:2]
    check_hub_api_shapes(shallow(model), "meta")
    check_hub_api_values(real_model(lambda device, shallow=False: build_factory(kind, arch, device, shallow)))


# -------------------------------------------------------------------------------------- torch.compile


def test_compiled_small_model_matches_eager():
    """A compile smoke test (dynamo + AOT autograd; no C++ toolchain needed): the same outputs and gradients as
    eager. (Not fullgraph: the fused GELU-linear's autograd.Function, which calls autograd.grad, breaks it.)"""
    torch._dynamo.reset()
    model = build_backbone("vit_tiny", 8, depth=2, embed_dim=48, num_heads=3, num_register_tokens=2, init_values=1e-5)
    model.eval()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, 2 * model.patch_size, 3 * model.patch_size)
    eager_out = model.forward_features(x)["x_norm_patchtokens"]
    eager_out.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled_out = compiled(x, is_training=True)["x_norm_patchtokens"]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    compiled_out.square().mean().backward()
    for pname, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[pname].grad, grad, rtol=1e-4, atol=1e-6)
