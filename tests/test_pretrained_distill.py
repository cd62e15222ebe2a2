"""Continued pretraining from a backbone file, distillation from a frozen teacher, the feature-distillation loss."""

import json
from pathlib import Path

import pytest
import torch

from dino.config import compose
from dino.errors import UserError
from dino.hub import load_backbone, save_backbone
from dino.losses import feature_distillation_loss
from dino.models import build_backbone
from dino.train import loop as loop_module
from dino.train.loop import train
from dino.train.pretrained import head_warmup_iters
from tests.helpers import tiny_overrides, write_image_folder

RELEASED = dict(
    arch="vit_tiny", patch_size=8, depth=2, embed_dim=48, img_size=32, init_values=1e-5, num_register_tokens=1
)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny "released" backbone on disk (registers and LayerScale the demo config does not have), no heads."""
    torch.manual_seed(7)
    kwargs = {k: v for k, v in RELEASED.items() if k not in ("arch", "patch_size")}
    model = build_backbone("vit_tiny", 8, **kwargs)
    path = tmp_path_factory.mktemp("released") / "released.safetensors"
    save_backbone(model, path, RELEASED)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def config(image_folder, output_dir, *extra):
    return compose(
        "train/demo", tiny_overrides(image_folder, output_dir, 8, "dino.loss_style=v2", "ibot.loss_weight=1.0", *extra)
    )


def backbone_of(state: dict, prefix: str = "backbone.") -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def heads_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(("dino_head.", "ibot_head."))}


def losses_by_step(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_continued_pretraining_warms_up_heads_on_a_frozen_backbone_then_unfreezes(tmp_path, image_folder, released):
    path, weights = released
    out = tmp_path / "run"
    extra = (
        f"model.pretrained_weights={path}",
        "train.head_warmup_iters=2",
        "optim.backbone_lr_mult=0.25",
        "optim.warmup_epochs=0",
    )
    cfg = config(image_folder, out, *extra, "train.max_iters=2")
    train(cfg)
    assert cfg.model.num_register_tokens == 1 and cfg.model.layerscale == 1e-5  # the architecture followed the file
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    for network in ("student", "teacher"):  # bit-identical backbones after 2 warm-up steps (teacher: EMA of equals)
        got = backbone_of(state[network])
        assert set(got) == set(weights) and all(torch.equal(got[k], weights[k]) for k in weights), network
    student_heads, teacher_heads = heads_of(state["student"]), heads_of(state["teacher"])
    assert any(not torch.equal(v, teacher_heads[k]) for k, v in student_heads.items())  # heads trained
    # the backbone had no optimiser state during the warm-up; its lr is backbone_lr_mult × the heads' lr
    groups = state["optimizer"]["param_groups"]
    backbone_groups = [g for g in groups if all(n.startswith("backbone.") for n in g["names"])]
    head_groups = [g for g in groups if all(n.startswith(("dino_head.", "ibot_head.")) for n in g["names"])]
    assert backbone_groups and head_groups
    assert {g["lr_multiplier"] for g in backbone_groups} == {0.25}
    head_lr = max(g["lr"] for g in head_groups if not g["is_last_layer"])
    assert head_lr > 0 and all(g["lr"] == pytest.approx(0.25 * head_lr) for g in backbone_groups)
    backbone_ids = {i for g in backbone_groups for i in g["params"]}
    assert not backbone_ids & set(state["optimizer"]["state"])

    train(config(image_folder, out, *extra, "train.max_iters=4"))  # resumes, past the warm-up
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    moved = backbone_of(state["student"])
    assert any(not torch.equal(moved[k], weights[k]) for k in weights)
    # resumed across the unfreezing: the losses of an uninterrupted run
    train(config(image_folder, tmp_path / "straight", *extra, "train.max_iters=4"))
    assert losses_by_step(out) == losses_by_step(tmp_path / "straight") and len(losses_by_step(out)) == 4
    # the export is the file's architecture and loads with the one loader
    exported = load_backbone(str(out / "teacher_backbone.safetensors"))
    assert exported.num_register_tokens == 1


def test_our_training_checkpoint_brings_its_heads_and_head_sizes(tmp_path, image_folder, released):
    path, _ = released
    first = tmp_path / "first"
    train(
        config(
            image_folder, first, f"model.pretrained_weights={path}", "train.max_iters=1", "train.head_warmup_iters=1"
        )
    )
    source = torch.load(first / "checkpoint.pth", weights_only=False)["teacher"]
    # another head size on the command line: the file's wins; lr 0 keeps the start visible after a step
    cfg = config(
        image_folder,
        tmp_path / "second",
        f"model.pretrained_weights={first / 'checkpoint.pth'}",
        "dino.head_n_prototypes=32",
        "ibot.head_n_prototypes=32",
        "optim.lr=0",
        "train.max_iters=1",
    )
    train(cfg)
    assert cfg.dino.head_n_prototypes == 64
    state = torch.load(tmp_path / "second" / "checkpoint.pth", weights_only=False)
    for network in ("student", "teacher"):
        assert all(torch.equal(state[network][k], v) for k, v in source.items()), network
    # heads from the file need no warm-up; fresh ones get 10 % of the run unless train.head_warmup_iters says
    assert head_warmup_iters(cfg, fresh_heads=False, total_iters=100) == 0
    assert head_warmup_iters(cfg, fresh_heads=True, total_iters=100) == 10


def test_distillation_keeps_the_teacher_fixed_and_the_student_learns(tmp_path, image_folder, monkeypatch):
    torch.manual_seed(11)  # a wider teacher than the student (96 vs 48), its heads fitted first
    teacher_kwargs = dict(arch="vit_tiny", patch_size=8, depth=2, embed_dim=96, img_size=32)
    teacher_model = build_backbone("vit_tiny", 8, depth=2, embed_dim=96, img_size=32)
    teacher_file = tmp_path / "teacher.safetensors"
    save_backbone(teacher_model, teacher_file, teacher_kwargs)
    reference = {k: v.clone() for k, v in teacher_model.state_dict().items()}

    seen, original = [], loop_module.train_step

    def recording_step(batch, student, teacher, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in teacher.state_dict().items()})
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        return original(batch, student, teacher, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", recording_step)
    out = tmp_path / "distilled"
    distill = (
        f"distill.teacher={teacher_file}",
        "train.head_warmup_iters=3",
        "dino.centering=sinkhorn_knopp",
        "optim.epochs=2",
        "optim.warmup_epochs=0",
        "optim.lr=0.002",
        "optim.freeze_last_layer=0",
        "crops.local_crops_number=0",
    )
    result = train(config(image_folder, out, *distill))
    assert result.global_step == 6 and len(seen) == 6
    assert all(torch.equal(s["backbone." + k], v) for s in seen for k, v in reference.items())
    assert all(torch.equal(s[k], seen[0][k]) for s in seen for k in seen[0])  # the fitted heads never move
    assert (out / "distill_teacher_heads.pth").is_file()
    losses = list(losses_by_step(out).values())
    assert sum(losses[-2:]) < sum(losses[:2])  # the student learns the teacher's targets
    exported = load_backbone(str(out / "teacher_backbone.safetensors"))  # the student EMA, the student's size
    assert exported.embed_dim == 48
    # interrupted and resumed (the fitted heads read back, not fitted again): the same losses
    monkeypatch.setattr(loop_module, "train_step", original)
    resumed = tmp_path / "resumed"
    train(config(image_folder, resumed, *distill, "train.max_iters=4"))
    train(config(image_folder, resumed, *distill))
    assert losses_by_step(resumed) == losses_by_step(out)


def test_distillation_refuses_mismatched_prototypes_and_patch_grids(tmp_path, image_folder, released):
    path, _ = released
    first = tmp_path / "first"
    train(
        config(
            image_folder, first, f"model.pretrained_weights={path}", "train.max_iters=1", "train.head_warmup_iters=1"
        )
    )
    with pytest.raises(UserError, match="prototypes must match; set dino.head_n_prototypes=64"):
        train(
            config(
                image_folder, tmp_path / "a", f"distill.teacher={first / 'checkpoint.pth'}", "dino.head_n_prototypes=32"
            )
        )
    with pytest.raises(UserError, match="different grids"):
        train(config(image_folder, tmp_path / "b", f"distill.teacher={path}", "model.patch_size=4"))


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1"])
def test_feature_distillation_loss_matches_a_token_by_token_computation(kind):
    torch.manual_seed(0)
    B, N, Ds, Dt = 3, 5, 6, 4
    s_cls, s_patch = torch.randn(B, Ds), torch.randn(B, N, Ds)
    t_cls, t_patch = torch.randn(B, Dt), torch.randn(B, N, Dt) * 2
    weight, bias = torch.randn(Dt, Ds), torch.randn(Dt)

    def token_loss(s, t):
        p = [sum(float(weight[d, j]) * float(s[j]) for j in range(Ds)) + float(bias[d]) for d in range(Dt)]
        t = [float(x) for x in t]
        if kind == "cosine":
            dot = sum(a * b for a, b in zip(p, t))
            return 1 - dot / (sum(a * a for a in p) ** 0.5 * sum(b * b for b in t) ** 0.5)
        return sum(0.5 * (a - b) ** 2 if abs(a - b) < 1 else abs(a - b) - 0.5 for a, b in zip(p, t)) / Dt

    cls = sum(token_loss(s_cls[b], t_cls[b]) for b in range(B)) / B
    patch = sum(token_loss(s_patch[b, n], t_patch[b, n]) for b in range(B) for n in range(N)) / (B * N)
    total, terms = feature_distillation_loss(s_cls, s_patch, t_cls, t_patch, weight, bias, kind=kind, patch_weight=0.5)
    assert float(terms["cls"]) == pytest.approx(cls, rel=1e-5)
    assert float(terms["patch"]) == pytest.approx(patch, rel=1e-5)
    assert float(total) == pytest.approx(cls + 0.5 * patch, rel=1e-5)
    weight.requires_grad_(True)
    t_cls.requires_grad_(True)
    feature_distillation_loss(s_cls, None, t_cls, None, weight, kind=kind)[0].backward()
    assert weight.grad is not None and t_cls.grad is None  # the teacher side carries no gradient
    with pytest.raises(ValueError, match="token count"):
        feature_distillation_loss(s_cls, s_patch, t_cls, t_patch[:, :3], weight, bias, kind=kind)


def test_lora_trains_adapters_on_a_frozen_backbone_and_exports_them_merged(tmp_path, image_folder, released):
    path, weights = released
    out = tmp_path / "lora"
    train(
        config(
            image_folder,
            out,
            f"model.pretrained_weights={path}",
            "model.lora_rank=2",
            "train.head_warmup_iters=1",
            "optim.warmup_epochs=0",
            "train.max_iters=3",
        )
    )
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    assert all(torch.equal(backbone_of(state["student"])[k], v) for k, v in weights.items())  # frozen for good
    adapters = {k: v for k, v in state["student"].items() if k.startswith("lora.")}
    assert set(adapters) == {f"lora.{b}_{t}.{m}" for b in (0, 1) for t in ("qkv", "proj") for m in ("A", "B")}
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith(".B"))  # B starts at 0: it trained
    names = [n for g in state["optimizer"]["param_groups"] for n in g["names"]]
    assert not any(n.startswith("backbone.") for n in names)  # no optimiser state for the backbone
    exported = load_backbone(str(out / "teacher_backbone.safetensors")).state_dict()
    teacher = state["teacher"]
    for block in (0, 1):
        for layer in ("qkv", "proj"):
            delta = teacher[f"lora.{block}_{layer}.B"] @ teacher[f"lora.{block}_{layer}.A"]  # alpha = rank: scale 1
            base = teacher[f"backbone.blocks.{block}.attn.{layer}.weight"]
            assert torch.allclose(exported[f"blocks.{block}.attn.{layer}.weight"], base + delta, atol=1e-6)


def test_lora_merged_export_computes_what_the_adapted_network_computes():
    from dino.models import DINOHead
    from dino.train.lora import add_lora, export_backbone
    from dino.train.meta_arch import MultiCropNetwork

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", 8, depth=2, embed_dim=48, img_size=32)
    network = MultiCropNetwork(backbone, DINOHead(48, 16, nlayers=1, hidden_dim=16, bottleneck_dim=8)).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = backbone(x)
    adapters = add_lora(network, rank=3, alpha=6.0, targets=("qkv", "proj", "fc1"))
    assert torch.allclose(backbone(x), plain)  # B = 0: the adapters start as the identity
    for adapter in adapters.values():
        torch.nn.init.normal_(adapter.B, std=0.1)
    adapted = backbone(x)
    assert not torch.allclose(adapted, plain, atol=1e-4)
    merged = export_backbone(network)
    assert set(merged.state_dict()) == set(backbone.state_dict())  # the official layout, no adapter keys
    assert torch.allclose(merged(x), adapted, atol=1e-5)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in adapters.parameters())
    with pytest.raises(UserError, match="fc2 runs fused"):
        add_lora(
            MultiCropNetwork(build_backbone("vit_tiny", 8, depth=1, embed_dim=48), network.dino_head),
            2,
            targets=("fc2",),
        )


def test_feature_distillation_trains_a_projection_onto_the_teacher_tokens(tmp_path, image_folder):
    torch.manual_seed(5)
    teacher_file = tmp_path / "teacher.safetensors"
    save_backbone(
        build_backbone("vit_tiny", 8, depth=2, embed_dim=96, img_size=32),
        teacher_file,
        dict(arch="vit_tiny", patch_size=8, depth=2, embed_dim=96, img_size=32),
    )
    out = tmp_path / "feature"
    train(
        config(
            image_folder,
            out,
            f"distill.teacher={teacher_file}",
            "distill.feature_loss_weight=1.0",
            "distill.feature_loss=smooth_l1",
            "train.head_warmup_iters=0",
            "optim.warmup_epochs=0",
            "crops.local_crops_number=0",
            "train.max_iters=3",
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"feature"' in line]
    assert len(rows) == 3 and all(row["feature"] > 0 for row in rows)
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    proj = "dino_head.feature_proj.weight"
    assert state["student"][proj].shape == (96, 48)  # student width → teacher width
    assert not torch.equal(state["student"][proj], state["teacher"][proj])
    # the checkpoint's teacher (the student EMA) still reads as a plain backbone, e.g. for the eval scripts
    assert load_backbone(str(out / "checkpoint.pth")).embed_dim == 48
    with pytest.raises(UserError, match="needs a teacher"):
        train(config(image_folder, tmp_path / "no_teacher", "distill.feature_loss_weight=1.0"))


def test_v1_and_v3_files_build_students_that_hold_their_weights(tmp_path, image_folder, caplog):
    from dino.models import ConvNeXt, DinoV3VisionTransformer, dinov3_vision_transformer
    from dino.train.pretrained import build_pretrained_networks, prepare_config, take_prepared

    v1 = build_backbone("vit_tiny", 8, depth=2, embed_dim=48, img_size=32, init_values=None, use_mask_token=False)
    save_backbone(
        v1,
        tmp_path / "v1.pth",
        dict(arch="vit_tiny", patch_size=8, depth=2, embed_dim=48, img_size=32, init_values=None, use_mask_token=False),
    )
    cfg = config(image_folder, tmp_path / "a", f"model.pretrained_weights={tmp_path / 'v1.pth'}")
    with caplog.at_level("INFO"):
        student, teacher, _ = build_pretrained_networks(cfg, take_prepared(cfg))
    assert "initialised fresh: mask_token, dino_head" in caplog.text  # iBOT needs the token DINO v1 never had
    assert cfg.model.layerscale is None and cfg.model.use_mask_token is True
    got = student.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in v1.state_dict().items()) and "mask_token" in got

    v3 = dinov3_vision_transformer("vit_small", depth=2, embed_dim=48, num_heads=3, patch_size=8)
    save_backbone(v3, tmp_path / "v3.safetensors", None)
    cfg = config(
        image_folder, tmp_path / "b", f"model.pretrained_weights={tmp_path / 'v3.safetensors'}", "model.patch_size=16"
    )
    student, teacher, _ = build_pretrained_networks(cfg, take_prepared(cfg))
    assert isinstance(student.backbone, DinoV3VisionTransformer) and cfg.model.patch_size == 8
    assert all(torch.equal(student.backbone.state_dict()[k], v) for k, v in v3.state_dict().items())
    assert all(torch.equal(teacher.backbone.state_dict()[k], v) for k, v in v3.state_dict().items())

    save_backbone(ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48)), tmp_path / "cnx.safetensors", None)
    with pytest.raises(UserError, match="ConvNeXt .* ViT students only"):
        prepare_config(config(image_folder, tmp_path / "c", f"model.pretrained_weights={tmp_path / 'cnx.safetensors'}"))
