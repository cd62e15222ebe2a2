"""The training loop: one function, `train(cfg)`, from a composed config to a trained teacher.

Read it top to bottom: set up the device and process group → data → student/teacher/objective →
optimiser and schedules → resume → epochs of `train_step` → checkpoints and the teacher export.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dino.config import save_config, to_yaml
from dino.distributed import (
    DeviceContext,
    all_reduce_mean,
    any_rank,
    barrier,
    get_local_world_size,
    get_world_size,
    init_distributed,
    is_main_process,
    same_seed_on_every_rank,
    seed_everything,
)
from dino.distributed.checkpoint import copy_sharded, full_state_dict_on_rank0
from dino.distributed.parallel import (
    FSDPSettings,
    check_parallel_mode,
    is_sharded,
    is_sharded_tensor,
    shard_student_and_teacher,
    unwrap,
    wrap_student,
)
from dino.errors import UserError
from dino.hub import save_backbone
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
from dino.train.meta_arch import (
    SelfDistillationObjective,
    build_networks,
    build_student_backbone,
    compile_blocks,
    update_teacher,
)
from dino.train.metrics import MetricLogger, collapse_warning, teacher_entropy_stats
from dino.train.param_groups import apply_schedules, build_param_groups
from dino.train.schedules import Schedule, last_layer_lr_schedule, momentum_schedule, scale_lr, teacher_temp_schedule


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; the last good checkpoint is left untouched."""


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
    per_iteration = str(cfg.dino.loss_style) == "v2"
    return TrainingSchedules(
        lr=lr,
        last_layer_lr=last_layer_lr_schedule(lr, min(int(optim.freeze_last_layer) * iters_per_epoch, total)),
        weight_decay=wd,
        momentum=momentum_schedule(float(teacher.momentum_teacher), total, float(teacher.final_momentum_teacher)),
        teacher_temp=teacher_temp_schedule(float(teacher.warmup_teacher_temp), float(teacher.teacher_temp),
                                           int(teacher.warmup_teacher_temp_epochs), epochs, iters_per_epoch,
                                           per_iteration=per_iteration),
        teacher_temp_per_iteration=per_iteration,
    )


def build_optimizer(cfg: DictConfig, student: torch.nn.Module) -> torch.optim.Optimizer:
    groups = build_param_groups(student, layerwise_decay=float(cfg.optim.layerwise_decay),
                                patch_embed_lr_mult=float(cfg.optim.patch_embed_lr_mult),
                                exclude_tokens_from_weight_decay=bool(cfg.optim.exclude_tokens_from_weight_decay))
    name = str(cfg.optim.optimizer).lower()
    if name == "adamw":
        # The fused kernel updates each parameter in one pass instead of ~10 foreach passes: the optimiser
        # step of the ViT-S/14 bench preset drops from ~1.5 s to ~0.2 s on 2 CPU cores. It exists for plain
        # CPU / CUDA tensors; sharded (DTensor) and HPU parameters keep the foreach implementation.
        params = [p for group in groups for p in group["params"]]
        fused = all(p.device.type in ("cpu", "cuda") and not is_sharded_tensor(p) for p in params)
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.adamw_betas), fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    raise UserError(f"unknown optimizer {cfg.optim.optimizer!r}; choose adamw or sgd")


class StopSignal:
    """Turns SIGTERM (cluster pre-emption) into a flag the loop checks between steps."""

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


def train_step(batch: dict, student, teacher, objective: SelfDistillationObjective, optimizer, scaler,
               ctx: DeviceContext, cfg: DictConfig, teacher_temp: float) -> tuple[torch.Tensor, dict, dict]:
    """Forward teacher and student, compute the losses, backward, clip, optimiser step. Returns (loss, terms, stats)."""
    batch = _to_device(batch, ctx)
    global_crops = batch["collated_global_crops"]
    local_crops = batch["collated_local_crops"]
    use_ibot = objective.ibot_loss is not None
    masks = batch["collated_masks"] if use_ibot else None
    mask_indices = batch["mask_indices_list"] if use_ibot else None
    with ctx.autocast():
        with torch.no_grad():
            teacher_out = teacher(global_crops, None, None, mask_indices)
        targets = objective.teacher_targets(teacher_out, teacher_temp, batch.get("n_masked_patches"))
        del teacher_out  # its (masked patches × prototypes) logits would otherwise live through the backward pass
        student_out = student(global_crops, local_crops, masks, mask_indices)
        loss, terms = objective(student_out, targets, batch.get("masks_weight"), n_images=global_crops.shape[0])
    # Mean over ranks of the loss and its terms (one all-reduce): what is logged, and what the finiteness
    # check looks at, so that every rank stops together instead of leaving the others in a collective.
    names = list(terms)
    reduced = all_reduce_mean(torch.stack([loss.detach().float()] + [terms[n].detach().float() for n in names]))
    global_loss, global_terms = reduced[0], dict(zip(names, reduced[1:]))
    if not torch.isfinite(global_loss):
        bad = ", ".join(f"{name}={float(value):.4g}" for name, value in global_terms.items())
        raise NonFiniteLossError(
            f"the loss became non-finite ({bad}); the last good checkpoint was kept. Try without --hmp/--fp16, "
            "a lower lr, or a smaller out_dim")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    ctx.mark_step()
    clip = float(cfg.optim.clip_grad)
    module = unwrap(student)
    if clip > 0:
        if str(cfg.optim.clip_style) == "per_module":
            parts = {"backbone": module.backbone, "dino_head": module.dino_head}
            if module.ibot_head is not None:
                parts["ibot_head"] = module.ibot_head
            clip_grad_norm_per_module(parts, clip)
        else:
            clip_gradients_per_parameter(module, clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    ctx.mark_step()
    return global_loss, global_terms, teacher_entropy_stats(targets["cls_probs"])


def _save_checkpoint(output_dir: Path, student, teacher, objective, optimizer, scaler, cfg, backbone_kwargs,
                     epoch: int, step_in_epoch: int, global_step: int, data_epoch: int, data_batch: int,
                     extra_copy: str | None = None, sharded: bool = False, batch_size: int = 0) -> None:
    """`checkpoint.pth` (rank 0) or, under FSDP, `checkpoint_sharded/` (all ranks); then the teacher export."""
    if sharded:
        progress = dict(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step, data_epoch=data_epoch,
                        data_batch=data_batch, world_size=get_world_size(), batch_size=batch_size)
        directory = output_dir / SHARDED_CHECKPOINT_NAME
        save_sharded_training_checkpoint(directory, unwrap(student), teacher, optimizer, objective, scaler, progress,
                                         {"config": to_yaml(cfg), "backbone_kwargs": backbone_kwargs})
        if extra_copy:
            copy_sharded(directory, output_dir / (Path(extra_copy).stem + "_sharded"))
        _export_teacher_backbone(output_dir, teacher, cfg, backbone_kwargs)
        return
    if not is_main_process():
        return
    state = {
        "student": unwrap(student).state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "objective": objective.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "data_epoch": data_epoch,
        "data_batch": data_batch,
        "rng": capture_rng_state(),
        "config": to_yaml(cfg),
        "backbone_kwargs": backbone_kwargs,
    }
    atomic_save(state, output_dir / CHECKPOINT_NAME)
    if extra_copy:
        atomic_save(state, output_dir / extra_copy)
    save_backbone(teacher.backbone, output_dir / TEACHER_BACKBONE_NAME, backbone_kwargs)


def _export_teacher_backbone(output_dir: Path, teacher, cfg: DictConfig, backbone_kwargs: dict) -> None:
    """Collective under FSDP: gather the teacher backbone onto rank 0 and write `teacher_backbone.pth`."""
    full = full_state_dict_on_rank0(teacher)
    if not is_main_process():
        return
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    # Built on the meta device and filled by assignment: a strict key check without a second copy in memory.
    # Drop path does not change the weights; a uniform zero rate avoids host reads of meta tensors.
    skeleton_cfg = OmegaConf.merge(cfg.model, {"drop_path_rate": 0.0, "drop_path_uniform": True})
    with torch.device("meta"):
        backbone, _ = build_student_backbone(skeleton_cfg)
    backbone.load_state_dict(weights, strict=True, assign=True)
    save_backbone(backbone, output_dir / TEACHER_BACKBONE_NAME, backbone_kwargs)


def _check_same_global_batch(progress: dict[str, int], batch_size: int) -> None:
    """A sharded checkpoint resumes on any number of processes as long as the global batch is unchanged.

    Its position (iteration, data batch) counts global batches, and the schedules are indexed by it; with
    another global batch both would silently mean something else.
    """
    saved = progress["batch_size"] * progress["world_size"]
    now = batch_size * get_world_size()
    if saved != now:
        raise UserError(f"cannot resume: the checkpoint was trained with a global batch of {saved} "
                        f"({progress['world_size']} process(es) × {progress['batch_size']}), this run has {now}; "
                        f"set --batch_size_per_device {saved // get_world_size()} to keep it")


def train(cfg: DictConfig) -> TrainResult:
    ctx = DeviceContext.create(str(cfg.train.device), hmp=bool(cfg.train.hmp), fp16=bool(cfg.train.fp16))
    init_distributed(ctx.backend)
    ctx.set_cpu_threads(get_local_world_size())
    seed_everything(int(cfg.train.seed))
    parallel = check_parallel_mode(str(cfg.train.parallel))
    sharded_checkpoints = parallel == "fsdp"
    main = is_main_process()
    output_dir = Path(str(cfg.train.output_dir)).expanduser()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        print(to_yaml(cfg))

    data = build_training_data(cfg, ctx)
    iters_per_epoch = int(cfg.optim.iters_per_epoch or data.batches_per_data_epoch)
    epochs = int(cfg.optim.epochs)
    with same_seed_on_every_rank(int(cfg.train.seed)):
        student, teacher, backbone_kwargs = build_networks(cfg)
    student.to(ctx.device)
    teacher.to(ctx.device)
    objective = SelfDistillationObjective(cfg, int(cfg.crops.local_crops_number)).to(ctx.device)
    if bool(cfg.train.get("compile", False)):
        compile_blocks(student, teacher)  # before FSDP2, which then wraps the compiled blocks
    # FSDP2 swaps the parameters for DTensors, so it comes before the optimiser is built.
    shard_student_and_teacher(student, teacher, ctx, parallel,
                              FSDPSettings.from_config(cfg.train.get("fsdp", {}), bool(cfg.train.hmp)))
    optimizer = build_optimizer(cfg, student)
    scaler = ctx.grad_scaler()
    total_batch = data.batch_size * get_world_size()
    schedules = build_schedules(cfg, iters_per_epoch, total_batch)

    start_epoch, start_step_in_epoch, data_epoch, data_batch = 0, 0, 0, 0
    checkpoint_path = find_training_checkpoint(output_dir, sharded_checkpoints) if bool(cfg.train.resume) else None
    resumed_rng = None
    if checkpoint_path is not None and sharded_checkpoints:
        progress, resumed_rng = load_sharded_training_checkpoint(checkpoint_path, student, teacher, optimizer,
                                                                 objective, scaler)
        start_epoch, start_step_in_epoch = progress["epoch"], progress["step_in_epoch"]
        _check_same_global_batch(progress, data.batch_size)
        data_epoch, data_batch = progress["data_epoch"], progress["data_batch"]
        if resumed_rng is None:
            # another world size: per-rank streams cannot be carried over; start fresh, deterministic ones
            seed_everything(int(cfg.train.seed) + progress["global_step"])
        if main:
            print(f"resumed from {checkpoint_path} (saved by {progress['world_size']} process(es)) "
                  f"at epoch {start_epoch}, step {start_step_in_epoch}")
    elif checkpoint_path is not None:
        state = load_training_checkpoint(checkpoint_path)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["objective"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        data_epoch, data_batch = int(state["data_epoch"]), int(state["data_batch"])
        resumed_rng = state["rng"]
        if main:
            print(f"resumed from {checkpoint_path} at epoch {start_epoch}, step {start_step_in_epoch}")
    student_wrapped = wrap_student(student, ctx, parallel)
    if resumed_rng is not None:
        restore_rng_state(resumed_rng)

    logger = MetricLogger(output_dir, enabled=main)
    global_step = start_epoch * iters_per_epoch + start_step_in_epoch
    max_iters = int(cfg.train.max_iters) if cfg.train.max_iters is not None else None
    every = int(cfg.train.checkpoint_every_iters)
    log_freq = max(1, int(cfg.train.log_freq))
    warned_collapse = False
    last_metrics: dict[str, float] = {}
    stopped_early = False
    epoch = start_epoch
    step_in_epoch = start_step_in_epoch
    stream = data.stream(data_epoch, data_batch)
    if main:
        print(f"training {epochs} epochs × {iters_per_epoch} iterations, global batch {total_batch}, "
              f"device {ctx.device}, {get_world_size()} process(es); logs in {output_dir}")

    with StopSignal() as stop:
        while epoch < epochs:
            progress = tqdm(total=iters_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                            disable=not main, dynamic_ncols=True, leave=True)
            tick = time.perf_counter()
            while step_in_epoch < iters_per_epoch:
                data_epoch, data_batch, batch = next(stream)
                data_batch += 1  # the position *after* this batch is what a checkpoint must store
                lr, wd = schedules.lr[global_step], schedules.weight_decay[global_step]
                apply_schedules(optimizer, lr, wd, schedules.last_layer_lr[global_step])
                teacher_temp = schedules.teacher_temp_at(epoch, global_step)
                loss, terms, stats = train_step(batch, student_wrapped, teacher, objective, optimizer, scaler, ctx, cfg,
                                                teacher_temp)
                momentum = schedules.momentum[global_step]
                update_teacher(unwrap(student_wrapped), teacher, momentum)
                global_step += 1
                step_in_epoch += 1

                now = time.perf_counter()
                images_per_s = total_batch / max(now - tick, 1e-9)
                tick = now
                last_metrics = {"loss": float(loss), **{k: float(v) for k, v in terms.items()}, "lr": lr, "wd": wd,
                                "momentum": momentum, "teacher_temp": teacher_temp, **stats, "images_per_s": images_per_s,
                                "epoch": epoch}
                logger.log(global_step, last_metrics, tensorboard=(global_step % log_freq == 0))
                progress.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
                progress.update(1)
                if main and not warned_collapse and epoch >= 1 and (message := collapse_warning(stats)):
                    tqdm.write(f"warning: {message}")
                    warned_collapse = True

                reached_max = max_iters is not None and global_step >= max_iters
                # a pre-emption signal may reach the ranks at different steps: agree before saving
                stop.requested = any_rank(stop.requested)
                if stop.requested or reached_max or (every and global_step % every == 0 and step_in_epoch < iters_per_epoch):
                    _save_checkpoint(output_dir, student_wrapped, teacher, objective, optimizer, scaler, cfg,
                                     backbone_kwargs, epoch, step_in_epoch, global_step, data_epoch, data_batch,
                                     sharded=sharded_checkpoints, batch_size=data.batch_size)
                if stop.requested or reached_max:
                    stopped_early = True
                    break
            progress.close()
            if stopped_early:
                break
            epoch, step_in_epoch = epoch + 1, 0
            freq = int(cfg.train.saveckp_freq)
            extra = f"checkpoint{epoch:04d}.pth" if freq and epoch % freq == 0 else None
            _save_checkpoint(output_dir, student_wrapped, teacher, objective, optimizer, scaler, cfg, backbone_kwargs,
                             epoch, 0, global_step, data_epoch, data_batch, extra_copy=extra,
                             sharded=sharded_checkpoints, batch_size=data.batch_size)
            if main:
                logger.log(global_step, {"epoch_end": epoch, "peak_memory_mb": ctx.max_memory_allocated_mb()},
                           tensorboard=False)
                if not is_sharded(teacher):  # rank 0 alone cannot run a sharded teacher
                    _maybe_visualize(cfg, teacher, logger, epoch, global_step)
            logger.flush()
    barrier()
    logger.close()
    if stop.requested and main:
        saved = SHARDED_CHECKPOINT_NAME if sharded_checkpoints else CHECKPOINT_NAME
        print(f"stopped by SIGTERM; checkpoint saved to {output_dir / saved}")
    return TrainResult(output_dir, global_step, epoch, stopped_early, last_metrics, preempted=stop.requested)


def _maybe_visualize(cfg: DictConfig, teacher, logger: MetricLogger, epoch: int, global_step: int) -> None:
    """Every `train.visualize_freq` epochs: attention and PCA pictures of fixed images in tensorboard."""
    freq = int(cfg.train.visualize_freq)
    if not freq or epoch % freq:
        return
    from dino.train.visual_logging import log_pictures

    log_pictures(cfg, teacher.backbone, logger, global_step)
