"""Student, teacher and the self-distillation objective (DINO, Caron et al. 2021; DINOv2, Oquab et al. 2023).

One training step, in the order the code runs it:

1. `MultiCropNetwork` (the teacher, no grad) embeds the two global crops → [CLS] logits, and the patch
   logits at the masked positions (iBOT);
2. `SelfDistillationObjective.teacher_targets` turns them into targets: centering + sharpening, or
   Sinkhorn-Knopp;
3. `MultiCropNetwork` (the student) embeds the masked global crops and the local crops;
4. `SelfDistillationObjective.forward` adds the DINO [CLS] loss, the iBOT masked-patch loss and KoLeo;
5. after the optimiser step, `update_teacher` moves the teacher towards the student (EMA).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dino.distributed.parallel import local_tensor
from dino.losses import (
    DINOLoss,
    KoLeoLoss,
    dino_v1_loss,
    dinov2_clstoken_loss_terms,
    feature_distillation_loss,
    iBOTPatchLoss,
)
from dino.models import DINOHead, VisionTransformer, build_backbone


def backbone_kwargs_from_config(model_cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments that rebuild the backbone (also saved next to exported weights)."""
    kwargs: dict[str, Any] = dict(
        arch=model_cfg.arch,
        patch_size=int(model_cfg.patch_size),
        img_size=int(model_cfg.img_size),
        init_values=model_cfg.layerscale,
        ffn_layer=model_cfg.ffn_layer,
        num_register_tokens=int(model_cfg.num_register_tokens),
        qkv_bias=bool(model_cfg.qkv_bias),
        interpolate_offset=float(model_cfg.interpolate_offset),
        interpolate_antialias=bool(model_cfg.interpolate_antialias),
        use_mask_token=bool(model_cfg.use_mask_token),
    )
    if model_cfg.depth is not None:
        kwargs["depth"] = int(model_cfg.depth)
    if model_cfg.embed_dim is not None:
        kwargs["embed_dim"] = int(model_cfg.embed_dim)
    return kwargs


def build_student_backbone(model_cfg: DictConfig) -> tuple[VisionTransformer, dict[str, Any]]:
    kwargs = backbone_kwargs_from_config(model_cfg)
    runtime = dict(
        drop_path_rate=float(model_cfg.drop_path_rate),
        drop_path_uniform=bool(model_cfg.drop_path_uniform),
        attn_backend=model_cfg.attn_backend,
    )
    build_kwargs = {k: v for k, v in kwargs.items() if k not in ("arch", "patch_size")}
    backbone = build_backbone(kwargs["arch"], kwargs["patch_size"], **build_kwargs, **runtime)
    backbone.set_drop_path_mode(str(model_cfg.drop_path_mode))  # training only: not in kwargs
    return backbone, kwargs


class MultiCropNetwork(nn.Module):
    """Backbone + DINO head (+ a separate iBOT head): crops in, logits out.

    With `ibot_head` None but `use_ibot`, the DINO head also projects the masked patch tokens (DINOv2's
    shared head): they are concatenated with the [CLS] tokens so the head runs once.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        dino_head: DINOHead,
        ibot_head: DINOHead | None = None,
        use_ibot: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.use_ibot = use_ibot

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None = None,
        masks: Tensor | None = None,
        mask_indices: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Returns `global_cls_tokens` (2B, D) (pre-head, for KoLeo), `global_cls_logits` (2B, K),
        `local_cls_logits` (n_local·B, K) or None, `masked_patch_logits` (M, K') or None."""
        global_out = self.backbone.forward_features(global_crops, masks=masks)
        cls_global = global_out["x_norm_clstoken"]
        head_inputs = [cls_global]
        n_global, n_local = cls_global.shape[0], 0
        if local_crops is not None and local_crops.numel() > 0:
            cls_local = self.backbone.forward_features(local_crops)["x_norm_clstoken"]
            head_inputs.append(cls_local)
            n_local = cls_local.shape[0]
        masked_patches = None
        if self.use_ibot and mask_indices is not None:
            masked_patches = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            if self.ibot_head is None:
                head_inputs.append(masked_patches)
        logits = self.dino_head(torch.cat(head_inputs))
        # one split, not three slices: the backward of a slice zero-fills a gradient as large as all the
        # logits (~180 MB at 65,536 prototypes) per slice, the backward of a split concatenates once
        global_logits, local_logits, patch_logits = logits.split(
            [n_global, n_local, logits.shape[0] - n_global - n_local]
        )
        out = {
            "global_cls_tokens": cls_global,
            "global_cls_logits": global_logits,
            "local_cls_logits": local_logits if n_local else None,
            "masked_patch_logits": None,
        }
        if masked_patches is not None:
            out["masked_patch_logits"] = patch_logits if self.ibot_head is None else self.ibot_head(masked_patches)
        out["global_patch_tokens"] = global_out["x_norm_patchtokens"]
        feature_proj = getattr(self.dino_head, "feature_proj", None)  # feature distillation (dino.train.distill)
        if feature_proj is not None:
            out["projected_cls_tokens"] = feature_proj(cls_global)
            out["projected_patch_tokens"] = feature_proj(global_out["x_norm_patchtokens"])
        return out


def build_networks(
    cfg: DictConfig,
    backbone: nn.Module | None = None,
) -> tuple[MultiCropNetwork, MultiCropNetwork, dict[str, Any]]:
    """Student and teacher from the same initialisation; the teacher is an independent copy without grads.

    `backbone`: a ready backbone (e.g. loaded from a file, `dino.train.pretrained`) instead of one built from
    `cfg.model`; the heads are built fresh for it either way."""
    if backbone is None:
        backbone, backbone_kwargs = build_student_backbone(cfg.model)
    else:
        backbone_kwargs = {}
    embed_dim = backbone.embed_dim
    use_ibot = float(cfg.ibot.loss_weight) > 0
    dino_head = DINOHead(
        embed_dim,
        int(cfg.dino.head_n_prototypes),
        use_bn=bool(cfg.dino.use_bn_in_head),
        norm_last_layer=bool(cfg.dino.norm_last_layer),
        nlayers=int(cfg.dino.head_nlayers),
        hidden_dim=int(cfg.dino.head_hidden_dim),
        bottleneck_dim=int(cfg.dino.head_bottleneck_dim),
    )
    ibot_head = None
    if use_ibot and bool(cfg.ibot.separate_head):
        ibot_head = DINOHead(
            embed_dim,
            int(cfg.ibot.head_n_prototypes),
            norm_last_layer=bool(cfg.dino.norm_last_layer),
            nlayers=int(cfg.ibot.head_nlayers),
            hidden_dim=int(cfg.ibot.head_hidden_dim),
            bottleneck_dim=int(cfg.ibot.head_bottleneck_dim),
        )
    student = MultiCropNetwork(backbone, dino_head, ibot_head, use_ibot)
    # deepcopy, never assignment: a teacher that *is* the student collapses at ln K (dinov2 #407)
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad = False
    teacher.eval()
    return student, teacher, backbone_kwargs


def compile_enabled(cfg: DictConfig, device_type: str) -> bool:
    """`train.compile`: true | false | auto — auto compiles on CUDA, where the one-GPU check measured +12 %
    (ViT-S/14) to +21 % (ViT-L/14) images/s and 13 % less memory (BENCHMARKS.md), and not elsewhere (on a
    small CPU the first step's compilation outweighs the gain for short runs)."""
    value = cfg.train.compile
    if isinstance(value, str) and value.lower() == "auto":
        return device_type == "cuda"
    return bool(value)


def compile_blocks(*networks: MultiCropNetwork) -> None:
    """`train.compile`: compile every transformer block of the given networks in place (inductor, static shapes).

    `nn.Module.compile` keeps the module and its parameters as they are (no `_orig_mod` wrapper), so state-dict
    keys, checkpoints, parameter groups and the EMA update do not change. All blocks share the same code, so
    they share the compiled graphs too: one per crop size (global, local), network (student with grads,
    teacher without) and distinct stochastic-depth rate, each a guard variant of the same frame. The recompile
    limit is raised to fit them all — above it dynamo would silently run the remaining variants eagerly.
    A uniform rate (the DINOv2 presets) compiles 3 graphs; DINO v1's rate, linear in depth, 3 per block
    (minutes on CPU).
    """
    blocks = [block for network in networks for block in network.backbone.blocks]
    rates = {getattr(block.drop_path, "drop_prob", 0.0) for block in blocks}
    # crop sizes × networks × rates, + headroom for other input sizes (e.g. attention maps for tensorboard)
    needed = 2 * len(networks) * len(rates) + 8
    config = torch._dynamo.config
    # torch < 2.6 names them cache_size_limit / accumulated_cache_size_limit
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    accumulated = "accumulated_" + limit
    setattr(config, limit, max(getattr(config, limit), needed))
    setattr(config, accumulated, max(getattr(config, accumulated), 2 * needed))
    for block in blocks:
        block.compile(dynamic=False)


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA: θ_teacher ← m·θ_teacher + (1 − m)·θ_student, parameter by parameter.

    Under FSDP2 both networks are sharded identically, so the update runs on each rank's local shards
    (no all-gather); under DDP / one process the local tensor is the whole parameter.
    """
    student_params = [local_tensor(p.detach()) for p in student.parameters()]
    teacher_params = [local_tensor(p) for p in teacher.parameters()]
    if len(student_params) != len(teacher_params):
        raise RuntimeError("student and teacher have different parameter lists")
    # lerp: θ_t + (1 − m)(θ_s − θ_t), the same EMA in one pass over the weights instead of two
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)


class SelfDistillationObjective(nn.Module):
    """DINO [CLS] loss (+ iBOT masked-patch loss, + KoLeo) with the teacher centers as state.

    `dino.pair_normalisation`: 'pair_mean' (DINO v1: one term, the mean of H(t_i, s_j) over pairs j ≠ i) or
    'dinov2' (separately normalised global and local terms).
    `dino.center_update`: 'immediate' (DINO v1: center EMA right after the loss) or 'deferred' (DINOv2).
    (`dino.loss_style` v1 / v2 is the shorthand that sets both, and `teacher.temp_per_iteration`.)
    `dino.centering`: 'softmax' (centering + sharpening) or 'sinkhorn_knopp' (3 iterations).
    """

    def __init__(self, cfg: DictConfig, n_local_crops: int):
        super().__init__()
        self.pair_normalisation = str(cfg.dino.pair_normalisation)
        if self.pair_normalisation not in ("pair_mean", "dinov2"):
            raise ValueError(f"dino.pair_normalisation must be pair_mean or dinov2, got {self.pair_normalisation!r}")
        center_update = str(cfg.dino.center_update)
        if center_update not in ("immediate", "deferred"):
            raise ValueError(f"dino.center_update must be immediate or deferred, got {center_update!r}")
        self.centering = str(cfg.dino.centering)
        if self.centering not in ("softmax", "sinkhorn_knopp"):
            raise ValueError(f"dino.centering must be softmax or sinkhorn_knopp, got {self.centering!r}")
        deferred = center_update == "deferred"
        self.n_local_crops = n_local_crops
        self.dino_weight = float(cfg.dino.loss_weight)
        self.koleo_weight = float(cfg.dino.koleo_loss_weight)
        self.ibot_weight = float(cfg.ibot.loss_weight)
        # distill.feature_loss_weight: the student's projected tokens regressed onto the frozen teacher's
        self.feature_weight = float(OmegaConf.select(cfg, "distill.feature_loss_weight", default=0.0) or 0.0)
        self.feature_kind = str(OmegaConf.select(cfg, "distill.feature_loss", default="cosine"))
        self.feature_patch_weight = float(OmegaConf.select(cfg, "distill.feature_patch_weight", default=1.0))
        temp = float(cfg.dino.student_temp)
        momentum = float(cfg.dino.center_momentum)
        self.dino_loss = DINOLoss(int(cfg.dino.head_n_prototypes), temp, momentum, deferred_center_update=deferred)
        patch_dim = int(cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes)
        self.ibot_loss = (
            iBOTPatchLoss(patch_dim, temp, momentum, deferred_center_update=deferred) if self.ibot_weight > 0 else None
        )
        self.koleo_loss = KoLeoLoss()

    @torch.no_grad()
    def teacher_targets(
        self, teacher_out: dict[str, Tensor], teacher_temp: float, n_masked_patches: Tensor | None = None
    ) -> dict[str, Tensor | None]:
        cls_logits = teacher_out["global_cls_logits"].float()
        patch_logits = teacher_out.get("masked_patch_logits")
        if self.centering == "sinkhorn_knopp":
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = None
            if self.ibot_loss is not None and patch_logits is not None:
                patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(
                    patch_logits.float(), teacher_temp, n_masked_patches
                )
        else:
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_probs = None
            if self.ibot_loss is not None and patch_logits is not None:
                patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits.float(), teacher_temp)
                self.ibot_loss.update_center(patch_logits.float())
        targets = {"cls_probs": cls_probs, "patch_probs": patch_probs}
        if self.feature_weight > 0:
            targets["feature_cls"] = teacher_out["global_cls_tokens"]
            targets["feature_patches"] = teacher_out["global_patch_tokens"]
        return targets

    def forward(
        self,
        student_out: dict[str, Tensor],
        targets: dict[str, Tensor | None],
        masks_weight: Tensor | None = None,
        n_images: int | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its named terms (unweighted values for logging)."""
        s_global = student_out["global_cls_logits"].float()
        s_local = student_out["local_cls_logits"]
        s_local = s_local.float() if s_local is not None else None
        t_cls = targets["cls_probs"]
        terms: dict[str, Tensor] = {}
        if self.pair_normalisation == "pair_mean":
            all_student = torch.cat([s_global] + ([s_local] if s_local is not None else []))
            terms["dino"] = dino_v1_loss(all_student, t_cls, 2 + self.n_local_crops, self.dino_loss.student_temp)
            total = self.dino_weight * terms["dino"]
        else:
            cls_terms = dinov2_clstoken_loss_terms(self.dino_loss, s_global, t_cls, s_local, self.n_local_crops)
            terms["dino_global"] = cls_terms.global_crops
            terms["dino_local"] = cls_terms.local_crops
            total = self.dino_weight * (cls_terms.global_crops + cls_terms.local_crops)
        if self.koleo_weight > 0:
            cls_tokens = student_out["global_cls_tokens"].float()
            terms["koleo"] = sum(self.koleo_loss(chunk) for chunk in cls_tokens.chunk(2))
            total = total + self.koleo_weight * terms["koleo"]
        if self.ibot_loss is not None and student_out.get("masked_patch_logits") is not None:
            terms["ibot"] = self.ibot_loss.forward_masked(
                student_out["masked_patch_logits"].float(), targets["patch_probs"], masks_weight, n_images
            )
            # DINOv2 scales the patch loss by 2 crops × ½
            total = total + self.ibot_weight * terms["ibot"]
        if self.feature_weight > 0 and targets.get("feature_cls") is not None:
            terms["feature"], _ = feature_distillation_loss(
                student_out["projected_cls_tokens"],
                student_out["projected_patch_tokens"],
                targets["feature_cls"],
                targets["feature_patches"],
                None,
                kind=self.feature_kind,
                patch_weight=self.feature_patch_weight,
            )
            total = total + self.feature_weight * terms["feature"]
        return total, terms
