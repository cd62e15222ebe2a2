"""The DINOv3 ConvNeXt students (Liu et al., 2022, "A ConvNet for the 2020s"; distilled from DINOv3 ViT-7B).

Written from the behaviour of facebookresearch/dinov3 `models/convnext.py` so the released files load strictly
and give the same outputs:

- stem: conv 4/4 then a channels-first LayerNorm; between stages: channels-first LayerNorm then conv 2/2;
- block: depthwise 7×7 conv → LayerNorm (channels last) → Linear 4× → exact GELU → Linear → ·gamma → + input;
- every LayerNorm eps 1e-6;
- [CLS] = global average pool of the last stage; the final LayerNorm runs over [pool, stride-32 tokens];
- the final norm is registered twice, as `norm` and as `norms.3` (`norms` = [Identity ×3, norm], used by
  `get_intermediate_layers`), so the official state dicts hold both `norm.*` and `norms.3.*`.

The hub API matches the ViTs: `forward_features` (dict with `x_norm_clstoken`, `x_storage_tokens` (empty),
`x_norm_patchtokens`, `x_prenorm`, `masks`), `forward` (normed [CLS]) and `get_intermediate_layers` over the four
stages. `patch_size` (the official "pseudo patch size") resamples the stage maps of `get_intermediate_layers` to
the grid of a ViT with that patch (bilinear, antialiased); None (the hub default) keeps them at their stride.
The attribute `patch_size` is the token stride that callers should crop to: the given value, else 32.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino.errors import UserError
from dino.models.vision_transformer import DropPath, split_tokens

# size → (depths, dims)
CONVNEXT_SIZES = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), as the official code computes it (biased variance)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """x + drop_path(gamma · pwconv2(GELU(pwconv1(LN(dwconv(x)))))), the MLP in channels-last layout."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale_init_value = layer_scale_init_value
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) if layer_scale_init_value > 0 else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


def _unalias_final_norm(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """`norms.3.*` in the state dict as copies of `norm.*`: both keys stay (the official layout), but not as one
    storage under two names, which serialisers such as safetensors refuse. Loading either name fills the one module."""
    for name in ("weight", "bias"):
        key = f"{prefix}norms.3.{name}"
        if key in state_dict and not isinstance(state_dict[key], nn.Parameter):  # keep_vars=True keeps the parameter
            state_dict[key] = state_dict[key].clone()


class ConvNeXt(nn.Module):
    """ConvNeXt backbone with the DINOv3 hub API (see the module docstring)."""

    def __init__(
        self,
        *,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        patch_size: int | None = None,
    ):
        super().__init__()
        depths, dims = list(depths), list(dims)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), ChannelsFirstLayerNorm(dims[0]))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: also when built on meta
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    *(ConvNeXtBlock(dims[i], rates[start + j], layer_scale_init_value) for j in range(depths[i]))
                )
            )
            start += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        # the same module a second time, as the official model registers it (its files carry `norms.3.*`)
        self.norms = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity(), self.norm])
        self.register_state_dict_post_hook(_unalias_final_norm)
        self.head = nn.Identity()
        self.embed_dim = self.num_features = dims[-1]
        self.embed_dims = dims
        self.depths = depths
        self.n_blocks = 4
        self.n_storage_tokens = self.num_register_tokens = 0
        self.resample_patch_size = patch_size
        self.patch_size = patch_size or 32

    def init_weights(self) -> None:
        """The official initialisation (truncated normal 0.02 for convs and linears, LayerScale at its init value)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, ChannelsFirstLayerNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ConvNeXtBlock) and module.gamma is not None:
                nn.init.constant_(module.gamma, module.layer_scale_init_value)

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None):
        """Dict of normed [CLS] (pooled) and stride-32 patch tokens; a list of dicts for a list of inputs.

        `masks` is passed through untouched (as the official ConvNeXt does: it has no mask token)."""
        if isinstance(x, (list, tuple)):
            masks_list = masks if isinstance(masks, (list, tuple)) else [masks] * len(x)
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks_list)]
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        pooled = x.mean((-2, -1))
        tokens = x.flatten(2).transpose(1, 2)
        cls_token, storage_tokens, patch_tokens = split_tokens(
            self.norm(torch.cat((pooled.unsqueeze(1), tokens), dim=1)), 0
        )
        return {
            "x_norm_clstoken": cls_token,
            "x_storage_tokens": storage_tokens,
            "x_norm_patchtokens": patch_tokens,
            "x_prenorm": tokens,  # the official model's x_prenorm: the last stage's tokens, without the pool
            "masks": masks,
        }

    def forward(self, x: Tensor, masks: Tensor | None = None, is_training: bool = False):
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    def _stage_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        h, w = x.shape[-2:]
        wanted = set(range(4 - n, 4)) if isinstance(n, int) else set(int(i) for i in n)
        bad = [i for i in wanted if not 0 <= i < 4]
        if bad:
            raise ValueError(f"stage indices {sorted(bad)} out of range for a 4-stage ConvNeXt")
        outputs = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = stage(down(x))
            if i in wanted:
                maps = x
                if self.resample_patch_size is not None:
                    size = (h // self.resample_patch_size, w // self.resample_patch_size)
                    maps = F.interpolate(x, size=size, mode="bilinear", antialias=True)
                outputs.append((x.mean((-2, -1)), maps))
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        *,
        return_extra_tokens: bool = False,
    ):
        """Per-stage (patch tokens (B, N, C) — (B, C, h, w) when `reshape` — [, pooled [CLS]]) as the official code.

        `norm` applies `norms[i]` to stage i: the final LayerNorm for the last stage, nothing for the others.
        `return_extra_tokens` adds an empty (B, 0, C) tensor (no storage tokens), for callers written for the ViTs.
        """
        outputs = self._stage_outputs(x, n)
        indices = list(range(4 - n, 4)) if isinstance(n, int) else [int(i) for i in n]
        indices = sorted(set(indices))
        results = []
        for (cls, maps), index in zip(outputs, indices):
            B, C, h, w = maps.shape
            tokens = maps.flatten(2).transpose(1, 2)
            if norm:
                cls, tokens = self.norms[index](cls), self.norms[index](tokens)
            patches = tokens.transpose(1, 2).reshape(B, C, h, w).contiguous() if reshape else tokens
            results.append((patches, cls, tokens.new_zeros(B, 0, C)))
        if return_class_token and return_extra_tokens:
            return tuple(results)
        if return_class_token:
            return tuple((p, c) for p, c, _ in results)
        if return_extra_tokens:
            return tuple((p, e) for p, _, e in results)
        return tuple(p for p, _, _ in results)

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        raise UserError(
            "a ConvNeXt has no self-attention to show; visualise its features with PCA instead (visualize_pca.py)"
        )


def convnext(size: str = "tiny", **kwargs) -> ConvNeXt:
    """A DINOv3 ConvNeXt of a named size (tiny, small, base, large); kwargs go to `ConvNeXt`."""
    depths, dims = CONVNEXT_SIZES[size]
    return ConvNeXt(depths=depths, dims=dims, **kwargs)
