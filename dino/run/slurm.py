"""Train on a SLURM cluster through submitit, with requeue on pre-emption and resume from the last checkpoint.

    pip install 'dino[slurm]'          # submitit, only needed here
    python -m dino.run.slurm --nodes 2 --gpus_per_node 8 --partition learnlab --timeout_min 4320 \\
        -- --config dinov2_vitl14 --data_path /data/imagenet/train --output_dir /checkpoint/me/vitl14 \\
           --hmp --parallel fsdp train.checkpoint_every_iters=500

Everything after `--` is a `main_dino.py` command line; it is validated here before anything is submitted.
One SLURM task runs per GPU (`--tasks_per_node`, default `--gpus_per_node`, or 1 on CPU nodes); each task
sets the torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR on the
first node, MASTER_PORT derived from the job id) and calls the same training function as `main_dino.py`,
so nothing in the training code knows about SLURM.

Pre-emption and time limits, the two ways a job is interrupted:

* SLURM sends SIGUSR2 `--signal_delay_s` seconds before the time limit (and on pre-emption where the
  cluster is configured to): submitit calls `Trainer.checkpoint` on rank 0, which hands back the same
  command line, and requeues the job.  The run is then killed; work since the last checkpoint is lost, so
  set `train.checkpoint_every_iters` to bound it.
* SIGTERM (pre-emption on most clusters): the training loop finishes its current step, every rank agrees,
  and a checkpoint is written (sharded under FSDP).  `train` returns `preempted`, and rank 0 requeues the job
  with `scontrol requeue`.

Either way the requeued job starts the same command with `--resume true` and the same absolute output
directory, so it continues from `checkpoint.pth` / `checkpoint_sharded/` exactly where the checkpoint was
taken (same data position and, with the same number of tasks, the same random streams).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dino.errors import UserError, run_cli
from dino.log import get_logger

logger = get_logger(__name__)


def import_submitit():
    """submitit, or a clear error naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise UserError(
            "the SLURM launcher needs submitit: pip install 'dino[slurm]' (or pip install submitit)"
        ) from None
    return submitit


def training_argv(train_args: Sequence[str]) -> tuple[list[str], Path]:
    """Validate a main_dino.py command line; return it with an absolute output directory and resume on."""
    from dino.train.cli import CLI

    cfg, _ = CLI.parse(list(train_args))
    output_dir = Path(str(cfg.train.output_dir)).expanduser().resolve()
    # Flags win over key=value overrides, and a repeated flag's last value wins: prepend ours, so a user's
    # own --output_dir (the same directory, relative to the submission directory SLURM starts in) stays.
    return ["--output_dir", str(output_dir), "--resume", "true"] + list(train_args), output_dir


def distributed_env(job_env: Any, master_port: int | None = None) -> dict[str, str]:
    """torch.distributed `env://` variables of this task from a submitit `JobEnvironment`-like object
    (attributes global_rank, local_rank, num_tasks, num_nodes, hostnames, job_id)."""
    if master_port is None:
        # the same on every task of the job, different between jobs sharing a node
        master_port = random.Random(str(job_env.job_id)).randint(20000, 60000)
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
        "MASTER_ADDR": str(job_env.hostnames[0]),
        "MASTER_PORT": str(master_port),
    }


def requeue_if_preempted(result: Any, job_env: Any, run: Callable[..., Any] = subprocess.run) -> bool:
    """After a SIGTERM-stopped run (checkpoint written): rank 0 requeues the job. Returns whether it did."""
    if not getattr(result, "preempted", False) or int(job_env.global_rank) != 0:
        return False
    run(["scontrol", "requeue", str(job_env.job_id)], check=True)
    return True


class Trainer:
    """The callable submitit pickles and runs in every task; `checkpoint` is submitit's requeue hook."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def __call__(self):
        submitit = import_submitit()
        job_env = submitit.JobEnvironment()
        os.environ.update(distributed_env(job_env))
        from dino.train.cli import main

        result = main(self.argv)
        requeue_if_preempted(result, job_env)
        return None if result is None else {"global_step": result.global_step, "preempted": result.preempted}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 at SIGUSR2: requeue the same command; it resumes from the last checkpoint."""
        submitit = import_submitit()
        return submitit.helpers.DelayedSubmission(type(self)(self.argv))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    launcher_args = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m dino.run.slurm",
        description=__doc__.split("\n\n")[0],
        epilog="Everything after -- is passed to main_dino.py.",
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8, help="0 for CPU nodes")
    parser.add_argument("--tasks_per_node", type=int, default=None, help="default: gpus_per_node (1 without GPUs)")
    parser.add_argument("--cpus_per_task", type=int, default=10)
    parser.add_argument("--mem_gb", type=int, default=None)
    parser.add_argument("--timeout_min", type=int, default=2800)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--constraint", default=None)
    parser.add_argument("--job_name", default="dino")
    parser.add_argument("--signal_delay_s", type=int, default=120, help="SIGUSR2 this long before the time limit")
    parser.add_argument("--slurm_dir", default=None, help="submitit logs (default: <output_dir>/slurm)")
    return parser.parse_args(launcher_args), train_args


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    params: dict[str, Any] = dict(
        nodes=args.nodes,
        tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.timeout_min,
        name=args.job_name,
        slurm_signal_delay_s=args.signal_delay_s,
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    return params


def submit(argv: Sequence[str]):
    args, train_args = parse_args(argv)
    train_argv, output_dir = training_argv(train_args)
    submitit = import_submitit()
    executor = submitit.AutoExecutor(
        folder=args.slurm_dir or str(output_dir / "slurm" / "%j"), slurm_max_num_timeout=30
    )
    executor.update_parameters(**executor_parameters(args))
    job = executor.submit(Trainer(train_argv))
    logger.info(
        f"submitted job {job.job_id}; logs in {args.slurm_dir or output_dir / 'slurm'}; checkpoints in {output_dir}"
    )
    return job


def cli() -> None:
    run_cli(lambda: submit(sys.argv[1:]))


if __name__ == "__main__":
    cli()
