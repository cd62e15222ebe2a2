"""One Vision Transformer family for both DINO generations.

DINO v1 (Caron et al., 2021) and DINOv2 (Oquab et al., 2023; registers: Darcet et al., 2024) use the same
pre-norm ViT; they differ in a few switches, all explicit keyword arguments here:

- LayerScale (`init_values`, v2) or none (v1);
- MLP or SwiGLU feed-forward (`ffn_layer`, v2 giant);
- stochastic depth increasing with depth (v1) or uniform (`drop_path_uniform`, v2);
- register tokens (`num_register_tokens`), inserted after the [CLS] token and given no position embedding;
- a learnable mask token replacing masked patch embeddings (`use_mask_token`, needed for iBOT);
- position-embedding interpolation (`interpolate_offset`, `interpolate_antialias`).

Parameter names follow the official hub layout (`cls_token`, `pos_embed`, `register_tokens`, `mask_token`,
`patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`,
`norm`), so the official checkpoints load strictly.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional: xFormers' memory-efficient attention (CUDA only)
    from xformers.ops import memory_efficient_attention as _xformers_attention
except ImportError:  # pragma: no cover - depends on the environment
    _xformers_attention = None

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "explicit")


def xformers_available() -> bool:
    return _xformers_attention is not None


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) → patch embeddings (B, H/p · W/p, D) with a conv of kernel = stride = p."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, softmax(q kᵀ / √d_head) v.

    `backend`: 'sdpa' (torch's fused kernels), 'xformers' (memory-efficient, CUDA), 'explicit' (plain
    matmuls, the only one that can return the attention matrix) or 'auto' (xformers when installed and the
    input lives on CUDA, else sdpa).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.backend = backend

    def _split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.unbind(2)  # each (B, N, heads, head_dim)
        return q, k, v

    def attention_map(self, x: Tensor) -> Tensor:
        """The softmax attention matrix (B, heads, N, N), computed in fp32."""
        q, k, _ = self._split_heads(x)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        B, N, C = x.shape
        q, k, v = self._split_heads(x)
        backend = self.backend
        if backend == "auto":
            backend = "xformers" if (_xformers_attention is not None and x.is_cuda) else "sdpa"
        if return_attention:
            backend = "explicit"
        attn = None
        if backend == "xformers":
            if _xformers_attention is None:
                raise RuntimeError("attention backend 'xformers' requested but xformers is not installed")
            out = _xformers_attention(q, k, v)  # takes and returns (B, N, heads, head_dim)
        elif backend == "sdpa":
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        elif backend == "explicit":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = (attn @ v).transpose(1, 2)
        else:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")
        out = self.proj(out.reshape(B, N, C))
        return (out, attn) if return_attention else out


class _GeluLinear(torch.autograd.Function):
    """y = GELU(h) Wᵀ + b, keeping h but not GELU(h) for the backward pass, which recomputes it.

    Autograd of `fc2(GELU(h))` keeps both h (for GELU's derivative) and GELU(h) (for fc2's weight gradient):
    two tensors of the MLP's hidden width (4× the model width) per block. Recomputing GELU(h) — one cheap
    elementwise pass — halves that, the largest activation memory of a ViT training step.
    Dtypes follow autocast: the output and the backward products are in h's dtype, gradients of the weight
    and bias in theirs.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(hidden, weight, bias)
        return F.linear(F.gelu(hidden), weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias = ctx.saved_tensors
        grad_out = grad_out.to(hidden.dtype)
        with torch.enable_grad():  # GELU's derivative through autograd: exactly what eager autograd computes
            detached = hidden.detach().requires_grad_()
            activated = F.gelu(detached)
        grad_weight = (grad_out.flatten(0, -2).t() @ activated.detach().flatten(0, -2)).to(weight.dtype)
        grad_bias = None if bias is None else grad_out.flatten(0, -2).sum(0).to(bias.dtype)
        grad_activated = grad_out @ weight.to(hidden.dtype)
        (grad_hidden,) = torch.autograd.grad(activated, detached, grad_activated)
        return grad_hidden, grad_weight, grad_bias


class Mlp(nn.Module):
    """Two-layer feed-forward: fc2(GELU(fc1(x))), exact (erf) GELU.

    When gradients flow, GELU(fc1(x)) is recomputed in the backward pass instead of kept (`_GeluLinear`).
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.fc1(x)
        # (a quantised or otherwise swapped fc2 — torch.ao, inference copies — takes the plain path)
        if torch.is_grad_enabled() and hidden.requires_grad and type(self.fc2) is nn.Linear:
            return _GeluLinear.apply(hidden, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(hidden))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020): w3(SiLU(x W1) ⊙ x W2), W1 and W2 fused in `w12`.

    The hidden width is 2/3 of the MLP width rounded up to a multiple of 8, as in DINOv2's ViT-g.
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel residual scaling x·γ (Touvron et al., 2021, "Going deeper with image transformers")."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop a sample's residual branch with probability p, rescale by 1/(1−p)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_bias: bool = True,
                 ffn_bias: bool = True, drop_path: float = 0.0, init_values: float | None = None,
                 ffn_layer: str = "mlp", attn_backend: str = "auto"):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLUFFN(dim, hidden, bias=ffn_bias) if ffn_layer in ("swiglu", "swiglufused") else Mlp(dim, hidden, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    """ViT backbone with the official DINO / DINOv2 hub API.

    Args:
        img_size: the size the position embedding is stored for (224 for v1, 518 for the v2 hub models).
        patch_size: 8, 14 or 16 (any positive int works).
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        init_values: LayerScale init (None: no LayerScale, as in DINO v1).
        ffn_layer: 'mlp' or 'swiglu'.
        drop_path_rate: stochastic depth; uniform over blocks if `drop_path_uniform`, else linear in depth.
        num_register_tokens: extra learnable tokens after [CLS] (Darcet et al., "Vision Transformers Need Registers").
        use_mask_token: create the learnable `mask_token` used to replace masked patches (iBOT / DINOv2).
        interpolate_offset, interpolate_antialias: position-embedding interpolation, see `interpolate_pos_encoding`.
        attn_backend: 'auto' | 'sdpa' | 'xformers' | 'explicit'.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_bias: bool = True,
                 ffn_bias: bool = True, init_values: float | None = None, ffn_layer: str = "mlp",
                 drop_path_rate: float = 0.0, drop_path_uniform: bool = False, num_register_tokens: int = 0,
                 use_mask_token: bool = True, interpolate_offset: float = 0.1, interpolate_antialias: bool = False,
                 attn_backend: str = "auto"):
        super().__init__()
        if attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose from {ATTENTION_BACKENDS}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        num_patches = (img_size // patch_size) ** 2

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, rates[i], init_values, ffn_layer, attn_backend)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    # --- initialisation ------------------------------------------------------------------------
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init_values)

    def set_attn_backend(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")
        for block in self.blocks:
            block.attn.backend = backend

    # --- tokens --------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, num_tokens: int, height: int, width: int) -> Tensor:
        """Position embedding for an input of `height`×`width` pixels, as the official models compute it.

        The stored M×M grid is resized bicubically (align_corners False, in fp32) to (H/p, W/p).
        With `interpolate_offset` > 0 the resize is driven by the scale factor ((H/p + offset)/M, (W/p + offset)/M)
        — the offset guards against floor() rounding one row short (DINO v1 and the v2 hub models use 0.1);
        with offset 0 the target size is given directly (the v2 register models, with antialias).
        No interpolation happens when the grid already matches and the input is square.
        """
        num_patches = num_tokens - 1
        stored = self.pos_embed.shape[1] - 1
        if num_patches == stored and height == width:
            return self.pos_embed
        dtype = self.pos_embed.dtype
        pos_embed = self.pos_embed.float()
        class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        side = int(math.sqrt(stored))
        if side * side != stored:
            raise ValueError(f"pos_embed holds {stored} patches, not a square grid")
        h0, w0 = height // self.patch_size, width // self.patch_size
        grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((h0 + self.interpolate_offset) / side, (w0 + self.interpolate_offset) / side)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat((class_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Pixels → [CLS, registers…, patches…] tokens.

        Masked patch embeddings are replaced by `mask_token` before the position embedding is added; the
        registers are inserted after it, so they carry no position.
        """
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"input size {H}x{W} is not a multiple of the patch size {self.patch_size}; "
                f"resize or crop to e.g. {H // self.patch_size * self.patch_size}x{W // self.patch_size * self.patch_size}"
            )
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask_token (built with use_mask_token=False); it cannot take masks")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1], H, W)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x

    # --- forward -------------------------------------------------------------------------------
    def _split_output(self, x_prenorm: Tensor, masks: Tensor | None) -> dict:
        x_norm = self.norm(x_prenorm)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None):
        """Return the dict of normalised [CLS], register and patch tokens (a list of dicts for a list of inputs).

        A list input (crops of different resolutions) runs each resolution through the blocks separately.
        """
        if isinstance(x, (list, tuple)):
            masks_list = masks if isinstance(masks, (list, tuple)) else [masks] * len(x)
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks_list)]
        tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._split_output(tokens, masks)

    def forward(self, x: Tensor, masks: Tensor | None = None, is_training: bool = False):
        """The normalised [CLS] embedding (B, D); the full `forward_features` dict when `is_training`."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    def forward_head(self, features: dict) -> Tensor:
        return self.head(features["x_norm_clstoken"])

    def _block_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        total = len(self.blocks)
        wanted = set(range(total - n, total)) if isinstance(n, int) else set(int(i) for i in n)
        bad = [i for i in wanted if not 0 <= i < total]
        if bad:
            raise ValueError(f"block indices {sorted(bad)} out of range for a {total}-block model")
        outputs = []
        tokens = self.prepare_tokens_with_masks(x)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in wanted:
                outputs.append(tokens)
        return outputs

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """Outputs of some blocks (the DINOv2 hub API).

        n: an int takes the last n blocks, a list takes those block indices.
        Returns a tuple with one (B, N, D) patch-token tensor per block — (B, D, H/p, W/p) when `reshape` —
        or (patch_tokens, cls_token) pairs when `return_class_token`. CLS and registers are dropped from the
        patch tokens; `norm` applies the final LayerNorm.
        """
        outputs = self._block_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        first_patch = 1 + self.num_register_tokens
        class_tokens = [out[:, 0] for out in outputs]
        patch_tokens = [out[:, first_patch:] for out in outputs]
        if reshape:
            B, _, H, W = x.shape
            h, w = H // self.patch_size, W // self.patch_size
            patch_tokens = [out.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for out in patch_tokens]
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens))
        return tuple(patch_tokens)

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block (B, heads, tokens, tokens); tokens = CLS, registers, patches."""
        tokens = self.prepare_tokens_with_masks(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        return self.blocks[-1].attn.attention_map(self.blocks[-1].norm1(tokens))

    def get_selfattention(self, x: Tensor, block_index: int = -1) -> Tensor:
        """Softmax attention of any block (negative indices count from the end)."""
        index = block_index % len(self.blocks)
        tokens = self.prepare_tokens_with_masks(x)
        for block in self.blocks[:index]:
            tokens = block(tokens)
        return self.blocks[index].attn.attention_map(self.blocks[index].norm1(tokens))


# name → (embed_dim, depth, num_heads, ffn_layer)
ARCH_SIZES = {
    "vit_tiny": (192, 12, 3, "mlp"),
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}


def vision_transformer(arch: str = "vit_small", **kwargs) -> VisionTransformer:
    """Build a ViT of a named size; `kwargs` go to `VisionTransformer` (a `depth`/`embed_dim` there wins)."""
    embed_dim, depth, num_heads, ffn_layer = ARCH_SIZES[arch]
    params = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, ffn_layer=ffn_layer)
    params.update(kwargs)
    return VisionTransformer(**params)


vit_tiny = partial(vision_transformer, "vit_tiny")
vit_small = partial(vision_transformer, "vit_small")
vit_base = partial(vision_transformer, "vit_base")
vit_large = partial(vision_transformer, "vit_large")
vit_giant2 = partial(vision_transformer, "vit_giant2")
