"""Training under faults (issue 17): group-wide SIGTERM with workers, kill -9 and the metrics log, a locked
output directory, a diverging run, and the TrainState round trip."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dino.config import compose
from dino.io import DirectoryInUseError, DirectoryLock
from dino.train import loop as loop_module
from dino.train.loop import DivergenceGuard, NonFiniteLossError, train
from tests.helpers import tiny_overrides, write_image_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "train")


def tiny_config(data_path, output_dir, *extra):
    return compose("train/demo", tiny_overrides(data_path, output_dir, 8, *extra))


def logged_steps(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from dino.config import compose
    from dino.errors import run_cli
    from dino.train.loop import train
    from tests.helpers import tiny_overrides
    cfg = compose("train/demo", tiny_overrides({data!r}, {out!r}, 4, "optim.epochs=200", *{extra!r}))
    run_cli(lambda: train(cfg))
""")


def _start_training(tmp_path, image_folder, *extra):
    script = TRAIN_SCRIPT.format(root=str(ROOT), data=str(image_folder), out=str(tmp_path / "out"), extra=extra)
    # its own session: os.killpg reaches the trainer and its DataLoader workers, as `timeout` or a scheduler does
    return subprocess.Popen(
        [sys.executable, "-c", script],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, process, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()[1][-2000:]}")
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("training did not get there in time")


def test_sigterm_to_the_process_group_with_workers_saves_and_exits_cleanly(tmp_path, image_folder):
    process = _start_training(tmp_path, image_folder, "train.num_workers=2")
    metrics = tmp_path / "out" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, process)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM; checkpoint saved" in stdout
    state = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert state["global_step"] >= 3
    assert max(logged_steps(tmp_path / "out")) == state["global_step"]


def test_after_kill_9_the_log_holds_every_step_the_checkpoint_covers_once_resumed(tmp_path, image_folder):
    process = _start_training(tmp_path, image_folder, "train.checkpoint_every_iters=2")
    checkpoint = tmp_path / "out" / "checkpoint.pth"
    _wait_for(checkpoint.is_file, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    covered = torch.load(checkpoint, weights_only=True)["global_step"]
    assert covered >= 2
    steps = logged_steps(tmp_path / "out")
    assert set(range(1, covered + 1)) <= set(steps)

    # the resumed run drops the lines logged after the checkpoint and logs those steps once, again
    result = train(
        tiny_config(
            image_folder,
            tmp_path / "out",
            "train.checkpoint_every_iters=2",
            "optim.epochs=200",
            f"train.max_iters={covered + 2}",
            "train.batch_size_per_device=4",
        )
    )
    assert result.global_step == covered + 2
    steps = logged_steps(tmp_path / "out")
    assert steps == list(range(1, covered + 3))


def test_a_second_run_in_a_locked_output_dir_names_the_holder(tmp_path, image_folder):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from dino.io import DirectoryLock
        lock = DirectoryLock({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryInUseError, match=f"in use by process {holder.pid}"):
            train(tiny_config(image_folder, out, "optim.epochs=1"))
        assert not (out / "config.yaml").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything: its stale lock is taken over
    assert train(tiny_config(image_folder, out, "optim.epochs=1")).global_step == 3


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path, image_folder):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".dino.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with DirectoryLock(out):
        with pytest.raises(DirectoryInUseError, match=str(os.getpid())):
            DirectoryLock(out).acquire()  # held by this very process now, and said so
    assert train(tiny_config(image_folder, out, "optim.epochs=1")).global_step == 3


def test_a_diverging_run_keeps_a_checkpoint_from_before_the_divergence(tmp_path, image_folder, monkeypatch):
    original = loop_module.SelfDistillationObjective.forward
    calls = {"n": 0}

    def diverging(self, *args, **kwargs):
        total, terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (5, 6):  # the loss and the gradients explode...
            return total * 1e4, terms
        if calls["n"] >= 7:  # ...then the loss is NaN
            return total * float("nan"), terms
        return total, terms

    monkeypatch.setattr(loop_module.SelfDistillationObjective, "forward", diverging)
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_config(image_folder, tmp_path, "optim.epochs=4", "train.checkpoint_every_iters=1"))
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 4  # not 5 or 6, whose updates came from exploded gradients
    message = str(info.value)
    assert "\n" not in message
    assert "at step 7" in message and "holds step 4" in message and "began at step 5" in message
    assert "run the same command again" in message and "optim.lr=" in message
    # the kept checkpoint resumes (with a lower lr) and trains on
    monkeypatch.setattr(loop_module.SelfDistillationObjective, "forward", original)
    result = train(tiny_config(image_folder, tmp_path, "optim.epochs=4", "optim.lr=1e-4"))
    assert result.global_step == 12 and all(torch.isfinite(torch.tensor(v)) for v in result.last_metrics.values())


def test_divergence_guard_holds_then_releases():
    guard = DivergenceGuard(warmup=3, calm_steps=2)
    for step in range(1, 6):
        assert not guard.observe(step, guard.is_abnormal(4.0, 1.0), 4.0, 1.0)
    assert guard.is_abnormal(4.0, 50.0) and guard.is_abnormal(20.0, 1.0) and guard.is_abnormal(float("nan"), 1.0)
    assert guard.observe(6, True, 4.0, 50.0) and guard.holding and guard.abnormal_since == 6
    guard.observe(7, False, 4.0, 1.0)
    assert guard.holding
    guard.observe(8, False, 4.0, 1.0)
    assert not guard.holding


def test_train_state_round_trips_through_state_dict(tmp_path, image_folder):
    """load_state_dict(state_dict()) restores networks, optimiser, objective and progress."""
    cfg = tiny_config(image_folder, tmp_path, "optim.epochs=1")
    train(cfg)
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    from dino.train.meta_arch import SelfDistillationObjective, build_networks

    student, teacher, kwargs = build_networks(cfg)
    objective = SelfDistillationObjective(cfg, int(cfg.crops.local_crops_number))
    state = loop_module.TrainState(
        cfg, student, teacher, objective, loop_module.build_optimizer(cfg, student), None, kwargs, 8, sharded=False
    )
    state.load_state_dict(saved)
    again = state.state_dict()
    assert (again["epoch"], again["global_step"], again["data_epoch"], again["data_batch"]) == (1, 3, 0, 3)
    for name, tensor in saved["teacher"].items():
        assert torch.equal(again["teacher"][name], tensor), name
    assert again["optimizer"]["state"].keys() == saved["optimizer"]["state"].keys()
