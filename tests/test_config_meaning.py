"""Config that says what it means: one precision key with its muscle-memory aliases, the three switches behind
`dino.loss_style` (each changes what it names and nothing else), keys that used to live only in code, and
configs of older versions (`train.hmp`, a stored `loss_style` without the switches) still understood."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dino.config import LOSS_STYLES, compose, upgrade_legacy_keys
from dino.config_validation import read_checkpoint_config, validate_training_config
from dino.distributed import DeviceContext
from dino.errors import UserError
from dino.train.data_pipeline import build_training_data
from dino.train.loop import build_optimizer, build_schedules, train
from dino.train.meta_arch import SelfDistillationObjective
from tests.helpers import tiny_overrides, write_image_folder

SWITCHES = ("dino.center_update", "dino.pair_normalisation", "teacher.temp_per_iteration")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "train")


def same_schedules(a, b, names=("lr", "last_layer_lr", "weight_decay", "momentum", "teacher_temp")) -> bool:
    return all(
        np.array_equal(getattr(a, n).values, getattr(b, n).values)
        and getattr(a, n).final_value == getattr(b, n).final_value
        for n in names
    ) and ("teacher_temp" not in names or a.teacher_temp_per_iteration == b.teacher_temp_per_iteration)


def switches(cfg) -> dict:
    return {key: OmegaConf.select(cfg, key) for key in SWITCHES}


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "fp32"),
        (["--hmp"], "bf16"),
        (["--use_bf16", "true"], "bf16"),
        (["--fp16"], "fp16"),
        (["--use_fp16"], "fp16"),
        (["--hmp", "false"], "fp32"),
        (["--precision", "bf16"], "bf16"),
        (["--precision", "fp16", "--data_path", ""], "fp16"),
    ],
)
def test_training_precision_flag_and_its_aliases_set_train_precision(argv, expected):
    from dino.train.cli import CLI

    cfg, _ = CLI.parse(argv)
    assert cfg.train.precision == expected
    assert "hmp" not in cfg.train and "fp16" not in cfg.train


@pytest.mark.parametrize(
    "argv, expected", [([], "fp32"), (["--hmp"], "bf16"), (["--precision", "bf16"], "bf16"), (["--use_fp16"], "fp16")]
)
def test_eval_precision_flag_and_its_aliases_set_precision(argv, expected):
    from dino.jobs.eval_knn import CLI

    cfg, _ = CLI.parse(argv)
    assert cfg.precision == expected and "hmp" not in cfg


def test_every_eval_preset_with_a_device_has_one_precision_key():
    for name in (
        "knn",
        "linear",
        "logreg",
        "retrieval",
        "copy_detection",
        "segmentation",
        "depth",
        "video_segmentation",
    ):
        cfg = compose(f"eval/{name}")
        assert cfg.precision == "fp32" and "hmp" not in cfg, name


def test_old_precision_overrides_map_onto_precision():
    assert compose("train/demo", ["train.hmp=true"]).train.precision == "bf16"
    assert compose("train/demo", ["train.fp16=true"]).train.precision == "fp16"
    assert compose("train/demo", ["train.hmp=false"]).train.precision == "fp32"
    assert compose("eval/knn", ["hmp=true"]).precision == "bf16"
    with pytest.raises(UserError, match="train.precision"):
        compose("train/demo", ["train.hmp=maybe"])


def test_validator_checks_the_precision_choice(tmp_path):
    base = [f"train.output_dir={tmp_path}"]
    validate_training_config(compose("train/demo", base + ["train.precision=bf16"]))
    with pytest.raises(UserError, match="train.precision must be one of fp32, bf16, fp16"):
        validate_training_config(compose("train/demo", base + ["train.precision=fp64"]))
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        validate_training_config(compose("train/demo", base + ["train.precision=fp16", "train.device=cpu"]))


def test_device_context_takes_the_precision():
    assert DeviceContext(type="cpu").autocast_dtype is None
    assert DeviceContext(type="cpu", precision="bf16").autocast_dtype is torch.bfloat16
    assert DeviceContext(type="cuda", precision="fp16").autocast_dtype is torch.float16
    with pytest.raises(UserError, match="precision must be one of"):
        DeviceContext(type="cpu", precision="int8")


# ------------------------------------------------------------------------------------------ loss switches


@pytest.mark.parametrize(
    "preset, style",
    [
        ("dino_vits16", "v1"),
        ("dinov2_vits14", "v2"),
        ("dinov2_vitb14", "v2"),
        ("dinov2_vitl14", "v2"),
        ("dinov2_vitg14", "v2"),
        ("demo", "v2"),
        ("small_data", "v2"),
    ],
)
def test_presets_keep_their_published_switches(preset, style):
    cfg = compose(f"train/{preset}")
    assert switches(cfg) == LOSS_STYLES[style]
    assert LOSS_STYLES["v1"] == {
        "dino.center_update": "immediate",
        "dino.pair_normalisation": "pair_mean",
        "teacher.temp_per_iteration": False,
    }
    assert LOSS_STYLES["v2"] == {
        "dino.center_update": "deferred",
        "dino.pair_normalisation": "dinov2",
        "teacher.temp_per_iteration": True,
    }


def test_loss_style_is_a_shorthand_a_switch_set_itself_wins():
    cfg = compose("train/dino_vits16", ["dino.loss_style=v2", "dino.center_update=immediate"])
    assert switches(cfg) == {**LOSS_STYLES["v2"], "dino.center_update": "immediate"}
    # the written config spells the switches out
    written = OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))
    assert switches(written) == switches(cfg)


def test_validator_checks_the_switches(tmp_path):
    base = [f"train.output_dir={tmp_path}"]
    for override, message in (
        ("dino.center_update=later", "dino.center_update must be one of immediate, deferred"),
        ("dino.pair_normalisation=mean", "dino.pair_normalisation must be one of"),
        ("teacher.temp_per_iteration=3", "teacher.temp_per_iteration must be true or false"),
        ("dino.loss_style=v3", "dino.loss_style must be one of v1, v2"),
    ):
        with pytest.raises(UserError, match=message):
            validate_training_config(compose("train/demo", base + [override]))
    # without the shorthand every switch must be set itself
    with pytest.raises(UserError, match=r"dino.loss_style must be v1 or v2 \(or set dino.center_update itself\)"):
        validate_training_config(compose("train/demo", base + ["dino.loss_style=null"]))
    spelled = base + [
        "dino.loss_style=null",
        "dino.center_update=deferred",
        "dino.pair_normalisation=dinov2",
        "teacher.temp_per_iteration=true",
    ]
    validate_training_config(compose("train/demo", spelled))


def _objective_run(cfg, seed=0):
    """Two calls of the objective on fixed logits: (losses, terms, center after 1st targets, center after 2nd)."""
    torch.manual_seed(seed)
    n_local, batch, k = int(cfg.crops.local_crops_number), 4, int(cfg.dino.head_n_prototypes)
    objective = SelfDistillationObjective(cfg, n_local)
    out = []
    for _ in range(2):
        teacher_out = {"global_cls_logits": torch.randn(2 * batch, k)}
        student_out = {
            "global_cls_logits": torch.randn(2 * batch, k),
            "local_cls_logits": torch.randn(n_local * batch, k),
            "global_cls_tokens": torch.randn(2 * batch, 8),
        }
        targets = objective.teacher_targets(teacher_out, 0.04)
        center = objective.dino_loss.center.clone()
        loss, terms = objective(student_out, targets)
        out.append((loss, {name: value.item() for name, value in terms.items()}, center))
    return out


def test_center_update_changes_the_center_timing_and_nothing_else():
    overrides = ["dino.head_n_prototypes=32", "crops.local_crops_number=2"]
    immediate = compose("train/dino_vits16", overrides)
    deferred = compose("train/dino_vits16", overrides + ["dino.center_update=deferred"])
    assert switches(deferred) == {**switches(immediate), "dino.center_update": "deferred"}
    a, b = _objective_run(immediate), _objective_run(deferred)
    # the first loss is the same; the immediate center moved right after the first targets, the deferred one not yet
    assert torch.equal(a[0][0], b[0][0]) and a[0][1].keys() == b[0][1].keys() == {"dino"}
    assert not torch.equal(a[0][2], b[0][2]) and torch.equal(b[0][2], torch.zeros_like(b[0][2]))
    # deferred folds it in at the next call: the same center then (DINOv2's "same centers, one step later")
    torch.testing.assert_close(b[1][2], a[0][2])
    n = int(immediate.crops.local_crops_number)
    assert SelfDistillationObjective(deferred, n).dino_loss.deferred_update
    assert not SelfDistillationObjective(immediate, n).dino_loss.deferred_update
    assert same_schedules(build_schedules(immediate, 5, 64), build_schedules(deferred, 5, 64))


def test_pair_normalisation_changes_the_cls_terms_and_nothing_else():
    overrides = ["dino.head_n_prototypes=32", "crops.local_crops_number=2"]
    pair_mean = compose("train/dino_vits16", overrides)
    dinov2 = compose("train/dino_vits16", overrides + ["dino.pair_normalisation=dinov2"])
    assert switches(dinov2) == {**switches(pair_mean), "dino.pair_normalisation": "dinov2"}
    a, b = _objective_run(pair_mean), _objective_run(dinov2)
    assert a[0][1].keys() == {"dino"} and b[0][1].keys() == {"dino_global", "dino_local"}
    for step in range(2):
        torch.testing.assert_close(a[step][2], b[step][2])  # the same centers: the timing did not change
    # the same pairs (teacher global crop, every other student crop), normalised as one mean or as two terms
    assert a[0][1]["dino"] == pytest.approx(b[0][1]["dino_global"] + b[0][1]["dino_local"], rel=1e-5)
    assert same_schedules(build_schedules(pair_mean, 5, 64), build_schedules(dinov2, 5, 64))


def test_temp_per_iteration_changes_the_teacher_temperature_schedule_and_nothing_else():
    overrides = ["teacher.warmup_teacher_temp_epochs=2", "teacher.warmup_teacher_temp=0.02", "optim.epochs=4"]
    per_epoch = compose("train/dino_vits16", overrides)
    per_iter = compose("train/dino_vits16", overrides + ["teacher.temp_per_iteration=true"])
    assert switches(per_iter) == {**switches(per_epoch), "teacher.temp_per_iteration": True}
    a, b = build_schedules(per_epoch, 5, 64), build_schedules(per_iter, 5, 64)
    assert same_schedules(a, b, ("lr", "last_layer_lr", "weight_decay", "momentum"))
    assert not a.teacher_temp_per_iteration and b.teacher_temp_per_iteration
    # per epoch: constant within an epoch; per iteration: rises within it
    assert a.teacher_temp_at(0, 0) == a.teacher_temp_at(0, 4)
    assert b.teacher_temp_at(0, 0) < b.teacher_temp_at(0, 4)
    n = int(per_epoch.crops.local_crops_number)
    x, y = SelfDistillationObjective(per_epoch, n), SelfDistillationObjective(per_iter, n)
    assert x.pair_normalisation == y.pair_normalisation and x.dino_loss.deferred_update == y.dino_loss.deferred_update


def test_the_v2_shorthand_equals_its_three_switches():
    overrides = ["dino.head_n_prototypes=32", "crops.local_crops_number=2"]
    shorthand = compose("train/dino_vits16", overrides + ["dino.loss_style=v2"])
    spelled = compose("train/dino_vits16", overrides + [f"{k}={str(v).lower()}" for k, v in LOSS_STYLES["v2"].items()])
    assert switches(shorthand) == switches(spelled)
    for (la, ta, ca), (lb, tb, cb) in zip(_objective_run(shorthand), _objective_run(spelled)):
        assert torch.equal(la, lb) and ta == tb and torch.equal(ca, cb)
    assert same_schedules(build_schedules(shorthand, 5, 64), build_schedules(spelled, 5, 64))


# ---------------------------------------------------------------------------- keys that were code defaults


def test_code_defaults_live_in_the_yaml(image_folder, tmp_path):
    cfg = compose("train/demo", tiny_overrides(image_folder, tmp_path, 8, "ibot.loss_weight=1.0"))
    assert cfg.model.use_mask_token is True and cfg.optim.sgd_momentum == 0.9
    assert (cfg.ibot.mask_block_min_patches, cfg.ibot.mask_block_max_fraction, cfg.ibot.mask_block_min_aspect) == (
        4,
        0.5,
        0.3,
    )
    ctx = DeviceContext(type="cpu")
    generator = build_training_data(cfg, ctx).collate_fn.keywords["mask_generator"]
    assert (generator.min_num_patches, generator.max_num_patches, generator.min_aspect) == (4, 8, 0.3)  # 4×4 grid

    changed = compose(
        "train/demo",
        tiny_overrides(
            image_folder,
            tmp_path,
            8,
            "ibot.loss_weight=1.0",
            "ibot.mask_block_min_patches=2",
            "ibot.mask_block_max_fraction=0.25",
            "ibot.mask_block_min_aspect=0.5",
        ),
    )
    generator = build_training_data(changed, ctx).collate_fn.keywords["mask_generator"]
    assert (generator.min_num_patches, generator.max_num_patches, generator.min_aspect) == (2, 4, 0.5)

    from dino.train.meta_arch import build_networks

    sgd = compose(
        "train/demo", tiny_overrides(image_folder, tmp_path, 8, "optim.optimizer=sgd", "optim.sgd_momentum=0.8")
    )
    student, _, _ = build_networks(sgd)
    assert {group["momentum"] for group in build_optimizer(sgd, student).param_groups} == {0.8}
    no_token = compose("train/demo", tiny_overrides(image_folder, tmp_path, 8, "model.use_mask_token=false"))
    assert build_networks(no_token)[0].backbone.mask_token is None


# ------------------------------------------------------------------------------------ older stored configs


def _old_style(config_text: str, hmp: bool) -> str:
    """A config as an older version wrote it: train.hmp / train.fp16, dino.loss_style without the switches."""
    old = OmegaConf.create(config_text)
    del old.train["precision"]
    old.train.hmp, old.train.fp16 = hmp, False
    for key in SWITCHES + (
        "model.use_mask_token",
        "optim.sgd_momentum",
        "ibot.mask_block_min_patches",
        "ibot.mask_block_max_fraction",
        "ibot.mask_block_min_aspect",
    ):
        parent, leaf = key.rsplit(".", 1)
        del old[parent][leaf]
    return OmegaConf.to_yaml(old)


def test_old_keys_of_a_stored_config_are_mapped():
    old = OmegaConf.create({"train": {"hmp": True, "fp16": False}, "dino": {"loss_style": "v2"}, "teacher": {}})
    upgrade_legacy_keys(old)
    assert old.train == {"precision": "bf16"}
    assert switches(old) == LOSS_STYLES["v2"]
    old = OmegaConf.create({"train": {"hmp": False, "fp16": True}, "dino": {"loss_style": "v1"}})
    assert upgrade_legacy_keys(old).train.precision == "fp16" and switches(old) == LOSS_STYLES["v1"]
    assert upgrade_legacy_keys(OmegaConf.create({"hmp": True})).precision == "bf16"  # an eval config


def test_an_old_users_preset_is_understood(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.yaml").write_text(
        "defaults:\n  - _base\n  - _self_\ntrain:\n  hmp: true\ndino:\n  loss_style: v2\n"
    )
    monkeypatch.setenv("DINO_CONFIG_DIR", str(tmp_path))
    cfg = compose("train/mine")
    assert cfg.train.precision == "bf16" and "hmp" not in cfg.train
    assert switches(cfg) == LOSS_STYLES["v2"]


def test_a_checkpoint_with_an_old_style_config_resumes(tmp_path, image_folder):
    overrides = ("dino.loss_style=v2", "ibot.loss_weight=1.0", "optim.epochs=1")
    first = train(compose("train/demo", tiny_overrides(image_folder, tmp_path, 8, *overrides, "train.max_iters=2")))
    assert first.global_step == 2
    path = tmp_path / "checkpoint.pth"
    state = torch.load(path, weights_only=True)
    state["config"] = _old_style(state["config"], hmp=True)
    torch.save(state, path)

    saved, _ = read_checkpoint_config(path)
    assert saved.train.precision == "bf16" and "hmp" not in saved.train
    assert switches(saved) == LOSS_STYLES["v2"]

    resumed = train(compose("train/demo", tiny_overrides(image_folder, tmp_path, 8, *overrides, "train.max_iters=3")))
    assert resumed.global_step == 3
    rows = [json.loads(line) for line in Path(tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert {"dino_global", "dino_local"} <= {key for row in rows for key in row}
