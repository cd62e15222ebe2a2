"""The HPU lazy-mode path: `mark_step` after the backward and after the optimiser step, in that order, with a
fake `habana_frameworks` (the tensors stay on the CPU; only the device context believes it drives an HPU)."""

import sys
import types

import pytest
import torch

from dino.config import compose
from dino.data.demo_dataset import make_demo_image
from dino.distributed import DeviceContext
from dino.train.data_pipeline import build_training_data
from dino.train.loop import build_optimizer, train_step
from dino.train.meta_arch import SelfDistillationObjective, build_networks


@pytest.fixture
def events(monkeypatch):
    """A fake `habana_frameworks.torch.core` whose mark_step appends to the returned list."""
    calls = []
    core = types.ModuleType("habana_frameworks.torch.core")
    core.mark_step = lambda: calls.append("mark_step")
    hf_torch = types.ModuleType("habana_frameworks.torch")
    hf_torch.core = core
    hf = types.ModuleType("habana_frameworks")
    hf.torch = hf_torch
    monkeypatch.setitem(sys.modules, "habana_frameworks", hf)
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", hf_torch)
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch.core", core)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


def test_hpu_step_marks_after_backward_and_after_optimizer_step(tmp_path, events, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        make_demo_image(i % 3, seed=i, image_size=32).save(folder / f"{i}.png")
    cfg = compose("train/demo", [
        f"train.data_path={folder}", f"train.output_dir={tmp_path / 'out'}", "train.num_workers=0",
        "train.batch_size_per_device=4", "model.arch=vit_tiny", "model.patch_size=8", "model.depth=1",
        "model.embed_dim=48", "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=1",
        "dino.head_n_prototypes=32", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    ])
    ctx = DeviceContext.create("hpu", hmp=False)
    assert ctx.type == "hpu" and ctx.backend == "hccl"
    # tensors stay on the CPU: only mark_step is the HPU's
    monkeypatch.setattr(DeviceContext, "device", property(lambda self: torch.device("cpu")))

    data = build_training_data(cfg, ctx)
    _, _, batch = next(data.stream(0, 0))
    student, teacher, _ = build_networks(cfg)
    objective = SelfDistillationObjective(cfg, 1)
    optimizer = build_optimizer(cfg, student)

    # the last gradient of the backward is the one of the first parameter (patch embedding)
    first_param = next(student.parameters())
    first_param.register_hook(lambda grad: events.append("backward done") or grad)
    original_step = optimizer.step

    def recording_step(*args, **kwargs):
        events.append("optimizer.step")
        return original_step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", recording_step)
    train_step(batch, student, teacher, objective, optimizer, None, ctx, cfg, 0.04)
    assert events == ["backward done", "mark_step", "optimizer.step", "mark_step"]
