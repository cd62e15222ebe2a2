"""Official entry points and checkpoint loading.

Everything that turns a file (ours or an official DINO / DINOv2 / DINOv3 release) into a backbone goes through
`load_backbone`: it reads the file safely (`weights_only=True` unless the user allows pickle), finds the
backbone inside training checkpoints (`teacher` / `student`, `module.` / `backbone.` prefixes, chunked
`blocks.C.I` keys), infers the architecture from the tensors, and loads **strictly** — a mismatch is a
`UserError` that lists missing and unexpected keys and says which arch / patch size / register count the
file actually holds. DINOv3 files (RoPE ViTs, ConvNeXt students) are recognised by their keys and shapes and
assigned into a model built on the meta device (`load_dinov3`, `_build_dinov3_from_state_dict`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from dino.errors import UserError, require_path
from dino.log import get_logger
from dino.models import ARCH_SIZES, VisionTransformer, build_backbone
from dino.models.dinov3 import (
    DINOV3_RELEASES,
    DINOV3_WEIGHTS,
    build_dinov3,
    build_dinov3_for_state_dict,
    describe_dinov3_state_dict,
    dinov3_url,
    is_dinov3_state_dict,
)

logger = get_logger(__name__)

_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{model}/{model}{reg}_pretrain.pth"
_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{file}/{file}_pretrain.pth"

# hub name → (url, model kwargs) for the official releases
_V2_COMMON = dict(img_size=518, patch_size=14, init_values=1.0, use_mask_token=True)
_V1_COMMON = dict(
    img_size=224, init_values=None, use_mask_token=False, interpolate_offset=0.1, interpolate_antialias=False
)
OFFICIAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {}
for _size, _arch in (("s", "vit_small"), ("b", "vit_base"), ("l", "vit_large"), ("g", "vit_giant2")):
    _name = f"dinov2_vit{_size}14"
    OFFICIAL_MODELS[_name] = (
        _DINOV2_URL.format(model=_name, reg=""),
        dict(_V2_COMMON, arch=_arch, num_register_tokens=0, interpolate_offset=0.1, interpolate_antialias=False),
    )
    # the register models were trained with offset 0 and antialiased interpolation
    OFFICIAL_MODELS[_name + "_reg"] = (
        _DINOV2_URL.format(model=_name, reg="_reg4"),
        dict(_V2_COMMON, arch=_arch, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True),
    )
for _name, _file, _arch, _patch in (
    ("dino_vits16", "dino_deitsmall16", "vit_small", 16),
    ("dino_vits8", "dino_deitsmall8", "vit_small", 8),
    ("dino_vitb16", "dino_vitbase16", "vit_base", 16),
    ("dino_vitb8", "dino_vitbase8", "vit_base", 8),
):
    OFFICIAL_MODELS[_name] = (_DINO_URL.format(file=_file), dict(_V1_COMMON, arch=_arch, patch_size=_patch))

HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")


# --- reading files ------------------------------------------------------------------------------
def _not_a_checkpoint(path: str) -> str:
    return (
        f"cannot read checkpoint {path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a "
        "pickle: another kind of file, or damaged)"
    )


def load_checkpoint_file(path_or_url: str, allow_pickle: bool = False, network: str = "teacher") -> dict:
    """Read a checkpoint (local path or http(s) URL, or a sharded DCP folder) onto the CPU.

    For a sharded folder only `network` ('teacher' or 'student') is read, see `load_sharded_network`.

    `weights_only=True` unless `allow_pickle`: a file that needs arbitrary pickled code is refused with a
    message naming the flag that allows it.
    """
    path_or_url = str(path_or_url)
    if path_or_url.startswith(("http://", "https://")):
        try:
            return torch.hub.load_state_dict_from_url(
                path_or_url, map_location="cpu", weights_only=not allow_pickle, progress=True
            )
        except pickle.UnpicklingError:
            raise UserError(f"{path_or_url} needs pickle to load; if you trust it, pass --allow_pickle") from None
        except (OSError, RuntimeError) as err:
            raise UserError(
                f"could not download {path_or_url} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                "Offline? Download the file elsewhere and pass its local path with --pretrained_weights"
            ) from None
    path = require_path(path_or_url, "checkpoint")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ".metadata")):
            return load_sharded_network(path, network)
        hf_weights = _hf_folder_weights(path)
        if (
            hf_weights is not None
        ):  # a Hugging Face Dinov2Model folder (ours from `dino export --format hf`, or the hub's)
            weights = load_checkpoint_file(str(hf_weights), allow_pickle=allow_pickle, network=network)
            state = weights.get("backbone", weights)
            return {"backbone": state, "backbone_kwargs": hf_config_kwargs(Path(path) / "config.json")}
        raise UserError(
            f"checkpoint {path} is a folder but not a sharded (DCP) checkpoint (no .metadata file) "
            f"and not a Hugging Face model folder (no config.json with {' or '.join(HF_WEIGHT_FILES)})"
        )
    if path.endswith(".safetensors"):
        return load_safetensors_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if not _is_zip_or_pickle(path):  # random bytes also end here: not "pickled objects"
            raise UserError(_not_a_checkpoint(path)) from None
        if allow_pickle:
            raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
        raise UserError(
            f"checkpoint {path} contains pickled Python objects that weights_only loading refuses; "
            "if you trust the file, allow it with --allow_pickle (allow_pickle=True)"
        ) from None
    except Exception as err:  # torch.load raises many types on garbage input; all mean "not a checkpoint"
        if not _is_zip_or_pickle(path):  # random bytes can fail inside the unpickler with any error type
            raise UserError(_not_a_checkpoint(path)) from None
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read checkpoint {path}: not a valid PyTorch file or truncated ({detail})") from None


# the metadata key of our .safetensors backbones holding the model kwargs (JSON), so no sidecar is needed
SAFETENSORS_KWARGS_KEY = "dino.model_kwargs"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _hf_folder_weights(folder: str) -> Path | None:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    return next((Path(folder) / name for name in HF_WEIGHT_FILES if (Path(folder) / name).is_file()), None)


def hf_config_kwargs(config_file: Path) -> dict[str, Any]:
    """Our model kwargs from a Hugging Face `Dinov2Config` / `Dinov2WithRegistersConfig` (config.json)."""
    try:
        config = json.loads(Path(config_file).read_text())
        embed_dim = int(config["hidden_size"])
        kwargs: dict[str, Any] = dict(
            embed_dim=embed_dim,
            depth=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            patch_size=int(config.get("patch_size", 14)),
            img_size=int(config.get("image_size", 518)),
            mlp_ratio=float(config.get("mlp_ratio", 4)),
            qkv_bias=bool(config.get("qkv_bias", True)),
            ffn_layer="swiglu" if config.get("use_swiglu_ffn") else "mlp",
            num_register_tokens=int(config.get("num_register_tokens", 0)),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{config_file}: not a readable Dinov2 config ({type(err).__name__}: {err})") from None
    # the named size with this width (its depth / heads are overridden by the explicit ones above)
    kwargs["arch"] = next((name for name, (dim, *_) in ARCH_SIZES.items() if dim == embed_dim), "vit_small")
    return kwargs


def load_safetensors_file(path: str) -> dict:
    """A `.safetensors` file as a checkpoint dict: ``{"backbone": tensors}``, plus ``"backbone_kwargs"`` when the
    file's metadata holds the model kwargs (our `save_backbone` writes them). Reads no pickle, so needs no flag."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:  # a declared dependency; only a broken environment lands here
        raise UserError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read {path}: not a valid safetensors file or truncated ({detail})") from None
    checkpoint: dict[str, Any] = {"backbone": tensors}
    if SAFETENSORS_KWARGS_KEY in metadata:
        try:
            checkpoint["backbone_kwargs"] = dict(json.loads(metadata[SAFETENSORS_KWARGS_KEY]))
        except (ValueError, TypeError):
            raise UserError(
                f"{path}: unreadable model kwargs in the file's metadata ({SAFETENSORS_KWARGS_KEY})"
            ) from None
    return checkpoint


def _is_zip_or_pickle(path: str) -> bool:
    """Whether a file starts like something torch.save writes: a zip archive, or a pickle (protocol ≥ 2)."""
    import zipfile

    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_sharded_network(directory: str, network: str = "teacher") -> dict:
    """One network (`teacher` or `student`) of a sharded DCP training checkpoint, as a plain state dict.

    Reads only that network's tensors (not the optimiser), in one process, whatever the number of ranks
    that wrote it — the offline "consolidate" step for FSDP checkpoints. Returns `{network: state_dict}`
    plus `backbone_kwargs` from the checkpoint's `meta.json` when present.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dino.distributed.checkpoint import load_sharded, read_metadata_safely

    # never DCP's own reader: it unpickles `.metadata` with plain pickle (code execution from a crafted folder)
    metadata = read_metadata_safely(directory).state_dict_metadata
    prefix = network + "."
    tensors = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not tensors:
        networks = sorted({key.split(".", 1)[0] for key in metadata})
        raise UserError(
            f"the sharded checkpoint {directory} holds no {network!r} weights (it holds: {', '.join(networks)})"
        )
    state = {network: tensors}
    with warnings.catch_warnings():  # reading in one process is the point here, not a mistake
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        load_sharded(state, directory, single_process=True)
    meta_file = Path(directory) / "meta.json"
    if meta_file.is_file():
        try:
            state["backbone_kwargs"] = dict(json.loads(meta_file.read_text()).get("backbone_kwargs") or {})
        except ValueError:
            pass
    return state


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_backbone_state_dict(checkpoint: dict, checkpoint_key: str | None = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's state dict, in the official key layout, from any checkpoint we know.

    Accepts plain backbone state dicts (official releases, our `teacher_backbone.pth`), full training
    checkpoints holding `teacher` / `student` (ours and DINO v1's), and `model` / `state_dict` wrappers.
    Strips `module.`, `_orig_mod.` and `backbone.` prefixes, drops head weights, and un-chunks
    `blocks.<chunk>.<i>.` keys (DINOv2 training checkpoints with block_chunks > 0) to `blocks.<i>.`.
    """
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint holds a {type(checkpoint).__name__}, expected a dict of tensors")
    state = checkpoint
    if not _is_tensor_dict(state):
        candidates = [checkpoint_key] if checkpoint_key else []
        candidates += ["teacher", "student", "model", "state_dict", "backbone"]
        for key in candidates:
            if key in checkpoint and isinstance(checkpoint[key], dict):
                state = checkpoint[key]
                break
        else:
            raise UserError(
                f"no backbone weights found in checkpoint; its top-level keys are {sorted(checkpoint)[:12]} "
                f"(expected a state dict or one of 'teacher', 'student', 'model', 'state_dict')"
            )
    if is_hf_state_dict(state):
        return from_hf_state_dict(state)
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if key.startswith(HEAD_PREFIXES):
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        cleaned[key] = value
    if not cleaned:
        raise UserError("the checkpoint holds no backbone tensors (only heads or non-tensor entries)")
    return cleaned


# Hugging Face `Dinov2Model` tensor names (the hub layout, see dino/inference/export/hf.py) → ours, per block
_HF_BLOCK_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
}
_HF_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def is_hf_state_dict(state: dict) -> bool:
    return any(str(key).split("dinov2.", 1)[-1] == "embeddings.cls_token" for key in state)


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` state dict (also under a `dinov2.` prefix, as in
    the classification models) in our official key layout: query/key/value fused back into qkv, LayerScale
    λ → ``ls*.gamma``. Heads (``classifier.*``) are dropped."""
    state = {
        key.split("dinov2.", 1)[-1] if key.startswith("dinov2.") else key: value
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    out = {ours: state[theirs] for theirs, ours in _HF_EMBEDDINGS.items() if theirs in state}
    layers = sorted({int(m.group(1)) for key in state if (m := re.match(r"encoder\.layer\.(\d+)\.", key))})
    for i in layers:
        theirs, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        attention = theirs + "attention.attention."
        try:
            out[ours + "attn.qkv.weight"] = torch.cat(
                [state[f"{attention}{n}.weight"] for n in ("query", "key", "value")]
            )
        except KeyError as err:
            raise UserError(f"Hugging Face checkpoint: block {i} lacks {err.args[0]!r}") from None
        if f"{attention}query.bias" in state:
            out[ours + "attn.qkv.bias"] = torch.cat([state[f"{attention}{n}.bias"] for n in ("query", "key", "value")])
        for their_name, our_name in _HF_BLOCK_NAMES.items():
            for suffix in (".weight", ".bias", ""):
                if theirs + their_name + suffix in state:
                    out[ours + our_name + suffix] = state[theirs + their_name + suffix]
    if "cls_token" not in out:
        raise UserError("Hugging Face checkpoint without embeddings.cls_token: not a DINOv2 backbone")
    return out


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the model kwargs (arch, patch size, registers, LayerScale, FFN, image size) from the tensors.

    A DINOv3 state dict (RoPE periods / storage tokens, or a ConvNeXt) gets `describe_dinov3_state_dict`'s answer
    (`kind` 'vit' | 'convnext', `name` of the release whose layout it has, `summary`, `model_kwargs`)."""
    if is_dinov3_state_dict(state_dict):
        return describe_dinov3_state_dict(state_dict)
    try:
        embed_dim = state_dict["cls_token"].shape[-1]
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        num_pos = state_dict["pos_embed"].shape[1] - 1
    except KeyError as err:
        raise UserError(f"not a ViT backbone checkpoint: key {err.args[0]!r} is missing") from None
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    arch = next((name for name, (dim, d, _, _) in ARCH_SIZES.items() if dim == embed_dim and d == depth), None)
    if arch is None:
        arch = next((name for name, (dim, _, _, _) in ARCH_SIZES.items() if dim == embed_dim), None)
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    side = int(round(num_pos**0.5))
    info = dict(
        arch=arch,
        embed_dim=embed_dim,
        depth=depth,
        patch_size=patch_size,
        img_size=side * patch_size,
        num_register_tokens=registers,
        init_values=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
        ffn_layer="swiglu" if "blocks.0.mlp.w12.weight" in state_dict else "mlp",
        use_mask_token="mask_token" in state_dict,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
    )
    # the official register models interpolate with offset 0 + antialias; everything else with offset 0.1
    info.update(interpolate_offset=0.0, interpolate_antialias=True) if registers else info.update(
        interpolate_offset=0.1, interpolate_antialias=False
    )
    return info


def _format_mismatch(missing: list[str], unexpected: list[str], info: dict, requested: dict) -> str:
    def short(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8} more)" if len(keys) > 8 else "")

    parts = ["checkpoint does not fit the model"]
    if missing:
        parts.append(f"missing keys: {short(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {short(unexpected)}")
    if info["arch"] is None:
        # a custom width (the demo's 96) matches no named size, and the head count is not in the tensors:
        # only the settings saved with the weights can rebuild it, so no --arch can be suggested
        parts.append(
            f"the checkpoint holds a ViT of a custom size (embed_dim {info['embed_dim']}, depth {info['depth']}, "
            f"patch size {info['patch_size']}) that no --arch names; its architecture is in the .json file written "
            "next to it (e.g. teacher_backbone.json beside teacher_backbone.pth): put that file back beside the weights"
        )
    else:
        parts.append(
            f"the checkpoint holds {info['arch']} (embed_dim {info['embed_dim']}, depth {info['depth']}), "
            f"patch size {info['patch_size']}, {info['num_register_tokens']} register tokens"
            f" — try --arch {info['arch']} --patch_size {info['patch_size']}"
            + (f" num_register_tokens={info['num_register_tokens']}" if info["num_register_tokens"] else "")
        )
    if requested:
        parts.append("requested " + ", ".join(f"{k}={v}" for k, v in requested.items()))
    return "; ".join(parts)


def _sidecar_kwargs(path: str | None) -> dict:
    """Model kwargs stored next to an exported backbone (`<file>.json`, written by our exporter)."""
    if not path or path.startswith(("http://", "https://")):
        return {}
    sidecar = Path(str(Path(path).with_suffix("")) + ".json")
    if sidecar.is_file():
        try:
            return dict(json.loads(sidecar.read_text()).get("model", {}))
        except (ValueError, AttributeError):
            return {}
    return {}


def _check_stored_kwargs(stored: dict) -> None:
    """Settings saved with a checkpoint (its backbone_kwargs, or the .json file beside it) must be ones the
    ViT takes: an unknown key is a one-line error naming it, not a TypeError from the constructor."""
    import inspect

    valid = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"} | {"arch", "patch_size"}
    unknown = sorted(set(stored) - valid)
    if unknown:
        from dino.errors import suggest

        raise UserError(
            f"the model settings saved with this checkpoint (backbone_kwargs, or its .json file) hold "
            f"unknown key(s) {', '.join(map(repr, unknown))}.{suggest(unknown[0], valid)} "
            "Remove or correct them"
        )


def build_backbone_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    requested: dict | None = None,
    stored_kwargs: dict | None = None,
    **model_kwargs,
) -> VisionTransformer:
    """Build the ViT the tensors describe and load them strictly.

    `requested`: what the user asked for (arch, patch_size, num_register_tokens); a disagreement with the
    file is a UserError naming the right values. `stored_kwargs`: kwargs saved with the checkpoint (win over
    inference). `model_kwargs`: runtime options (drop_path_rate, attn_backend, …).
    """
    requested = {k: v for k, v in (requested or {}).items() if v is not None}
    if is_dinov3_state_dict(state_dict):
        return _build_dinov3_from_state_dict(state_dict, requested, stored_kwargs, **model_kwargs)
    info = describe_state_dict(state_dict)
    for key in ("arch", "patch_size", "num_register_tokens"):
        if key in requested and info.get(key) is not None and requested[key] != info[key]:
            raise UserError(_format_mismatch([], [], info, requested))
    kwargs = {
        k: info[k]
        for k in (
            "depth",
            "img_size",
            "num_register_tokens",
            "init_values",
            "ffn_layer",
            "use_mask_token",
            "qkv_bias",
            "interpolate_offset",
            "interpolate_antialias",
        )
    }
    kwargs.update(stored_kwargs or {})
    kwargs.update(model_kwargs)
    arch = kwargs.pop("arch", None) or info["arch"]
    patch_size = kwargs.pop("patch_size", None) or info["patch_size"]
    if arch is None:
        raise UserError(_format_mismatch([], [], info, requested))
    _check_stored_kwargs(stored_kwargs or {})
    model = build_backbone(arch, patch_size, **kwargs)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(_format_mismatch(list(result.missing_keys), list(result.unexpected_keys), info, requested))
    return model


# --- DINOv3 --------------------------------------------------------------------------------------
def what_file_holds(state_dict: dict[str, torch.Tensor]) -> str:
    """One line saying which model a backbone state dict is (generation, size, patch, extra tokens)."""
    if is_dinov3_state_dict(state_dict):
        return describe_dinov3_state_dict(state_dict)["summary"]
    try:
        info = describe_state_dict(state_dict)
    except UserError:
        return f"no known backbone (first keys: {', '.join(sorted(state_dict)[:6])})"
    generation = "DINOv2" if info["init_values"] else "DINO v1"
    name = official_name(info["arch"], info["patch_size"], info["num_register_tokens"]) if info["arch"] else None
    return (
        f"a {generation} ViT {info['arch'] or '(unknown size)'} (embed_dim {info['embed_dim']}, depth {info['depth']}), "
        f"patch {info['patch_size']}, {info['num_register_tokens']} register tokens"
        + (f", the layout of {name}" if name else "")
    )


def _assign_strictly(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: str, expected: str) -> None:
    """Load `state_dict` into `model` (built on the meta device) strictly, assigning the tensors (no second copy:
    a 7B file is not duplicated in memory), cast to the model's dtypes as a copy would. A file that does not fit
    is a UserError naming its missing / unexpected / mis-shaped keys and what it holds instead."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def short(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" … (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = [f"{where} does not fit {expected}: it holds {what_file_holds(state_dict)}"]
        parts += [
            f"{label}: {short(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise UserError("; ".join(parts) + _hub_remedy(state_dict))
    cast = {
        k: v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v
        for k, v in state_dict.items()
    }
    model.load_state_dict(cast, strict=True, assign=True)


def _build_dinov3_from_state_dict(
    state_dict: dict[str, torch.Tensor], requested: dict, stored_kwargs: dict | None, **model_kwargs
) -> torch.nn.Module:
    info = describe_dinov3_state_dict(state_dict)
    wrong = {
        k: v
        for k, v in requested.items()
        if (k == "patch_size" and v != info["patch_size"])
        or (k == "num_register_tokens" and v != info["num_register_tokens"])
        or (k == "arch" and v not in (info["arch"], info["name"]))
    }
    if wrong:
        raise UserError(
            f"the checkpoint holds {info['summary']}; requested "
            + ", ".join(f"{k}={v}" for k, v in wrong.items())
            + " — leave these out, they are read from the file"
        )
    model = build_dinov3_for_state_dict(state_dict, stored_kwargs, **model_kwargs)
    _assign_strictly(model, state_dict, "checkpoint", info["name"] or info["summary"])
    return model


def _read_dinov3_file(source: str, check_hash: bool = False) -> dict:
    if check_hash and source.startswith(("http://", "https://")):
        # torch.hub checks the hash prefix in the file name (the official `check_hash`)
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True, check_hash=True)
    return load_checkpoint_file(source)


def load_dinov3(
    name: str, pretrained: bool = True, weights: Any = None, check_hash: bool = False, **kwargs
) -> torch.nn.Module:
    """A DINOv3 release (`DINOV3_RELEASES`), as the official hub builds it, loaded strictly.

    weights: None or 'LVD1689M' / 'SAT493M' (the official files, also the official `Weights` enum), or a local
        path or URL of a state dict in the official layout (the SAT ViT-L and the 7B carry `local_cls_norm`;
        the model follows the file). pretrained=False: the official random initialisation, nothing read.
    device: with pretrained=False, where to build ('meta': shapes only, no memory — how the 7B is inspected);
        with weights, where the loaded model goes.
    Other kwargs override the release settings (drop_path_rate, attn_backend, …).
    """
    if name not in DINOV3_RELEASES:
        from dino.errors import suggest

        raise UserError(f"unknown DINOv3 model {name!r}." + suggest(name, DINOV3_RELEASES))
    weights = getattr(weights, "value", weights)  # the official hub's Weights enum
    variant = weights if weights in DINOV3_WEIGHTS else "LVD1689M"
    device = kwargs.pop("device", None)
    source = None
    if weights is not None and weights not in DINOV3_WEIGHTS:
        source = str(weights)
    elif pretrained:
        try:
            source = dinov3_url(name, variant)
        except ValueError as err:
            raise UserError(str(err)) from None
    if source is None:
        with torch.device(device or "cpu"):
            model = build_dinov3(name, variant, **kwargs)
            if hasattr(model, "stages") and not str(device).startswith("meta"):
                model.init_weights()  # the ConvNeXt's official init (the ViT initialises itself)
        return model
    state_dict = extract_backbone_state_dict(_read_dinov3_file(source, check_hash), "teacher")
    if DINOV3_RELEASES[name][0] == "vit":
        kwargs.setdefault("untie_global_and_local_cls_norm", "local_cls_norm.weight" in state_dict)
    with torch.device("meta"):
        model = build_dinov3(name, variant, **kwargs)
    _assign_strictly(model, state_dict, source, name)
    return model.to(device) if device is not None else model


def _dinov3_entry_point(name: str):
    def entry(*, pretrained: bool = True, weights: Any = None, check_hash: bool = False, **kwargs) -> torch.nn.Module:
        return load_dinov3(name, pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)

    entry.__name__ = name
    entry.__doc__ = (
        f"Official {name} backbone; pretrained=True downloads {dinov3_url(name)}; weights= takes "
        f"'LVD1689M' / 'SAT493M' (where released), a path or a URL. See `load_dinov3`."
    )
    return entry


def load_backbone(
    pretrained_weights: str,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str | None = "teacher",
    num_register_tokens: int | None = None,
    allow_pickle: bool = False,
    **model_kwargs,
) -> VisionTransformer:
    """Load any DINO / DINOv2 backbone file (ours or official) strictly; returns the model in eval mode on CPU.

    `arch`, `patch_size` and `num_register_tokens` are checked against the file when given (None: read
    from the file). `pretrained_weights` may also be an official hub name such as 'dinov2_vits14'.
    """
    if pretrained_weights in OFFICIAL_MODELS:
        return load_official(pretrained_weights, pretrained=True, **model_kwargs).eval()
    if pretrained_weights in DINOV3_RELEASES:
        return load_dinov3(pretrained_weights, pretrained=True, **model_kwargs).eval()
    network = checkpoint_key if checkpoint_key in ("teacher", "student") else "teacher"
    checkpoint = load_checkpoint_file(pretrained_weights, allow_pickle=allow_pickle, network=network)
    state_dict = extract_backbone_state_dict(checkpoint, checkpoint_key)
    stored = dict(checkpoint.get("backbone_kwargs", {})) if isinstance(checkpoint.get("backbone_kwargs"), dict) else {}
    stored = stored or _sidecar_kwargs(pretrained_weights)
    requested = dict(arch=arch, patch_size=patch_size, num_register_tokens=num_register_tokens)
    model = build_backbone_from_state_dict(state_dict, requested, stored, **model_kwargs)
    return model.eval()


def official_name(arch: str, patch_size: int, num_register_tokens: int = 0) -> str | None:
    """The official release matching an arch / patch size, e.g. ('vit_small', 14) → 'dinov2_vits14'."""
    for name, (_, kwargs) in OFFICIAL_MODELS.items():
        if (
            kwargs["arch"] == arch
            and kwargs["patch_size"] == patch_size
            and kwargs.get("num_register_tokens", 0) == num_register_tokens
        ):
            return name
    return None


def load_official(
    name: str, pretrained: bool = True, weights: str | None = None, allow_pickle: bool = False, **kwargs
) -> VisionTransformer:
    """Build an official model; `pretrained` downloads its released weights, `weights` takes a path or URL instead
    (`allow_pickle=True` for a trusted file that needs pickle)."""
    if name in DINOV3_RELEASES:
        return load_dinov3(name, pretrained=pretrained, weights=weights, **kwargs)
    if name not in OFFICIAL_MODELS:
        from dino.errors import suggest

        raise UserError(f"unknown official model {name!r}." + suggest(name, OFFICIAL_MODELS))
    url, model_kwargs = OFFICIAL_MODELS[name]
    model_kwargs = dict(model_kwargs)
    arch = model_kwargs.pop("arch")
    patch_size = model_kwargs.pop("patch_size")
    model_kwargs.update(kwargs)
    model = build_backbone(arch, patch_size, **model_kwargs)
    if pretrained or weights:
        source = weights or url
        checkpoint = load_checkpoint_file(source, allow_pickle=allow_pickle)
        state_dict = extract_backbone_state_dict(checkpoint, "teacher")
        expected = model.state_dict()
        wrong_shape = [k for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if wrong_shape or set(state_dict) != set(expected):
            # through torch.hub there are no --arch flags to suggest: name the entry point that fits the file
            raise UserError(
                f"{source} does not fit {name}: the file holds {what_file_holds(state_dict)}" + _hub_remedy(state_dict)
            )
        model.load_state_dict(state_dict, strict=True)
    return model


def _hub_remedy(state_dict: dict[str, torch.Tensor]) -> str:
    if is_dinov3_state_dict(state_dict):
        name = describe_dinov3_state_dict(state_dict)["name"]
        if name:
            return f"; load it with the {name!r} entry point (weights=<the file>)"
        return "; load it with dino.hub.load_backbone(path), which reads the architecture from the file"
    try:
        info = describe_state_dict(state_dict)
    except UserError:
        return "; load it with dino.hub.load_backbone(path), which reads the architecture from the file"
    fitting = official_name(info["arch"], info["patch_size"], info["num_register_tokens"]) if info["arch"] else None
    if fitting and ARCH_SIZES[info["arch"]][1] == info["depth"]:  # a cut-down depth fits no release
        return f"; load it with the {fitting!r} entry point (pretrained=False, weights=<the file>)"
    return "; load it with dino.hub.load_backbone(path), which reads the architecture from the file"


def _entry_point(name: str):
    def entry(
        pretrained: bool = True, weights: str | None = None, allow_pickle: bool = False, **kwargs
    ) -> VisionTransformer:
        return load_official(name, pretrained=pretrained, weights=weights, allow_pickle=allow_pickle, **kwargs)

    entry.__name__ = name
    entry.__doc__ = f"Official {name} backbone; pretrained=True downloads {OFFICIAL_MODELS[name][0]}."
    return entry


dinov2_vits14 = _entry_point("dinov2_vits14")
dinov2_vitb14 = _entry_point("dinov2_vitb14")
dinov2_vitl14 = _entry_point("dinov2_vitl14")
dinov2_vitg14 = _entry_point("dinov2_vitg14")
dinov2_vits14_reg = _entry_point("dinov2_vits14_reg")
dinov2_vitb14_reg = _entry_point("dinov2_vitb14_reg")
dinov2_vitl14_reg = _entry_point("dinov2_vitl14_reg")
dinov2_vitg14_reg = _entry_point("dinov2_vitg14_reg")
dino_vits16 = _entry_point("dino_vits16")
dino_vits8 = _entry_point("dino_vits8")
dino_vitb16 = _entry_point("dino_vitb16")
dino_vitb8 = _entry_point("dino_vitb8")
dinov3_vits16 = _dinov3_entry_point("dinov3_vits16")
dinov3_vits16plus = _dinov3_entry_point("dinov3_vits16plus")
dinov3_vitb16 = _dinov3_entry_point("dinov3_vitb16")
dinov3_vitl16 = _dinov3_entry_point("dinov3_vitl16")
dinov3_vitl16plus = _dinov3_entry_point("dinov3_vitl16plus")
dinov3_vith16plus = _dinov3_entry_point("dinov3_vith16plus")
dinov3_vit7b16 = _dinov3_entry_point("dinov3_vit7b16")
dinov3_convnext_tiny = _dinov3_entry_point("dinov3_convnext_tiny")
dinov3_convnext_small = _dinov3_entry_point("dinov3_convnext_small")
dinov3_convnext_base = _dinov3_entry_point("dinov3_convnext_base")
dinov3_convnext_large = _dinov3_entry_point("dinov3_convnext_large")


def save_backbone(
    model: VisionTransformer, path: str | os.PathLike, model_kwargs: dict | None = None, safetensors_copy: bool = False
) -> None:
    """Write a backbone in the official key layout, atomically, in the format the suffix names.

    * ``.safetensors``: the tensors, with `model_kwargs` (the architecture) as JSON in the file's metadata —
      one self-describing file that `load_backbone` builds the model from, no pickle involved.
    * anything else (``.pth``): a plain state dict (what the official scripts and `torch.load` read) plus
      ``<file>.json`` with `model_kwargs`; with `safetensors_copy` also ``<file>.safetensors`` (the training
      loop asks for it: a run leaves `teacher_backbone.pth` for the DINO tooling and `teacher_backbone.safetensors`).
    """
    from dino.io import atomic_torch_save, atomic_write_json

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        _write_safetensors(tensors, path, model_kwargs)
        return
    atomic_torch_save(tensors, path)
    if model_kwargs is not None:
        atomic_write_json(Path(str(path.with_suffix("")) + ".json"), {"model": model_kwargs})
    if safetensors_copy:
        _write_safetensors(tensors, path.with_suffix(".safetensors"), model_kwargs)


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, model_kwargs: dict | None) -> None:
    from safetensors.torch import save_file

    from dino.io import atomic_output_path

    metadata = {"format": "pt"}
    if model_kwargs is not None:
        metadata[SAFETENSORS_KWARGS_KEY] = json.dumps(model_kwargs)
    with atomic_output_path(path, needed_bytes=sum(t.numel() * t.element_size() for t in tensors.values())) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def resolve_backbone(
    pretrained_weights: str | None,
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str | None = "teacher",
    num_register_tokens: int | None = None,
    allow_pickle: bool = False,
    **model_kwargs,
) -> VisionTransformer:
    """What the eval and visualisation scripts call: a file/URL/hub name, or (when empty) the official
    release for `arch` + `patch_size` (downloaded, as the original DINO scripts do)."""
    if pretrained_weights:
        return load_backbone(
            pretrained_weights,
            arch,
            patch_size,
            checkpoint_key,
            num_register_tokens,
            allow_pickle=allow_pickle,
            **model_kwargs,
        )
    if arch in DINOV3_RELEASES:  # --arch dinov3_vits16: the release itself
        logger.info(f"no --pretrained_weights given: using the official {arch} weights ({dinov3_url(arch)})")
        return load_dinov3(arch, pretrained=True, **model_kwargs).eval()
    name = official_name(arch or "vit_small", patch_size or 16, num_register_tokens or 0)
    if name is None:
        raise UserError(
            f"no --pretrained_weights given and there is no official release for {arch} patch {patch_size}; "
            f"pass --pretrained_weights PATH (official: {', '.join(OFFICIAL_MODELS)})"
        )
    logger.info(f"no --pretrained_weights given: using the official {name} weights ({OFFICIAL_MODELS[name][0]})")
    return load_official(name, pretrained=True, **model_kwargs).eval()
