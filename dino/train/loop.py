"""The training loop: `train(cfg)`, from a composed config to a trained teacher.

Read it top to bottom: `train_step` (one optimisation step) → `TrainState` (everything a checkpoint holds:
networks, objective, optimiser, scaler, progress, RNG; `state_dict` / `load_state_dict`, `save` / `resume`)
→ `DivergenceGuard` (which checkpoints may be overwritten) → `train` (set up, lock the output directory,
resume, run the epochs, and close everything in a `finally`).  `step_metrics` is the one place where a
step's logged numbers are assembled.
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dino.config import to_yaml
from dino.config_validation import check_resume_against_output_dir, validate_training_config
from dino.distributed import (
    DeviceContext,
    all_reduce_mean,
    any_rank,
    any_rank_flags,
    barrier,
    collective_timeout_message,
    destroy_distributed,
    get_local_world_size,
    get_world_size,
    heartbeat,
    init_distributed,
    is_collective_timeout,
    is_enabled,
    is_main_process,
    same_seed_on_every_rank,
    seed_everything,
)
from dino.distributed.checkpoint import copy_sharded, full_state_dict_on_rank0
from dino.distributed.parallel import (
    FSDPSettings,
    check_parallel_mode,
    gradient_sync,
    is_sharded,
    is_sharded_tensor,
    shard_student_and_teacher,
    unwrap,
    wrap_student,
)
from dino.errors import UserError
from dino.hub import save_backbone
from dino.io import DirectoryLock, atomic_write_text
from dino.log import get_logger
from dino.train.activation_checkpointing import apply_activation_checkpointing
from dino.train.checkpoint import (
    CHECKPOINT_NAME,
    SHARDED_CHECKPOINT_NAME,
    TEACHER_BACKBONE_NAME,
    atomic_save,
    capture_rng_state,
    find_training_checkpoint,
    load_sharded_training_checkpoint,
    load_training_checkpoint,
    restore_rng_state,
    save_sharded_training_checkpoint,
)
from dino.train.clip import clip_grad_norm_per_module, clip_gradients_per_parameter
from dino.train.data_pipeline import build_training_data
from dino.train.distill import (
    build_distillation_target,
    distilling,
    prepare_distillation,
    prepare_distillation_target,
)
from dino.train.grad_accumulation import split_batch_and_targets
from dino.train.knn_check import KnnMonitor
from dino.train.lora import add_lora_to_networks, export_backbone
from dino.train.meta_arch import (
    SelfDistillationObjective,
    build_networks,
    build_student_backbone,
    compile_blocks,
    compile_enabled,
    update_teacher,
)
from dino.train.metrics import MetricLogger, collapse_warning, teacher_entropy_stats
from dino.train.param_groups import apply_schedules, build_param_groups
from dino.train.pretrained import HeadWarmup, build_pretrained_networks, head_warmup_iters, take_prepared
from dino.train.schedules import Schedule, last_layer_lr_schedule, momentum_schedule, scale_lr, teacher_temp_schedule
from dino.train.throughput import StepFlops, ThroughputMeter, count_flops, device_peak

log = get_logger(__name__)


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; the checkpoint from before the divergence is left untouched."""


@dataclass
class TrainingSchedules:
    lr: Schedule
    last_layer_lr: Schedule
    weight_decay: Schedule
    momentum: Schedule
    teacher_temp: Schedule
    teacher_temp_per_iteration: bool

    def teacher_temp_at(self, epoch: int, step: int) -> float:
        return self.teacher_temp[step if self.teacher_temp_per_iteration else epoch]


def build_schedules(cfg: DictConfig, iters_per_epoch: int, total_batch_size: int) -> TrainingSchedules:
    optim, teacher = cfg.optim, cfg.teacher
    epochs = int(optim.epochs)
    total = epochs * iters_per_epoch
    peak_lr = scale_lr(float(optim.lr), total_batch_size, str(optim.lr_scaling))
    warmup = min(int(optim.warmup_epochs) * iters_per_epoch, total)
    lr = Schedule.cosine(peak_lr, float(optim.min_lr), total, warmup_iters=warmup)
    wd = Schedule.cosine(float(optim.weight_decay), float(optim.weight_decay_end), total)
    per_iteration = bool(teacher.temp_per_iteration)
    return TrainingSchedules(
        lr=lr,
        last_layer_lr=last_layer_lr_schedule(lr, min(int(optim.freeze_last_layer) * iters_per_epoch, total)),
        weight_decay=wd,
        momentum=momentum_schedule(float(teacher.momentum_teacher), total, float(teacher.final_momentum_teacher)),
        teacher_temp=teacher_temp_schedule(
            float(teacher.warmup_teacher_temp),
            float(teacher.teacher_temp),
            int(teacher.warmup_teacher_temp_epochs),
            epochs,
            iters_per_epoch,
            per_iteration=per_iteration,
        ),
        teacher_temp_per_iteration=per_iteration,
    )


def build_optimizer(cfg: DictConfig, student: torch.nn.Module) -> torch.optim.Optimizer:
    groups = build_param_groups(
        student,
        layerwise_decay=float(cfg.optim.layerwise_decay),
        patch_embed_lr_mult=float(cfg.optim.patch_embed_lr_mult),
        exclude_tokens_from_weight_decay=bool(cfg.optim.exclude_tokens_from_weight_decay),
        backbone_lr_mult=float(cfg.optim.backbone_lr_mult),
    )
    name = str(cfg.optim.optimizer).lower()
    if name == "adamw":
        # The fused kernel updates each parameter in one pass instead of ~10 foreach passes: the optimiser
        # step of the ViT-S/14 bench preset drops from ~1.5 s to ~0.2 s on 2 CPU cores. It exists for plain
        # CPU / CUDA tensors; sharded (DTensor) and HPU parameters keep the foreach implementation.
        params = [p for group in groups for p in group["params"]]
        fused = all(p.device.type in ("cpu", "cuda") and not is_sharded_tensor(p) for p in params)
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.adamw_betas), fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=float(cfg.optim.sgd_momentum))
    raise UserError(f"unknown optimizer {cfg.optim.optimizer!r}; choose adamw or sgd")


class StopSignal:
    """Turns SIGTERM (cluster pre-emption, `timeout`, `kill -- -PGID`) into a flag the loop checks between steps.

    DataLoader workers ignore SIGTERM (`dino.data.samplers`), so a signal sent to the whole process group
    reaches only this handler and the loop can save and shut the workers down itself.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    epochs_completed: int
    stopped_early: bool
    last_metrics: dict[str, float] = field(default_factory=dict)
    knn: dict[str, Any] | None = None
    preempted: bool = False  # stopped by SIGTERM after saving a checkpoint (a launcher may requeue the job)


def _to_device(batch: dict, ctx: DeviceContext) -> dict:
    return {k: v.to(ctx.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _total_grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def train_step(
    batch: dict,
    student,
    teacher,
    objective: SelfDistillationObjective,
    optimizer,
    scaler,
    ctx: DeviceContext,
    cfg: DictConfig,
    teacher_temp: float,
) -> tuple[torch.Tensor, dict, dict]:
    """Forward teacher and student, compute the losses, backward, clip, optimiser step.

    Returns (loss, terms, stats); stats holds the teacher-entropy indicators and `grad_norm`, the global
    gradient norm before clipping (what `DivergenceGuard` watches).
    """
    # the forward passes hold the step's first collectives (DDP buffer sync, FSDP all-gathers): a rank that
    # never says it got here is the one a timed-out collective waited for
    heartbeat(phase="step")
    batch = _to_device(batch, ctx)
    global_crops = batch["collated_global_crops"]
    use_ibot = objective.ibot_loss is not None
    mask_indices = batch["mask_indices_list"] if use_ibot else None
    # distillation (dino.train.distill): the student sees unmasked global crops, the patch loss is taken at the
    # same positions
    mask_student = use_ibot and not distilling(cfg)
    with ctx.autocast(), torch.no_grad():
        teacher_out = teacher(global_crops, None, None, mask_indices)
        targets = objective.teacher_targets(teacher_out, teacher_temp, batch.get("n_masked_patches"))
        del teacher_out  # its (masked patches × prototypes) logits would otherwise live through the backward pass
    # train.grad_accumulation_steps: the student runs on image slices of the batch, the teacher targets of
    # the whole batch split alongside; losses scaled by 1/parts add up to the whole batch's gradient
    parts = int(cfg.train.grad_accumulation_steps)
    pieces = split_batch_and_targets(batch, targets, parts) if parts > 1 else [(batch, targets)]
    optimizer.zero_grad(set_to_none=True)
    loss_sum, terms_sum = 0.0, {}
    for index, (micro, micro_targets) in enumerate(pieces):
        crops = micro["collated_global_crops"]
        with gradient_sync(student, enabled=index == len(pieces) - 1):
            with ctx.autocast():
                student_out = student(
                    crops,
                    micro["collated_local_crops"],
                    micro["collated_masks"] if mask_student else None,
                    micro["mask_indices_list"] if use_ibot else None,
                )
                loss, terms = objective(student_out, micro_targets, micro.get("masks_weight"), n_images=crops.shape[0])
                del student_out
                loss = loss / parts
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        loss_sum = loss_sum + loss.detach().float()
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + value.detach().float() / parts
    ctx.mark_step()
    # Mean over ranks of the loss and its terms (one all-reduce): what is logged, and what the finiteness
    # check looks at, so that every rank stops together instead of leaving the others in a collective.
    # Checked before the update: non-finite gradients never reach the weights.
    names = list(terms_sum)
    reduced = all_reduce_mean(torch.stack([loss_sum] + [terms_sum[n] for n in names]))
    global_loss, global_terms = reduced[0], dict(zip(names, reduced[1:]))
    if not torch.isfinite(global_loss):
        bad = ", ".join(f"{name}={float(value):.4g}" for name, value in global_terms.items())
        raise NonFiniteLossError(f"the loss became non-finite ({bad})")
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = float(cfg.optim.clip_grad)
    module = unwrap(student)
    if clip > 0:
        if str(cfg.optim.clip_style) == "per_module":
            parts = {"backbone": module.backbone, "dino_head": module.dino_head}
            if module.ibot_head is not None:
                parts["ibot_head"] = module.ibot_head
            norms = clip_grad_norm_per_module(parts, clip)
            grad_norm = math.sqrt(sum(float(n) ** 2 for n in norms.values()))
        else:
            grad_norm = math.sqrt(sum(n**2 for n in clip_gradients_per_parameter(module, clip)))
    else:
        grad_norm = _total_grad_norm(module)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    ctx.mark_step()
    return global_loss, global_terms, {**teacher_entropy_stats(targets["cls_probs"]), "grad_norm": grad_norm}


# ------------------------------------------------------------------------------------------ train state


@dataclass
class Progress:
    """Where training stands; a checkpoint stores these five integers (data position *after* the last batch)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    data_epoch: int = 0
    data_batch: int = 0


class TrainState:
    """Everything a checkpoint holds and a resumed run restores, behind one `state_dict` / `load_state_dict`.

    Networks (student, EMA teacher), the objective (loss centers), optimiser, grad scaler, `Progress` and
    the RNG states.  `save` writes `checkpoint.pth` (rank 0) or, under FSDP, the sharded
    `checkpoint_sharded/` (all ranks), then the teacher export; `resume` reads whichever the run uses.
    """

    def __init__(
        self,
        cfg: DictConfig,
        student,
        teacher,
        objective,
        optimizer,
        scaler,
        backbone_kwargs: dict,
        batch_size: int,
        sharded: bool,
    ):
        self.cfg = cfg
        self.student = student  # the plain module; `student_wrapped` is what steps run (DDP after `wrap`)
        self.student_wrapped = student
        self.teacher = teacher
        self.objective = objective
        self.optimizer = optimizer
        self.scaler = scaler
        self.backbone_kwargs = backbone_kwargs
        self.batch_size = batch_size
        self.sharded = sharded
        self.progress = Progress()
        self._resumed_rng: dict | None = None
        self.target = None  # a frozen distillation teacher: the targets come from it, `teacher` is the student EMA
        self.head_warmup: HeadWarmup | None = None  # backbone frozen while fresh heads fit (continued pretraining)

    # -- single-file form ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "student": unwrap(self.student).state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "objective": self.objective.state_dict(),
            **asdict(self.progress),
            "world_size": get_world_size(),  # with the stored batch size: the global batch a resume must keep
            "rng": capture_rng_state(),
            "config": to_yaml(self.cfg),
            "backbone_kwargs": self.backbone_kwargs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything; the RNG states are applied by `restore_rng` once the student is wrapped."""
        unwrap(self.student).load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**{name: int(state[name]) for name in asdict(self.progress)})
        self._resumed_rng = state["rng"]

    # -- files ----------------------------------------------------------------------------------------
    def save(self, output_dir: Path, extra_copy: str | None = None) -> None:
        """`checkpoint.pth` (rank 0) or, under FSDP, `checkpoint_sharded/` (collective); then the teacher export."""
        if self.sharded:
            progress = dict(asdict(self.progress), world_size=get_world_size(), batch_size=self.batch_size)
            directory = output_dir / SHARDED_CHECKPOINT_NAME
            save_sharded_training_checkpoint(
                directory,
                unwrap(self.student_wrapped),
                self.teacher,
                self.optimizer,
                self.objective,
                self.scaler,
                progress,
                {"config": to_yaml(self.cfg), "backbone_kwargs": self.backbone_kwargs},
            )
            if extra_copy:
                copy_sharded(directory, output_dir / (Path(extra_copy).stem + "_sharded"))
            _export_teacher_backbone(output_dir, self.teacher, self.cfg, self.backbone_kwargs)
            return
        if not is_main_process():
            return
        state = self.state_dict()
        atomic_save(state, output_dir / CHECKPOINT_NAME)
        if extra_copy:
            atomic_save(state, output_dir / extra_copy)
        save_backbone(
            export_backbone(self.teacher),
            output_dir / TEACHER_BACKBONE_NAME,
            self.backbone_kwargs,
            safetensors_copy=True,
        )

    def resume(self, output_dir: Path) -> Path | None:
        """Load the run's checkpoint when there is one; returns its path (None: a fresh start)."""
        path = find_training_checkpoint(output_dir, self.sharded)
        if path is None:
            return None
        if self.sharded:
            progress, self._resumed_rng = load_sharded_training_checkpoint(
                path, self.student, self.teacher, self.optimizer, self.objective, self.scaler
            )
            _check_same_global_batch(progress, self.batch_size)
            self.progress = Progress(**{name: progress[name] for name in asdict(self.progress)})
            if self._resumed_rng is None:
                # another world size: per-rank streams cannot be carried over; start fresh, deterministic ones
                seed_everything(int(self.cfg.train.seed) + progress["global_step"])
            saved_by = f" (saved by {progress['world_size']} process(es))"
        else:
            self.load_state_dict(load_training_checkpoint(path))
            saved_by = ""
        if is_main_process():
            log.info(
                f"resumed from {path}{saved_by} at epoch {self.progress.epoch}, step {self.progress.step_in_epoch}"
            )
        return path

    def wrap(self, ctx: DeviceContext, parallel: str) -> None:
        self.student_wrapped = wrap_student(self.student, ctx, parallel)

    def restore_rng(self) -> None:
        if self._resumed_rng is not None:
            restore_rng_state(self._resumed_rng)
            self._resumed_rng = None


def _export_teacher_backbone(output_dir: Path, teacher, cfg: DictConfig, backbone_kwargs: dict) -> None:
    """Collective under FSDP: gather the teacher backbone onto rank 0 and write `teacher_backbone.pth`."""
    full = full_state_dict_on_rank0(teacher)
    if not is_main_process():
        return
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    # Built on the meta device and filled by assignment: a strict key check without a second copy in memory.
    # Drop path does not change the weights; a uniform zero rate avoids host reads of meta tensors.
    skeleton_cfg = OmegaConf.merge(cfg.model, {"drop_path_rate": 0.0, "drop_path_uniform": True})
    with torch.device("meta"):
        backbone, _ = build_student_backbone(skeleton_cfg)
    backbone.load_state_dict(weights, strict=True, assign=True)
    save_backbone(backbone, output_dir / TEACHER_BACKBONE_NAME, backbone_kwargs, safetensors_copy=True)


def _check_same_global_batch(progress: dict[str, int], batch_size: int) -> None:
    """A sharded checkpoint resumes on any number of processes as long as the global batch is unchanged.

    Its position (iteration, data batch) counts global batches, and the schedules are indexed by it; with
    another global batch both would silently mean something else.
    """
    saved = progress["batch_size"] * progress["world_size"]
    now = batch_size * get_world_size()
    if saved != now:
        raise UserError(
            f"cannot resume: the checkpoint was trained with a global batch of {saved} "
            f"({progress['world_size']} process(es) × {progress['batch_size']}), this run has {now}; "
            f"set --batch_size_per_device {saved // get_world_size()} to keep it"
        )


# ------------------------------------------------------------------------------------ divergence guard


class DivergenceGuard:
    """Decides whether a checkpoint may be overwritten: not while the loss or the gradient norm is out of range.

    A run that diverges usually shows it for a few steps before the loss turns NaN (the gradient norm and
    the loss explode first), and a checkpoint written then already holds exploded weights.  So a step whose
    loss exceeds `loss_factor` × the recent median (+1) or whose gradient norm exceeds `grad_factor` × the
    recent median is *abnormal*; from then on checkpoints are held back until `calm_steps` consecutive
    steps are normal again.  The checkpoint on disk is then one from before the divergence.  A new level that
    lasts `window` steps becomes the new normal (the run did not diverge, it changed regime).
    """

    def __init__(
        self,
        window: int = 50,
        warmup: int = 3,
        loss_factor: float = 2.0,
        grad_factor: float = 10.0,
        calm_steps: int = 10,
    ):
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.window, self.warmup = window, warmup
        self.loss_factor, self.grad_factor, self.calm_steps = loss_factor, grad_factor, calm_steps
        self.abnormal_since: int | None = None  # first abnormal step of the current episode
        self._calm = 0
        self._abnormal_run = 0
        self.last_saved_step: int | None = None

    @property
    def holding(self) -> bool:
        return self.abnormal_since is not None

    def is_abnormal(self, loss: float, grad_norm: float) -> bool:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True
        if len(self.losses) < self.warmup:
            return False
        loss_limit = self.loss_factor * statistics.median(self.losses) + 1.0
        grad_limit = self.grad_factor * max(statistics.median(self.grad_norms), 1e-8)
        return loss > loss_limit or grad_norm > grad_limit

    def observe(self, step: int, abnormal: bool, loss: float, grad_norm: float) -> bool:
        """Record a step (`abnormal` agreed over ranks); returns True when a hold starts at this step."""
        started = False
        if abnormal:
            self._calm = 0
            self._abnormal_run += 1
            if self.abnormal_since is None:
                self.abnormal_since, started = step, True
            if self._abnormal_run >= self.window and math.isfinite(loss) and math.isfinite(grad_norm):
                self.losses.clear()  # a lasting new level: the old baseline no longer describes the run
                self.grad_norms.clear()
            else:
                return started
        self._abnormal_run = 0
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        if self.abnormal_since is not None:
            self._calm += 1
            if self._calm >= self.calm_steps:
                self.abnormal_since = None
        return started


# --------------------------------------------------------------------------------------- the loop


def step_metrics(
    loss,
    terms: dict,
    stats: dict,
    lr: float,
    wd: float,
    momentum: float,
    teacher_temp: float,
    speed: dict[str, float],
    epoch: int,
) -> dict[str, float]:
    """Everything logged for one step (metrics.jsonl, tensorboard): the one place to add a per-step number.

    `speed` is the `ThroughputMeter`'s: images_per_s, mfu, step_s, data_wait_s, data_wait_fraction, peak_memory_mb.
    """
    return {
        "loss": float(loss),
        **{k: float(v) for k, v in terms.items()},
        "lr": lr,
        "wd": wd,
        "momentum": momentum,
        "teacher_temp": teacher_temp,
        **stats,
        **speed,
        "epoch": epoch,
    }


class _Run:
    """One call of `train`: the state, the data stream and the sinks, with the epoch loop as methods."""

    def __init__(
        self,
        cfg: DictConfig,
        ctx: DeviceContext,
        output_dir: Path,
        state: TrainState,
        data,
        schedules,
        iters_per_epoch: int,
        logger: MetricLogger,
        stop: StopSignal,
    ):
        self.cfg, self.ctx, self.output_dir, self.state, self.data = cfg, ctx, output_dir, state, data
        self.schedules, self.iters_per_epoch, self.logger, self.stop = schedules, iters_per_epoch, logger, stop
        self.main = is_main_process()
        self.guard = DivergenceGuard()
        self.bar = None
        self.stream = None
        self.last_metrics: dict[str, float] = {}
        self.stopped_early = False
        self.total_batch = data.batch_size * get_world_size()
        # kNN of the teacher beside raw pixels and random init every train.knn_every_epochs (rank 0; 0: off)
        self.knn_monitor = KnnMonitor(cfg, log=lambda row: self.logger.log(self.state.progress.global_step, row))
        self.step_flops = StepFlops()
        self.meter = ThroughputMeter(self.total_batch, device_peak(ctx), ctx.max_memory_allocated_mb)
        self.checkpoint_name = SHARDED_CHECKPOINT_NAME if state.sharded else CHECKPOINT_NAME

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.stream is not None:
            self.stream.close()  # shuts the DataLoader workers down now, not at garbage collection
            self.stream = None

    def checkpoint(self, extra_copy: str | None = None) -> bool:
        """Save unless the guard holds the pre-divergence checkpoint; the metrics log is synced first."""
        progress = self.state.progress
        if self.guard.holding:
            return False
        self.logger.sync()  # the steps this checkpoint covers are on disk before it is
        self.state.save(self.output_dir, extra_copy)
        self.guard.last_saved_step = progress.global_step
        return True

    def _next_batch(self):
        try:
            return next(self.stream)
        except RuntimeError:
            # A worker killed by the same group-wide signal (one not ours, e.g. a raw torch worker) surfaces
            # here; when a stop was requested it is expected: save what the finished steps hold and stop.
            if self.stop.requested:
                return None
            raise

    def run(self) -> None:
        cfg, state, progress = self.cfg, self.state, self.state.progress
        epochs = int(cfg.optim.epochs)
        max_iters = int(cfg.train.max_iters) if cfg.train.max_iters is not None else None
        every = int(cfg.train.checkpoint_every_iters)
        log_freq = max(1, int(cfg.train.log_freq))
        warned_collapse = warned_data = False
        self.guard.last_saved_step = progress.global_step if progress.global_step else None
        self.stream = self.data.stream(progress.data_epoch, progress.data_batch)
        if self.main:
            log.info(
                f"training {epochs} epochs × {self.iters_per_epoch} iterations, global batch "
                f"{self.total_batch}, device {self.ctx.device}, {get_world_size()} process(es); logs in "
                f"{self.output_dir}; MFU against {self.meter.peak.describe()}"
            )
        while progress.epoch < epochs:
            self.bar = tqdm(
                total=self.iters_per_epoch,
                initial=progress.step_in_epoch,
                desc=f"epoch {progress.epoch + 1}/{epochs}",
                disable=not self.main,
                dynamic_ncols=True,
                leave=True,
            )
            while progress.step_in_epoch < self.iters_per_epoch:
                heartbeat(progress.global_step + 1, "data")
                waiting_since = time.perf_counter()
                item = self._next_batch()
                computing_since = time.perf_counter()
                if item is None:
                    self.stopped_early = True
                    break
                data_epoch, data_batch, batch = item
                heartbeat(phase="batch")
                step = progress.global_step
                if state.head_warmup is not None:
                    state.head_warmup.before_step(step)
                lr, wd = self.schedules.lr[step], self.schedules.weight_decay[step]
                apply_schedules(state.optimizer, lr, wd, self.schedules.last_layer_lr[step])
                teacher_temp = self.schedules.teacher_temp_at(progress.epoch, step)
                flops = self.step_flops.known(batch)
                try:
                    # the first step of each crop layout is counted (and run eagerly): the count depends on shapes only
                    with count_flops() if flops is None else contextlib.nullcontext() as counted:
                        target = state.teacher if state.target is None else state.target
                        loss, terms, stats = train_step(
                            batch,
                            state.student_wrapped,
                            target,
                            state.objective,
                            state.optimizer,
                            state.scaler,
                            self.ctx,
                            cfg,
                            teacher_temp,
                        )
                    if flops is None:
                        flops = counted()
                        self.step_flops.record(batch, flops)
                except NonFiniteLossError as err:
                    raise NonFiniteLossError(self._non_finite_message(err, step + 1)) from None
                heartbeat(phase="done")
                momentum = self.schedules.momentum[step]
                update_teacher(unwrap(state.student_wrapped), state.teacher, momentum)
                progress.global_step += 1
                progress.step_in_epoch += 1
                progress.data_epoch, progress.data_batch = data_epoch, data_batch + 1  # the position *after* it

                loss_value = float(loss)  # waits for the device: the step's compute ends here
                speed = self.meter.update(computing_since - waiting_since, time.perf_counter() - computing_since, flops)
                self.last_metrics = step_metrics(
                    loss_value, terms, stats, lr, wd, momentum, teacher_temp, speed, progress.epoch
                )
                self.logger.log(
                    progress.global_step, self.last_metrics, tensorboard=(progress.global_step % log_freq == 0)
                )
                self.bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{speed['images_per_s']:.1f}",
                    mfu=f"{speed['mfu']:.0%}",
                    mem=f"{speed['peak_memory_mb'] / 1024:.1f}G",
                )
                self.bar.update(1)
                if self.main and not warned_data and (message := self.meter.bottleneck()):
                    tqdm.write(f"warning: {message}")
                    warned_data = True
                if self.main and not warned_collapse and progress.epoch >= 1 and (message := collapse_warning(stats)):
                    tqdm.write(f"warning: {message}")
                    warned_collapse = True

                # one all-reduce: a pre-emption signal may reach the ranks at different steps, and every rank
                # must take the same checkpoint decision
                abnormal = self.guard.is_abnormal(float(loss), float(stats["grad_norm"]))
                self.stop.requested, abnormal = any_rank_flags(self.stop.requested, abnormal)
                if self.guard.observe(progress.global_step, abnormal, float(loss), float(stats["grad_norm"])):
                    self._warn_hold(float(loss), float(stats["grad_norm"]))
                reached_max = max_iters is not None and progress.global_step >= max_iters
                periodic = every and progress.global_step % every == 0 and progress.step_in_epoch < self.iters_per_epoch
                if self.stop.requested or reached_max or periodic:
                    self.checkpoint()
                if self.stop.requested or reached_max:
                    self.stopped_early = True
                    break
            self.bar.close()
            self.bar = None
            if self.stopped_early:
                if self.stop.requested and not self.guard.last_saved_step == progress.global_step:
                    self.checkpoint()  # stopped while waiting for data: the finished steps are still saved
                break
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            freq = int(cfg.train.saveckp_freq)
            self.checkpoint(f"checkpoint{progress.epoch:04d}.pth" if freq and progress.epoch % freq == 0 else None)
            self._end_of_epoch()

    def _end_of_epoch(self) -> None:
        """Epoch summary line and, every `train.visualize_freq` epochs, pictures of fixed images."""
        progress = self.state.progress
        if self.main:
            self.logger.log(
                progress.global_step,
                {"epoch_end": progress.epoch, "peak_memory_mb": self.ctx.max_memory_allocated_mb()},
                tensorboard=False,
            )
            if not is_sharded(self.state.teacher):  # rank 0 alone cannot run a sharded teacher
                _maybe_visualize(self.cfg, self.state.teacher, self.logger, progress.epoch, progress.global_step)
                # a forked RNG: the monitor's random baseline must not move the training's random streams
                with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.type == "cuda" else []):
                    self.knn_monitor.maybe_run(self.state.teacher.backbone, progress.epoch, self.ctx)
        self.logger.flush()

    def _warn_hold(self, loss: float, grad_norm: float) -> None:
        if self.main:
            saved = self.guard.last_saved_step
            kept = f"{self.checkpoint_name} (step {saved})" if saved is not None else "no checkpoint yet"
            tqdm.write(
                f"warning: step {self.state.progress.global_step}: the loss ({loss:.4g}) or the gradient norm "
                f"({grad_norm:.4g}) left its normal range; keeping {kept} until training is back in range"
            )

    def _non_finite_message(self, err: Exception, step: int) -> str:
        saved = self.guard.last_saved_step
        where = self.output_dir / self.checkpoint_name
        if saved is None:
            kept = "no checkpoint had been written yet"
        else:
            since = self.guard.abnormal_since
            before = f", from before the divergence that began at step {since}" if since is not None else ""
            kept = f"{where} holds step {saved}{before}"
        lr = float(self.cfg.optim.lr)
        return (
            f"{err} at step {step}; {kept}. To resume from it, run the same command again (it resumes "
            f"automatically) with a lower learning rate, e.g. optim.lr={lr / 4:.3g}; in fp32 (no --hmp/--fp16), "
            "a smaller out_dim or a stronger clip_grad may also help"
        )


def _lock_output_dir(output_dir: Path) -> DirectoryLock | None:
    """Rank 0 locks the output directory; every rank fails together when another run holds it."""
    lock, error = None, None
    if is_main_process():
        try:
            lock = DirectoryLock(output_dir).acquire()
        except UserError as err:
            error = err
    if any_rank(error is not None):
        raise error if error is not None else UserError(f"rank 0 could not lock {output_dir}")
    return lock


def train(cfg: DictConfig) -> TrainResult:
    starting_point = take_prepared(cfg)  # --pretrained_weights: model.* follows the file (before the checks)
    fresh_heads = None if starting_point is None else not starting_point.has_heads
    prepare_distillation(cfg)  # --distill_from: the teacher file is read and checked against the student
    validate_training_config(cfg)  # also for callers of train() that skip the command line's checks
    ctx = DeviceContext.create(str(cfg.train.device), precision=str(cfg.train.precision))
    timeout = cfg.train.dist_timeout
    owns_group = init_distributed(ctx.backend, float(timeout) if timeout else None)
    lock = logger = run = None
    try:
        ctx.set_cpu_threads(get_local_world_size())
        seed_everything(int(cfg.train.seed))
        parallel = check_parallel_mode(str(cfg.train.parallel))
        main = is_main_process()
        output_dir = Path(str(cfg.train.output_dir)).expanduser()
        lock = _lock_output_dir(output_dir)
        check_resume_against_output_dir(cfg, world_size=get_world_size())  # before config.yaml is replaced
        if main:
            atomic_write_text(output_dir / "config.yaml", to_yaml(cfg))  # (dino.config.save_config, atomically)
            log.info(to_yaml(cfg))

        data = build_training_data(cfg, ctx)
        iters_per_epoch = int(cfg.optim.iters_per_epoch or data.batches_per_data_epoch)
        with same_seed_on_every_rank(int(cfg.train.seed)):
            if starting_point is not None:  # --pretrained_weights
                student, teacher, backbone_kwargs = build_pretrained_networks(cfg, starting_point)
            else:
                student, teacher, backbone_kwargs = build_networks(cfg)
            distill_target = build_distillation_target(cfg, student, teacher) if distilling(cfg) else None
        starting_point = None  # its tensors are in the networks now
        if int(cfg.model.lora_rank):  # frozen backbone, low-rank adapters train (dino.train.lora)
            add_lora_to_networks(
                student, teacher, int(cfg.model.lora_rank), cfg.model.lora_alpha, list(cfg.model.lora_targets)
            )
        student.to(ctx.device)
        teacher.to(ctx.device)
        objective = SelfDistillationObjective(cfg, int(cfg.crops.local_crops_number)).to(ctx.device)
        apply_activation_checkpointing(student.backbone.blocks, str(cfg.train.activation_checkpointing))
        if compile_enabled(cfg, ctx.type):
            compile_blocks(student, teacher)  # before FSDP2, which then wraps the compiled blocks
        # FSDP2 swaps the parameters for DTensors, so it comes before the optimiser is built.
        shard_student_and_teacher(
            student, teacher, ctx, parallel, FSDPSettings.from_config(cfg.train.fsdp, ctx.precision)
        )
        state = TrainState(
            cfg,
            student,
            teacher,
            objective,
            build_optimizer(cfg, student),
            ctx.grad_scaler(),
            backbone_kwargs,
            data.batch_size,
            sharded=parallel == "fsdp",
        )
        schedules = build_schedules(cfg, iters_per_epoch, data.batch_size * get_world_size())
        resumed = state.resume(output_dir) if bool(cfg.train.resume) else None
        if distill_target is not None:
            state.target = prepare_distillation_target(distill_target, cfg, ctx, data, output_dir, schedules)
        warmup_iters = head_warmup_iters(cfg, fresh_heads, len(schedules.lr))
        if warmup_iters:
            state.head_warmup = HeadWarmup(student, objective, warmup_iters)
        state.wrap(ctx, parallel)
        state.restore_rng()

        logger = MetricLogger(
            output_dir, enabled=main, resume_step=state.progress.global_step if resumed is not None else None
        )
        with StopSignal() as stop:
            run = _Run(cfg, ctx, output_dir, state, data, schedules, iters_per_epoch, logger, stop)
            try:
                run.run()
            except Exception as err:
                if is_enabled() and is_collective_timeout(err):
                    raise UserError(collective_timeout_message(state.progress.global_step + 1, err)) from None
                raise
            barrier()
        if stop.requested and main:
            saved = SHARDED_CHECKPOINT_NAME if state.sharded else CHECKPOINT_NAME
            if run.guard.last_saved_step == state.progress.global_step:
                log.info(f"stopped by SIGTERM; checkpoint saved to {output_dir / saved}")
            else:
                log.info(
                    f"stopped by SIGTERM; training was out of its normal range, so {output_dir / saved} "
                    f"still holds step {run.guard.last_saved_step}"
                )
        progress = state.progress
        return TrainResult(
            output_dir,
            progress.global_step,
            progress.epoch,
            run.stopped_early,
            run.last_metrics,
            preempted=stop.requested,
        )
    finally:
        # on success and on error alike: no half-open bar, unflushed log, orphaned workers or held lock
        if run is not None:
            run.close()
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.release()
        if owns_group:
            destroy_distributed()


def _maybe_visualize(cfg: DictConfig, teacher, logger: MetricLogger, epoch: int, global_step: int) -> None:
    """Every `train.visualize_freq` epochs: attention and PCA pictures of fixed images in tensorboard."""
    freq = int(cfg.train.visualize_freq)
    if not freq or epoch % freq:
        return
    from dino.train.visual_logging import log_pictures

    log_pictures(cfg, teacher.backbone, logger, global_step)
