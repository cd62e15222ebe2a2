"""Linear probe grid (training, best-classifier choice, resume) and logistic regression (against scipy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

import dino.eval.linear as linear
import dino.eval.logreg as logreg
from dino.config import compose
from dino.distributed import DeviceContext
from dino.errors import UserError
from test_eval_knn import load_script
from test_features import save_tiny_vit, write_train_val

CPU = DeviceContext(type="cpu")


# --------------------------------------------------------------------------- a backbone over token tensors


class TokenBackbone(nn.Module):
    """Stands in for a ViT: an 'image' is already a token tensor (1 + patches, D); every block returns it,
    so a probe's input is the CLS vector (repeated per block) and the mean of the patch vectors."""

    embed_dim = 8

    def __init__(self, depth: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(depth))

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        return tuple((x[:, 1:], x[:, 0]) for _ in range(n))


def separable_tokens(num_per_class: int, num_classes: int = 3, seed: int = 0):
    """Class c: CLS = 3·e_c + noise (separable); patch tokens pure noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    tokens = torch.randn(len(labels), 5, TokenBackbone.embed_dim, generator=generator)
    tokens[torch.arange(len(labels)), 0, labels] += 3.0
    return torch.utils.data.TensorDataset(tokens, labels)


def training(epochs: int, **overrides) -> linear.LinearTrainingSettings:
    protocol = compose("eval/linear").linear  # the protocol's defaults live in the YAML only
    values = dict(
        momentum=float(protocol.momentum),
        weight_decay=float(protocol.weight_decay),
        val_every_epochs=int(protocol.val_every_epochs),
        seed=int(protocol.seed),
        resume=bool(protocol.resume),
    )
    return linear.LinearTrainingSettings(
        epochs=epochs, batch_size_per_device=16, num_workers=0, **{**values, **overrides}
    )


# -------------------------------------------------------------------------------------------- the grid


def test_grid_covers_every_combination_and_dedupes():
    grid = linear.probe_grid([0.1, 0.01, 0.1], [1, 4], [False, True])
    assert len(grid) == 8 and len({s.name for s in grid}) == 8
    assert grid[0] == linear.ProbeSetting(1, False, 0.1)
    with pytest.raises(UserError):
        linear.probe_grid([0.0], [1], [False])


def test_lr_scaling_and_cosine_schedule():
    assert linear.scale_lr(0.001, 1024) == pytest.approx(0.004)
    assert linear.cosine_factor(0, 100) == 1.0
    assert linear.cosine_factor(50, 100) == pytest.approx(0.5)
    assert linear.cosine_factor(100, 100) == pytest.approx(0.0)


def test_probe_inputs_have_the_documented_widths():
    grid = linear.LinearProbeGrid(linear.probe_grid([0.1], [1, 4], [False, True]), embed_dim=8, num_classes=3)
    assert [c.in_features for c in grid.classifiers] == [8, 16, 32, 40]
    tokens = TokenBackbone().get_intermediate_layers(torch.randn(2, 5, 8), 4)
    assert [tuple(out.shape) for out in grid(tokens)] == [(2, 3)] * 4


def test_grid_trains_and_the_best_is_the_highest_val_accuracy(tmp_path):
    train, val = separable_tokens(32, seed=0), separable_tokens(10, seed=1)
    # lr 1e-6 cannot move the N(0, 0.01²) init in 3 epochs; lr 1.0 separates the classes
    settings = linear.probe_grid([1e-6, 1.0], [1, 2], [False])
    result = linear.train_linear_probes(TokenBackbone(), train, val, 3, settings, training(3), CPU, str(tmp_path))
    accuracies = {row["name"]: row["top1"] for row in result["classifiers"]}
    assert result["best"]["top1"] == max(accuracies.values()) >= 95.0
    assert result["best"]["lr"] == 1.0 and result["best"]["scaled_lr"] == pytest.approx(1.0 * 16 / 256)
    assert max(accuracies[s.name] for s in settings if s.lr == 1e-6) < 90
    assert len(result["history"]) == 3
    assert (tmp_path / linear.CHECKPOINT_NAME).is_file()
    assert any((tmp_path / "tensorboard").iterdir())


def test_best_classifier_breaks_ties_by_grid_order():
    assert linear.best_classifier([{"top1": 50.0}, {"top1": 70.0}, {"top1": 70.0}]) == 1


def test_interrupted_run_resumes_to_the_same_classifiers(tmp_path, monkeypatch):
    train, val = separable_tokens(16, seed=2), separable_tokens(4, seed=3)
    settings = linear.probe_grid([0.5, 0.05], [1], [False, True])
    linear.train_linear_probes(TokenBackbone(), train, val, 3, settings, training(3), CPU, str(tmp_path / "straight"))

    class Preempted(Exception):
        pass

    original_save = linear.save_linear_checkpoint

    def save_then_stop(path, grid, optimizer, epoch, history):
        original_save(path, grid, optimizer, epoch, history)
        if epoch == 1:
            raise Preempted

    monkeypatch.setattr(linear, "save_linear_checkpoint", save_then_stop)
    with pytest.raises(Preempted):
        linear.train_linear_probes(
            TokenBackbone(), train, val, 3, settings, training(3), CPU, str(tmp_path / "resumed")
        )
    monkeypatch.setattr(linear, "save_linear_checkpoint", original_save)
    assert torch.load(tmp_path / "resumed" / linear.CHECKPOINT_NAME)["epoch"] == 1
    resumed = linear.train_linear_probes(
        TokenBackbone(), train, val, 3, settings, training(3), CPU, str(tmp_path / "resumed")
    )

    straight_state = torch.load(tmp_path / "straight" / linear.CHECKPOINT_NAME)
    resumed_state = torch.load(tmp_path / "resumed" / linear.CHECKPOINT_NAME)
    assert resumed_state["epoch"] == 3 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for key, value in straight_state["classifiers"].items():
        torch.testing.assert_close(resumed_state["classifiers"][key], value)
    # a fresh (non-resumed) run of one epoch differs, so the equality above is not vacuous
    short = linear.train_linear_probes(
        TokenBackbone(), train, val, 3, settings, training(1), CPU, str(tmp_path / "short")
    )
    assert short["epochs"] == 1
    short_state = torch.load(tmp_path / "short" / linear.CHECKPOINT_NAME)
    assert not torch.equal(
        short_state["classifiers"]["classifiers.0.weight"], straight_state["classifiers"]["classifiers.0.weight"]
    )


def test_checkpoint_of_another_grid_is_refused(tmp_path):
    train, val = separable_tokens(4), separable_tokens(2)
    linear.train_linear_probes(
        TokenBackbone(), train, val, 3, linear.probe_grid([0.1], [1], [False]), training(1), CPU, str(tmp_path)
    )
    with pytest.raises(UserError, match="different linear probe run.*settings"):
        linear.train_linear_probes(
            TokenBackbone(), train, val, 3, linear.probe_grid([0.2], [1], [False]), training(1), CPU, str(tmp_path)
        )


def test_more_blocks_than_the_backbone_has_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="exceeds the backbone's 2 blocks"):
        linear.train_linear_probes(
            TokenBackbone(depth=2),
            separable_tokens(2),
            separable_tokens(1),
            3,
            linear.probe_grid([0.1], [4], [False]),
            training(1),
            CPU,
            str(tmp_path),
        )


# --------------------------------------------------------------------------------- logistic regression


def separable_features(num_per_class: int, num_classes: int = 4, dim: int = 16, noise: float = 0.3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(
        torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)), dim=1
    )
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=generator), labels


def test_logreg_recovers_a_separable_problem():
    train_x, train_y = separable_features(30, noise=0.05)
    val_x, val_y = separable_features(10, noise=0.05, seed=1)
    result = logreg.logistic_regression_eval(
        train_x, train_y, val_x, val_y, 4, logreg.c_grid(-2, 4, 4), holdout_fraction=0.2
    )
    assert result["top1"] == 100.0 and result["top5"] is None
    assert result["best_c"] == next(
        row["c"] for row in result["sweep"] if row["holdout_top1"] == max(r["holdout_top1"] for r in result["sweep"])
    )


def scipy_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, c_value: float):
    """Independent fit of scikit-learn's objective C·Σ_i CE + ½‖W‖² (bias unpenalised), float64 L-BFGS-B."""
    n, d = x.shape
    onehot = np.eye(num_classes)[y]

    def objective(params):
        w, b = params[: num_classes * d].reshape(num_classes, d), params[num_classes * d :]
        z = x @ w.T + b
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        loss = -c_value * np.sum(np.log(p[np.arange(n), y])) + 0.5 * np.sum(w * w)
        grad_z = c_value * (p - onehot)
        return loss, np.concatenate([(grad_z.T @ x + w).ravel(), grad_z.sum(axis=0)])

    solution = minimize(
        objective,
        np.zeros(num_classes * (d + 1)),
        jac=True,
        method="L-BFGS-B",
        options=dict(maxiter=5000, gtol=1e-9, ftol=1e-14),
    )
    return solution.x[: num_classes * d].reshape(num_classes, d), solution.x[num_classes * d :]


@pytest.mark.parametrize("c_value", [0.1, 10.0])
def test_logreg_matches_an_independent_fit(c_value):
    train_x, train_y = separable_features(40, noise=0.6)
    val_x, val_y = separable_features(40, noise=0.6, seed=1)
    train_n = torch.nn.functional.normalize(train_x, dim=1)
    val_n = torch.nn.functional.normalize(val_x, dim=1)
    ours = logreg.fit_logistic_regression(train_n, train_y, 4, c_value)
    ours_top1 = logreg.topk_accuracy(ours.logits(val_n), val_y, 1)
    weight, bias = scipy_logistic_regression(train_n.double().numpy(), train_y.numpy(), 4, c_value)
    theirs_top1 = 100.0 * float(np.mean((val_n.double().numpy() @ weight.T + bias).argmax(axis=1) == val_y.numpy()))
    assert 40 < theirs_top1 < 100  # a problem where the fit matters
    assert abs(ours_top1 - theirs_top1) <= 1.0
    torch.testing.assert_close(ours.weight.double(), torch.from_numpy(weight), rtol=2e-2, atol=2e-2)


def test_sweep_picks_the_best_held_out_accuracy(monkeypatch):
    x, y = separable_features(10)
    scripted = iter([50.0, 80.0, 70.0])
    monkeypatch.setattr(logreg, "topk_accuracy", lambda logits, labels, k: next(scripted))
    sweep = logreg.sweep_regularisation(x, y, 4, [100.0, 1.0, 0.01], holdout_fraction=0.2, max_iter=5)
    assert sweep.c_values == [0.01, 1.0, 100.0] and sweep.best_c == 1.0
    ties = iter([80.0, 80.0])
    monkeypatch.setattr(logreg, "topk_accuracy", lambda logits, labels, k: next(ties))
    assert logreg.sweep_regularisation(x, y, 4, [1.0, 0.01], holdout_fraction=0.2, max_iter=5).best_c == 0.01


def test_strong_regularisation_loses_the_sweep():
    # imbalanced classes: the unpenalised bias favours class 0, and a tiny C keeps W too small to overrule it
    x, y = separable_features(40, noise=0.2)
    keep = torch.cat([torch.arange(40), torch.arange(40, 160, 4)])
    sweep = logreg.sweep_regularisation(
        torch.nn.functional.normalize(x[keep], dim=1), y[keep], 4, [1e-6, 10.0], holdout_fraction=0.25
    )
    assert sweep.holdout_top1[0] < 80 and sweep.holdout_top1[1] == 100.0 and sweep.best_c == 10.0


def test_holdout_split_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2])
    fit, held = logreg.stratified_holdout_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(31))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 4, 0]
    with pytest.raises(UserError):
        logreg.stratified_holdout_split(torch.tensor([0, 1]), 0.5)


# ------------------------------------------------------------------------------------------ the script


def test_eval_linear_end_to_end_on_images(tmp_path):
    data = write_train_val(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2)
    checkpoint = save_tiny_vit(tmp_path / "tiny.pth")
    common = [
        "--pretrained_weights",
        str(checkpoint),
        "--data_path",
        str(data),
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--batch_size_per_gpu",
        "4",
        "--crop_size",
        "32",
    ]
    eval_linear = load_script("eval_linear")
    summary = eval_linear.main(
        common
        + [
            "--epochs",
            "1",
            "--lr",
            "0.01",
            "0.1",
            "--n_last_blocks",
            "1",
            "2",
            "--output_dir",
            str(tmp_path / "linear"),
        ]
    )
    written = json.loads((tmp_path / "linear" / "linear_results.json").read_text())
    assert written["best"] == json.loads(json.dumps(summary["best"]))
    assert len(written["classifiers"]) == 8 and written["protocol"]["global_batch_size"] == 4
    assert (tmp_path / "linear" / "linear_checkpoint.pth").is_file()
    # DINO v1 style: one setting
    single = eval_linear.main(
        common
        + [
            "--epochs",
            "1",
            "--lr",
            "0.01",
            "--n_last_blocks",
            "2",
            "--avgpool_patchtokens",
            "--output_dir",
            str(tmp_path / "v1"),
        ]
    )
    assert [c["name"] for c in single["classifiers"]] == ["blocks2_avgpoolT_lr0.01"]

    result = eval_linear.main(
        common + ["--protocol", "logreg", "logreg.num_c=3", "--output_dir", str(tmp_path / "logreg")]
    )
    assert json.loads((tmp_path / "logreg" / "logreg_results.json").read_text())["best_c"] == result["best_c"]
    assert len(result["sweep"]) == 3 and result["num_train"] == 12


def test_linear_protocol_refuses_saved_features(tmp_path):
    with pytest.raises(UserError, match="--protocol logreg only"):
        load_script("eval_linear").main(["--load_features", str(tmp_path), "--device", "cpu"])
