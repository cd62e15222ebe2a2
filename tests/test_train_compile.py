"""`train.compile` / `--compile`: compiled transformer blocks train exactly like eager ones and leave the
checkpoints as they are (same keys, no `_orig_mod`), so compiled and eager runs can resume each other."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dino.config import compose
from dino.train.cli import CLI
from dino.train.loop import train
from dino.train.meta_arch import compile_enabled
from tests.helpers import tiny_overrides, write_image_folder

# inductor's CPU backend builds C++ kernels at run time
HAVE_COMPILER = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
needs_inductor = pytest.mark.skipif(not HAVE_COMPILER, reason="torch.compile (inductor) needs a C++ compiler on CPU")

# A DINOv2 step: iBOT, KoLeo, LayerScale, uniform drop path. LayerScale starts at 1, not DINOv2's 1e-5: that
# shrinks the block gradients towards AdamW's eps, where its normalised first steps turn rounding noise into
# ±lr moves — two eager runs with 1 and 2 threads then differ by 3e-4 in the third loss already.
RECIPE = (
    "optim.epochs=1",
    "dino.loss_style=v2",
    "dino.centering=softmax",
    "ibot.loss_weight=1.0",
    "dino.koleo_loss_weight=0.1",
    "model.drop_path_rate=0.2",
    "model.drop_path_uniform=true",
    "model.layerscale=1.0",
)


def comparable(key: str, value: torch.Tensor) -> torch.Tensor:
    """The parameter without its key bias: softmax is shift-invariant along the keys, so that bias has an exactly
    zero gradient whose float value is rounding noise — which AdamW turns into ±lr moves either way."""
    return value.view(3, -1)[[0, 2]] if key.endswith("attn.qkv.bias") else value


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A labelled ImageFolder of 3 classes × 8 images, 32 px."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture
def fallback_random(monkeypatch):
    """Inductor draws random numbers with its own generator, so drop path would drop other samples than in
    eager mode (same distribution, other draws). Its fallback calls the eager random ops in the same order,
    which makes the comparison exact. Compiled graphs are dropped before (so that this test compiles its own)
    and after."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def losses_by_step(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_compile_flag_sets_the_config_key():
    cfg = CLI.parse([])[0]
    assert cfg.train.compile == "auto"  # compiled on CUDA only, where the one-GPU check measured the gain
    assert compile_enabled(cfg, "cuda") and not compile_enabled(cfg, "cpu")
    flagged = CLI.parse(["--compile"])[0]
    assert flagged.train.compile is True and compile_enabled(flagged, "cpu")
    assert not compile_enabled(CLI.parse(["--compile", "false"])[0], "cuda")


@needs_inductor
def test_compiled_blocks_give_the_eager_losses_and_checkpoint_keys(tmp_path, image_folder, fallback_random):
    eager = train(compose("train/demo", tiny_overrides(image_folder, tmp_path / "eager", 8, *RECIPE)))
    torch._dynamo.utils.counters.clear()
    compiled = train(
        compose("train/demo", tiny_overrides(image_folder, tmp_path / "compiled", 8, *RECIPE, "train.compile=true"))
    )
    assert eager.global_step == compiled.global_step == 3
    # student (grad) at 2 crop sizes + teacher (no grad): a silent eager fallback would compile nothing
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3

    expected, got = losses_by_step(tmp_path / "eager"), losses_by_step(tmp_path / "compiled")
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)

    a = torch.load(tmp_path / "eager" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "compiled" / "checkpoint.pth", weights_only=False)
    for part in ("student", "teacher", "objective"):
        assert list(a[part]) == list(b[part]), part
        assert not any("_orig_mod" in key for key in b[part]), part
        for key in a[part]:
            torch.testing.assert_close(
                comparable(key, b[part][key]),
                comparable(key, a[part][key]),
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, key=key, part=part: f"{part}.{key}: {m}",
            )
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"])

    a = torch.load(tmp_path / "eager" / "teacher_backbone.pth", weights_only=True)
    b = torch.load(tmp_path / "compiled" / "teacher_backbone.pth", weights_only=True)
    assert list(a) == list(b) and "blocks.0.attn.qkv.weight" in b
    for key in a:
        torch.testing.assert_close(
            comparable(key, b[key]), comparable(key, a[key]), rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
        )
