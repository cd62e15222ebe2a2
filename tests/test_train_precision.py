"""Mixed precision: `--hmp` (bf16 autocast) on CPU stays close to fp32 with the losses computed in fp32, and the
fp16 GradScaler path scales, unscales before clipping, and steps through the scaler."""

import json
from pathlib import Path

import pytest
import torch

from dino.config import compose
from dino.distributed import DeviceContext
from dino.train.data_pipeline import build_training_data
from dino.train.loop import build_optimizer, train, train_step
from dino.train.meta_arch import SelfDistillationObjective, build_networks
from tests.helpers import tiny_overrides, write_image_folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A labelled ImageFolder of 3 classes × 8 images, 32 px."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "train")


def tiny_config(data_path, output_dir, *extra):
    return compose(
        "train/demo",
        tiny_overrides(
            data_path,
            output_dir,
            8,
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "ibot.loss_weight=1.0",
            "dino.koleo_loss_weight=0.1",
            *extra,
        ),
    )


def losses_by_step(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def one_step_setup(cfg, ctx):
    data = build_training_data(cfg, ctx)
    _, _, batch = next(data.stream(0, 0))
    student, teacher, _ = build_networks(cfg)
    objective = SelfDistillationObjective(cfg, int(cfg.crops.local_crops_number))
    return batch, student, teacher, objective, build_optimizer(cfg, student)


def test_hmp_on_cpu_stays_close_to_fp32(tmp_path, image_folder):
    train(tiny_config(image_folder, tmp_path / "fp32"))
    train(tiny_config(image_folder, tmp_path / "bf16", "train.precision=bf16"))
    fp32, bf16 = losses_by_step(tmp_path / "fp32"), losses_by_step(tmp_path / "bf16")
    assert sorted(fp32) == sorted(bf16) == [1, 2, 3]
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=2e-2), (step, fp32, bf16)
    assert bf16 != fp32  # autocast really ran in bf16


def test_losses_and_targets_are_fp32_under_bf16_autocast(tmp_path, image_folder):
    cfg = tiny_config(image_folder, tmp_path, "train.precision=bf16")
    ctx = DeviceContext.create("cpu", precision="bf16")
    batch, student, teacher, objective, _ = one_step_setup(cfg, ctx)
    with ctx.autocast():
        with torch.no_grad():
            teacher_out = teacher(batch["collated_global_crops"], None, None, batch["mask_indices_list"])
        targets = objective.teacher_targets(teacher_out, 0.04, batch.get("n_masked_patches"))
        student_out = student(
            batch["collated_global_crops"],
            batch["collated_local_crops"],
            batch["collated_masks"],
            batch["mask_indices_list"],
        )
        loss, terms = objective(student_out, targets, batch["masks_weight"], n_images=8)
    assert student_out["global_cls_logits"].dtype == torch.bfloat16  # the networks ran in bf16
    assert targets["cls_probs"].dtype == torch.float32 and targets["patch_probs"].dtype == torch.float32
    assert loss.dtype == torch.float32
    assert {"dino_global", "dino_local", "koleo", "ibot"} <= set(terms)
    assert all(term.dtype == torch.float32 for term in terms.values())


class RecordingScaler:
    """Stands in for torch.amp.GradScaler (which needs CUDA) and records how the step uses it."""

    def __init__(self, calls):
        self.calls = calls

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 1024.0

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.div_(1024.0)

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def test_fp16_path_scales_unscales_before_clipping_and_steps_through_the_scaler(tmp_path, image_folder, monkeypatch):
    cfg = tiny_config(image_folder, tmp_path, "optim.clip_style=per_module")
    ctx = DeviceContext.create("cpu")
    batch, student, teacher, objective, optimizer = one_step_setup(cfg, ctx)
    calls = []
    import dino.train.loop as loop_module

    original_clip = loop_module.clip_grad_norm_per_module

    def recording_clip(parts, max_norm):
        calls.append("clip")
        return original_clip(parts, max_norm)

    monkeypatch.setattr(loop_module, "clip_grad_norm_per_module", recording_clip)
    for group in optimizer.param_groups:  # the loop's schedules would set it; the optimiser starts at 0
        group["lr"] = 1e-3
    before = [p.detach().clone() for p in student.parameters()]
    loss, _, _ = train_step(batch, student, teacher, objective, optimizer, RecordingScaler(calls), ctx, cfg, 0.04)
    assert calls == ["scale", "unscale_", "clip", "step", "update"]
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_fp16_needs_cuda_and_excludes_hmp():
    from dino.errors import UserError

    with pytest.raises(UserError, match="CUDA"):
        DeviceContext.create("cpu", precision="fp16")
    assert DeviceContext(type="cuda", precision="fp16").grad_scaler() is not None
    assert DeviceContext(type="cpu", precision="bf16").grad_scaler() is None
