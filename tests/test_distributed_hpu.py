"""The HPU lazy-mode path: `mark_step` after the backward and after the optimiser step, in that order, with a
fake `habana_frameworks` (the tensors stay on the CPU; only the device context believes it drives an HPU)."""

import torch

from dino.config import compose
from dino.data.demo_dataset import make_demo_image
from dino.distributed import DeviceContext
from dino.train.data_pipeline import build_training_data
from dino.train.loop import build_optimizer, train_step
from dino.train.meta_arch import SelfDistillationObjective, build_networks
from tests.helpers import tiny_overrides


def test_hpu_step_marks_after_backward_and_after_optimizer_step(tmp_path, fake_habana, monkeypatch):
    events = fake_habana
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        make_demo_image(i % 3, seed=i, image_size=32).save(folder / f"{i}.png")
    cfg = compose(
        "train/demo",
        tiny_overrides(
            folder, tmp_path / "out", 4, "model.depth=1", "crops.local_crops_number=1", "dino.head_n_prototypes=32"
        ),
    )
    ctx = DeviceContext.create("hpu")
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
