"""The SLURM launcher without a cluster: command-line pinning, the env:// variables from a fake job environment,
requeue after a SIGTERM-stopped run, submitit's checkpoint hook, and the error when submitit is missing."""

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dino.data.demo_dataset import make_demo_image
from dino.errors import UserError
from dino.run import slurm
from dino.train import loop as loop_module
from dino.train.cli import CLI
from dino.train.cli import main as cli_main


def fake_job(rank, local_rank=0, tasks=16, nodes=2, job_id="4242"):
    return SimpleNamespace(
        global_rank=rank,
        local_rank=local_rank,
        num_tasks=tasks,
        num_nodes=nodes,
        hostnames=["node-a", "node-b"],
        job_id=job_id,
    )


def test_training_argv_is_validated_and_pins_output_dir_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, output_dir = slurm.training_argv(["--arch", "vit_tiny", "--output_dir", "runs/a", "optim.lr=0.001"])
    assert output_dir == (tmp_path / "runs" / "a").resolve()
    cfg, _ = CLI.parse(argv)
    assert cfg.train.resume is True and Path(cfg.train.output_dir).resolve() == output_dir
    assert cfg.model.arch == "vit_tiny" and cfg.optim.lr == 0.001
    with pytest.raises(UserError, match="unknown flag"):
        slurm.training_argv(["--arhc", "vit_tiny"])  # rejected before anything is submitted


def test_distributed_env_from_the_job_environment():
    envs = [slurm.distributed_env(fake_job(rank, local_rank=rank % 8)) for rank in (0, 9)]
    assert envs[0]["RANK"] == "0" and envs[1]["RANK"] == "9" and envs[1]["LOCAL_RANK"] == "1"
    assert all(env["WORLD_SIZE"] == "16" and env["LOCAL_WORLD_SIZE"] == "8" for env in envs)
    assert envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"] == "node-a"
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]  # every task agrees on the rendezvous port
    assert slurm.distributed_env(fake_job(0, job_id="1"))["MASTER_PORT"] != envs[0]["MASTER_PORT"]


def test_sigterm_stopped_run_is_requeued_by_rank_0_and_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(16):
        make_demo_image(i % 3, seed=i, image_size=32).save(folder / f"{i}.png")
    argv, _ = slurm.training_argv(
        [
            "--data_path",
            str(folder),
            "--output_dir",
            str(tmp_path / "out"),
            "--batch_size_per_device",
            "4",
            "--epochs",
            "1",
            "--arch",
            "vit_tiny",
            "--patch_size",
            "8",
            "--local_crops_number",
            "1",
            "--global_crops_size",
            "32",
            "--local_crops_size",
            "16",
            "--out_dim",
            "32",
            "--knn_eval",
            "false",
            "--num_workers",
            "0",
            "model.depth=1",
            "model.embed_dim=48",
            "dino.head_hidden_dim=32",
            "dino.head_bottleneck_dim=16",
        ]
    )
    original, calls = loop_module.train_step, {"n": 0}

    def step_then_preempt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", step_then_preempt)
    first = cli_main(argv)
    assert first.preempted and first.global_step == 2

    commands = []
    assert not slurm.requeue_if_preempted(first, fake_job(3), run=lambda cmd, check: commands.append(cmd))
    assert slurm.requeue_if_preempted(first, fake_job(0), run=lambda cmd, check: commands.append(cmd))
    assert commands == [["scontrol", "requeue", "4242"]]

    monkeypatch.setattr(loop_module, "train_step", original)
    second = cli_main(argv)  # the requeued job runs the same command line
    assert not second.preempted and second.global_step == 4  # resumed at step 2, not restarted
    assert not slurm.requeue_if_preempted(second, fake_job(0), run=lambda cmd, check: commands.append(cmd))


def test_checkpoint_hook_requeues_the_same_command():
    pytest.importorskip("submitit")
    trainer = slurm.Trainer(["--output_dir", "/x", "--resume", "true"])
    delayed = trainer.checkpoint()
    assert isinstance(delayed.function, slurm.Trainer) and delayed.function.argv == trainer.argv


def test_missing_submitit_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    with pytest.raises(UserError, match=r"dino\[slurm\]"):
        slurm.import_submitit()
    with pytest.raises(UserError, match=r"dino\[slurm\]"):
        slurm.submit(["--nodes", "1", "--", "--arch", "vit_tiny"])


def test_executor_parameters():
    args, train_args = slurm.parse_args(["--nodes", "2", "--gpus_per_node", "8", "--partition", "p", "--", "--hmp"])
    params = slurm.executor_parameters(args)
    assert train_args == ["--hmp"]
    assert params["nodes"] == 2 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["slurm_partition"] == "p" and params["slurm_signal_delay_s"] == 120
    cpu_args, _ = slurm.parse_args(["--gpus_per_node", "0"])
    assert slurm.executor_parameters(cpu_args)["tasks_per_node"] == 1
