"""Axial 2-D rotary position embedding (RoPE) of the DINOv3 ViTs.

What the released DINOv3 models compute (facebookresearch/dinov3, `layers/rope_position_encoding.py` and
`layers/attention.py`), written from those equations:

- `head_dim / 4` periods per axis, period_i = base^(i / (head_dim / 4)), base 100; kept in the persistent fp32
  buffer `periods` (it is in the official state dicts, so it loads strictly and is never recomputed from `base`);
- patch centres normalised per axis to [-1, 1]: y = 2(i + 0.5)/H - 1, x = 2(j + 0.5)/W - 1 ("separate"; "max" and
  "min" divide both axes by the longer / shorter side instead);
- angle = 2π · coord / period; a token's head_dim/2 angles are [y-angles, x-angles], tiled twice over the head;
- "rotate half": q·cos + cat(-q₂, q₁)·sin over the two halves of the head (not adjacent pairs);
- only in training (`rescale_coords`), one log-uniform factor in [1/r, r] multiplies both coordinate axes per call;
- tables and the rotation in the table dtype (fp32 for the releases), the result cast back to q/k's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NORMALIZE_COORDS = ("separate", "max", "min")


class RopePositionEmbedding(nn.Module):
    """(sin, cos) tables of shape (H·W, head_dim) for an H×W patch grid, rows before columns."""

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float = 100.0,
        normalize_coords: str = "separate",
        rescale_coords: float | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"RoPE needs embed_dim divisible by 4·num_heads, got {embed_dim} and {num_heads} heads")
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"normalize_coords must be one of {NORMALIZE_COORDS}, got {normalize_coords!r}")
        self.head_dim = embed_dim // num_heads
        self.base = float(base)
        self.normalize_coords = normalize_coords
        self.rescale_coords = rescale_coords
        self.dtype = (
            dtype  # the table dtype is a setting, not periods.dtype (a .half() of the model must not change it)
        )
        # persistent: the official checkpoints carry it, and the EMA teacher is initialised from the student's state dict
        self.register_buffer("periods", torch.empty(self.head_dim // 4, dtype=dtype), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the official expression, in the table dtype, so a fresh model has the bits a released file holds
        quarter = self.head_dim // 4
        exponents = 2 * torch.arange(quarter, dtype=self.dtype, device=self.periods.device) / (self.head_dim // 2)
        with torch.no_grad():
            self.periods.copy_(self.base**exponents)

    def coordinates(self, H: int, W: int) -> Tensor:
        """Patch-centre coordinates (H·W, 2) as [y, x], in [-1, 1] before any training-time rescale."""
        kw = dict(device=self.periods.device, dtype=self.dtype)
        if self.normalize_coords == "separate":
            div_h, div_w = H, W
        elif self.normalize_coords == "max":
            div_h = div_w = max(H, W)
        else:
            div_h = div_w = min(H, W)
        ys = torch.arange(0.5, H, **kw) / div_h
        xs = torch.arange(0.5, W, **kw) / div_w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training and self.rescale_coords is not None:
            # one factor for both axes (the official `rescale_coords`, on in every release), log-uniform in [1/r, r]
            log_r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **kw).uniform_(-log_r, log_r).exp()
        return coords

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        coords = self.coordinates(H, W)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.to(self.dtype)[None, None, :]  # (HW, 2, hd/4)
        angles = angles.flatten(1, 2).tile(2)  # (HW, hd): [y-angles, x-angles, y-angles, x-angles]
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Rotate the last H·W tokens of q and k (B, heads, N, head_dim); the leading N - H·W tokens (CLS, storage) stay.

    Computed in the tables' dtype (fp32 for the releases) and cast back, as the official attention does.
    """
    sin, cos = rope
    prefix = q.shape[-2] - sin.shape[-2]
    if prefix < 0:
        raise ValueError(f"RoPE tables for {sin.shape[-2]} patches but only {q.shape[-2]} tokens")

    def rotate(t: Tensor) -> Tensor:
        patches = t[..., prefix:, :].to(sin.dtype)
        patches = patches * cos + rotate_half(patches) * sin
        return torch.cat((t[..., :prefix, :], patches.to(t.dtype)), dim=-2)

    return rotate(q), rotate(k)
