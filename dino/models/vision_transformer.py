"""One Vision Transformer family for the three DINO generations.

DINO v1 (Caron et al., 2021), DINOv2 (Oquab et al., 2023; registers: Darcet et al., 2024) and DINOv3 (Siméoni et
al., 2025) use the same pre-norm block — x + ls1(attn(norm1 x)), x + ls2(ffn(norm2 x)) — built here once
(`Block`, `Attention`, `LayerScale`, `Mlp`) and shared. What differs between the generations, all of it injected
as explicit keyword arguments or kept in the two token-preparing subclasses of `ViTBackbone`:

| | v1 / v2 (`VisionTransformer`) | v3 (`DinoV3VisionTransformer`) |
|---|---|---|
| position | learned `pos_embed`, bicubically resized to the grid, added to [CLS + patches] | none stored: RoPE (`rope.py`) on q, k of the patch tokens only |
| extra tokens | `register_tokens` (v2 _reg), after the position embedding | 4 `storage_tokens` |
| token order | [CLS, registers, patches] | [CLS, storage, patches] |
| LayerNorm eps | 1e-6 | 1e-5 |
| qkv bias | plain | k third masked by the persistent buffer `attn.qkv.bias_mask` (`mask_k_bias`) |
| SwiGLU | fused `mlp.w12` (v2 giant) | separate `mlp.w1/w2/w3`, hidden rounded up to 8 or 64 |
| input size | must be a multiple of the patch size | floored to a multiple of 16 (the conv drops the rest) |
| final norms | `norm` | `norm`, optional untied `cls_norm` / `local_cls_norm` |
| output keys | `x_norm_regtokens` | `x_storage_tokens` |

The v1 / v2 switches within `VisionTransformer`:

- LayerScale (`init_values`, v2) or none (v1);
- MLP or SwiGLU feed-forward (`ffn_layer`, v2 giant);
- stochastic depth increasing with depth (v1) or uniform (`drop_path_uniform`, v2);
- register tokens (`num_register_tokens`), inserted after the [CLS] token and given no position embedding;
- a learnable mask token replacing masked patch embeddings (`use_mask_token`, needed for iBOT);
- position-embedding interpolation (`interpolate_offset`, `interpolate_antialias`).

Parameter names follow the official hub layouts (`cls_token`, `pos_embed`, `register_tokens`, `mask_token`,
`patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`,
`norm`; v3: `storage_tokens`, `rope_embed.periods`, `attn.qkv.bias_mask`, `mlp.w1/w2/w3`), so the official
checkpoints load strictly.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino.models.rope import RopePositionEmbedding, apply_rope

try:  # optional: xFormers' memory-efficient attention (CUDA only)
    from xformers.ops import memory_efficient_attention as _xformers_attention
except ImportError:  # pragma: no cover - depends on the environment
    _xformers_attention = None

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "explicit")


def xformers_available() -> bool:
    return _xformers_attention is not None


def split_tokens(tokens: Tensor, num_extra_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """([CLS] (B, D), extra tokens (B, R, D), patch tokens (B, N, D)) of a [CLS, extra…, patches…] sequence.

    The one place that knows the token order: the training ViTs, the inference copy and the evaluations use it.
    Extra tokens are the registers (v2) or storage tokens (v3); views, no copies.
    """
    first_patch = 1 + num_extra_tokens
    return tokens[:, 0], tokens[:, 1:first_patch], tokens[:, first_patch:]


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) → patch embeddings (B, H/p · W/p, D) with a conv of kernel = stride = p."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LinearKMaskedBias(nn.Linear):
    """The qkv projection of DINOv3: its bias times the persistent buffer `bias_mask` (1 on q and v, 0 on k).

    The releases store a k bias but never use it; the mask is in their state dicts, so it is a buffer here too.
    (Without RoPE a k bias would not matter — it adds one constant per query row before the softmax — but
    RoPE rotates it differently at every position, so it must really be masked.)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3:
            raise ValueError(f"a qkv projection has 3·dim outputs, got {out_features}")
        if bias:
            mask = torch.ones(out_features)
            mask[out_features // 3 : 2 * out_features // 3] = 0
            self.register_buffer("bias_mask", mask, persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


class Attention(nn.Module):
    """Multi-head self-attention, softmax(q kᵀ / √d_head) v, with optional RoPE on q and k (DINOv3).

    `backend`: 'sdpa' (torch's fused kernels), 'xformers' (memory-efficient, CUDA), 'explicit' (plain
    matmuls, the only one that can return the attention matrix) or 'auto' (xformers when installed and the
    input lives on CUDA, else sdpa).
    `qkv_layer`: the qkv projection's type (`nn.Linear`; DINOv3: `LinearKMaskedBias`).
    `rope` (forward): (sin, cos) tables of the last H·W tokens, see `dino.models.rope`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: str = "auto",
        qkv_layer: type[nn.Linear] = nn.Linear,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = qkv_layer(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.backend = backend

    def _split_heads(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.unbind(2)  # each (B, N, heads, head_dim)
        if rope is not None:
            # out of place: an in-place rotation of the fused projection (same values, same gradients) is exported
            # wrong by torch.onnx's TorchScript path, silently
            q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), rope)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k, v

    def attention_map(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The softmax attention matrix (B, heads, N, N), computed in fp32."""
        q, k, _ = self._split_heads(x, rope)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def forward(
        self, x: Tensor, return_attention: bool = False, rope: tuple[Tensor, Tensor] | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        B, N, C = x.shape
        q, k, v = self._split_heads(x, rope)
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
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
                1, 2
            )
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


class SwiGLUFFNSplit(nn.Module):
    """DINOv3's SwiGLU: w3(SiLU(w1 x) ⊙ w2 x) with separate `w1`, `w2`, `w3` (v2 fused w1/w2 into `w12`).

    Hidden width int(2/3 · hidden_features) rounded up to a multiple of `align_to` (8; 64 for the 7B).
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, align_to: int = 8):
        super().__init__()
        hidden = int(hidden_features * 2 / 3)
        hidden += -hidden % align_to
        self.w1 = nn.Linear(in_features, hidden, bias=bias)
        self.w2 = nn.Linear(in_features, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


# ffn_layer names → (in_features, hidden_features, bias) constructors
FFN_LAYERS = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFN,  # v2: fused w12
    "swiglufused": SwiGLUFFN,
    "swiglu_w123": SwiGLUFFNSplit,  # v3: separate w1/w2/w3
    "swiglu_w123_64": partial(SwiGLUFFNSplit, align_to=64),  # v3 7B
}


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


def drop_add_residual_subset(x: Tensor, branch: Callable[[Tensor], Tensor], drop_ratio: float) -> Tensor:
    """Stochastic depth by sample subset (DINOv2's `drop_add_residual_stochastic_depth`).

    x + branch(x) for a random subset of ⌊B·(1−p)⌋ samples (at least one), scaled by B / subset so the
    expectation is the un-dropped block's; the other samples pass unchanged and their branch is never computed,
    so a drop rate p saves the fraction p of the branch's FLOPs (mask-style drop path computes every sample
    and multiplies the dropped ones by zero).
    """
    batch = x.shape[0]
    kept = max(int(batch * (1.0 - drop_ratio)), 1)
    index = torch.randperm(batch, device=x.device)[:kept]
    out = branch(x[index])
    return torch.index_add(x.flatten(1), 0, index, out.flatten(1).to(x.dtype), alpha=batch / kept).view_as(x)


DROP_PATH_MODES = ("mask", "subset")


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x))).

    Injected layer types — what the generations differ in: `norm_layer` (a constructor taking the width; default
    LayerNorm eps 1e-6 as v1/v2, v3 passes eps 1e-5), `ffn_layer` (a name in `FFN_LAYERS` or a constructor
    (in_features, hidden_features, bias)), `qkv_layer` (`nn.Linear`, or v3's `LinearKMaskedBias`).
    `rope` (forward): rotary tables for the attention, None for v1/v2.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: str | Callable[..., nn.Module] = "mlp",
        attn_backend: str = "auto",
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
        qkv_layer: type[nn.Linear] = nn.Linear,
    ):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        ffn_cls = FFN_LAYERS[ffn_layer] if isinstance(ffn_layer, str) else ffn_layer
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, backend=attn_backend, qkv_layer=qkv_layer
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_cls(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.sample_drop_ratio = drop_path
        self.drop_path_mode = "mask"  # 'subset': dropped samples skip the branch (`drop_add_residual_subset`)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        def attention_branch(t: Tensor) -> Tensor:
            return self.ls1(self.attn(self.norm1(t)) if rope is None else self.attn(self.norm1(t), rope=rope))

        def ffn_branch(t: Tensor) -> Tensor:
            return self.ls2(self.mlp(self.norm2(t)))

        if self.training and self.sample_drop_ratio > 0 and self.drop_path_mode == "subset":
            x = drop_add_residual_subset(x, attention_branch, self.sample_drop_ratio)
            return drop_add_residual_subset(x, ffn_branch, self.sample_drop_ratio)
        x = x + self.drop_path(attention_branch(x))
        x = x + self.drop_path(ffn_branch(x))
        return x


class ViTBackbone(nn.Module):
    """What every generation shares: the blocks, the final norm, and the hub API built on them.

    Subclasses say how pixels become tokens (`prepare_tokens_with_masks`), which rotary tables the blocks get
    (`rope_tables`; None without RoPE) and how the final tokens are normalised and named (`_split_output`,
    `_norm_tokens`). Attributes they set: `patch_size`, `embed_dim`, `num_register_tokens` (tokens between
    [CLS] and the patches: registers or storage tokens), `blocks`, `norm`, `head`.
    """

    extra_tokens_key = "x_norm_regtokens"

    def set_attn_backend(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")
        for block in self.blocks:
            block.attn.backend = backend

    def set_drop_path_mode(self, mode: str) -> None:
        """'mask' (multiply dropped samples' branch by zero) or 'subset' (do not compute them; DINOv2's way)."""
        if mode not in DROP_PATH_MODES:
            raise ValueError(f"unknown drop path mode {mode!r}; choose from {DROP_PATH_MODES}")
        for block in self.blocks:
            block.drop_path_mode = mode

    # --- what the subclasses define -------------------------------------------------------------
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Pixels → tokens: each generation's own (an abstract method; v1/v2 and v3 define it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define how pixels become tokens")

    def rope_tables(self, h: int, w: int) -> tuple[Tensor, Tensor] | None:
        """(sin, cos) for an h×w patch grid, or None: v1/v2 have no rotary embedding."""
        return None

    def _norm_tokens(self, x: Tensor) -> Tensor:
        """The final norm over all tokens (what `get_intermediate_layers(norm=True)` applies)."""
        return self.norm(x)

    def _split_output(self, x_prenorm: Tensor, masks: Tensor | None, index: int = 0) -> dict:
        cls_token, extra_tokens, patch_tokens = split_tokens(self._norm_tokens(x_prenorm), self.num_register_tokens)
        return {
            "x_norm_clstoken": cls_token,
            self.extra_tokens_key: extra_tokens,
            "x_norm_patchtokens": patch_tokens,
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    # --- shared ----------------------------------------------------------------------------------
    def _grid(self, x: Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def _run_blocks(
        self, tokens: Tensor, grid: tuple[int, int], blocks: Sequence[nn.Module], wanted: set[int] | None = None
    ):
        """Tokens through `blocks`; with `wanted`, also the outputs of those block indices."""
        outputs, rope = [], None
        for i, block in enumerate(blocks):
            # in training the v3 tables carry a random coordinate rescale, drawn afresh for every block as the
            # official loop does; in eval they are the same for every block, so computed once
            if i == 0 or self.training:
                rope = self.rope_tables(*grid)
            tokens = block(tokens) if rope is None else block(tokens, rope=rope)
            if wanted is not None and i in wanted:
                outputs.append(tokens)
        return tokens, outputs

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None):
        """Return the dict of normalised [CLS], extra and patch tokens (a list of dicts for a list of inputs).

        A list input (crops of different resolutions) runs each resolution through the blocks separately.
        """
        if isinstance(x, (list, tuple)):
            masks_list = masks if isinstance(masks, (list, tuple)) else [masks] * len(x)
            return [self._forward_one(xi, mi, index) for index, (xi, mi) in enumerate(zip(x, masks_list))]
        return self._forward_one(x, masks)

    def _forward_one(self, x: Tensor, masks: Tensor | None, index: int = 0) -> dict:
        tokens = self.prepare_tokens_with_masks(x, masks)
        tokens, _ = self._run_blocks(tokens, self._grid(x), self.blocks)
        return self._split_output(tokens, masks, index)

    def forward(self, x: Tensor, masks: Tensor | None = None, is_training: bool = False):
        """The normalised [CLS] embedding (B, D); the full `forward_features` dict when `is_training`."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    def _block_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        total = len(self.blocks)
        wanted = set(range(total - n, total)) if isinstance(n, int) else set(int(i) for i in n)
        bad = [i for i in wanted if not 0 <= i < total]
        if bad:
            raise ValueError(f"block indices {sorted(bad)} out of range for a {total}-block model")
        tokens = self.prepare_tokens_with_masks(x)
        _, outputs = self._run_blocks(tokens, self._grid(x), self.blocks, wanted)
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
        """Outputs of some blocks (the DINOv2 / DINOv3 hub API).

        n: an int takes the last n blocks, a list takes those block indices.
        Returns a tuple with one (B, N, D) patch-token tensor per block — (B, D, H/p, W/p) when `reshape` —
        or tuples (patch_tokens, cls_token) with `return_class_token`, (patch_tokens, extra_tokens) with
        `return_extra_tokens`, (patch_tokens, cls_token, extra_tokens) with both. Extra tokens are the
        registers (v2) or storage tokens (v3). `norm` applies the final norm.
        (DINOv3's own signature is keyword-only after `x`; `n` etc. are also taken positionally here, as v2 did,
        so callers written for either generation work.)
        """
        outputs = self._block_outputs(x, n)
        if norm:
            outputs = [self._norm_tokens(out) for out in outputs]
        splits = [split_tokens(out, self.num_register_tokens) for out in outputs]
        class_tokens = [cls for cls, _, _ in splits]
        extra_tokens = [extra for _, extra, _ in splits]
        patch_tokens = [patches for _, _, patches in splits]
        if reshape:
            B = x.shape[0]
            h, w = self._grid(x)
            patch_tokens = [out.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for out in patch_tokens]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patch_tokens, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens))
        if return_extra_tokens:
            return tuple(zip(patch_tokens, extra_tokens))
        return tuple(patch_tokens)

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block (B, heads, tokens, tokens); tokens = CLS, registers/storage, patches."""
        grid = self._grid(x)
        tokens, _ = self._run_blocks(self.prepare_tokens_with_masks(x), grid, self.blocks[:-1])
        block = self.blocks[-1]
        return block.attn.attention_map(block.norm1(tokens), self.rope_tables(*grid))


class VisionTransformer(ViTBackbone):
    """The DINO v1 / DINOv2 ViT: learned absolute position embedding, optional registers; the official hub API.

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

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        num_register_tokens: int = 0,
        use_mask_token: bool = True,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        attn_backend: str = "auto",
    ):
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
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            # on the CPU whatever the default device: a model built under torch.device("meta") has no values to read
            rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                proj_bias,
                ffn_bias,
                rates[i],
                init_values,
                ffn_layer,
                attn_backend,
            )
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


class DinoV3VisionTransformer(ViTBackbone):
    """The DINOv3 ViT (facebookresearch/dinov3 `DinoVisionTransformer`), with the official hub API.

    Differences from `VisionTransformer` (see the table at the top of this module): RoPE on the patch tokens
    instead of a position embedding, `[CLS, storage tokens, patches]`, LayerNorm eps 1e-5 (`norm_eps`), the
    k-masked qkv bias, SwiGLU with separate w1/w2/w3, input sizes floored to the patch grid, optional untied
    `cls_norm` (CLS and storage tokens) and `local_cls_norm` (CLS and storage tokens of the second input of a
    list — the local crops — in training only; never used in eval).

    Args:
        img_size: nominal input size (only a default for callers; RoPE works at any size).
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: transformer size.
        ffn_layer: 'mlp', 'swiglu_w123' (hidden rounded to 8) or 'swiglu_w123_64' (7B), or a constructor.
        init_values: LayerScale init (1e-5 in the releases).
        drop_path_rate: stochastic depth, the same for every block.
        n_storage_tokens: learnable tokens after [CLS] (4 in the releases).
        mask_k_bias: multiply the qkv bias by the `bias_mask` buffer (zero on k).
        norm_eps: LayerNorm eps (1e-5 in the releases; the training config's plain LayerNorm is 1e-6).
        rope_base, rope_normalize_coords, rope_rescale_coords, rope_dtype: see `dino.models.rope`.
    """

    extra_tokens_key = "x_storage_tokens"

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str | Callable[..., nn.Module] = "mlp",
        init_values: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        n_storage_tokens: int = 4,
        mask_k_bias: bool = True,
        norm_eps: float = 1e-5,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        rope_base: float = 100.0,
        rope_normalize_coords: str = "separate",
        rope_rescale_coords: float | None = 2.0,
        rope_dtype: torch.dtype = torch.float32,
        attn_backend: str = "auto",
    ):
        super().__init__()
        if attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose from {ATTENTION_BACKENDS}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.depth = self.n_blocks = depth
        self.n_storage_tokens = self.num_register_tokens = n_storage_tokens
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim)) if n_storage_tokens else None
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads=num_heads,
            base=rope_base,
            normalize_coords=rope_normalize_coords,
            rescale_coords=rope_rescale_coords,
            dtype=rope_dtype,
        )
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                proj_bias,
                ffn_bias,
                drop_path_rate,
                init_values,
                ffn_layer,
                attn_backend,
                norm_layer=norm_layer,
                qkv_layer=LinearKMaskedBias if mask_k_bias else nn.Linear,
            )
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.cls_norm = norm_layer(embed_dim) if untie_cls_and_patch_norms else None
        self.local_cls_norm = norm_layer(embed_dim) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation (what `pretrained=False` gives)."""
        if self.cls_token.is_meta:
            return  # built on the meta device: there are no values to set
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.proj.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, LinearKMaskedBias) and module.bias is not None:
                    # also a buffer: set again, so a model built on meta and materialised with to_empty is right
                    third = module.out_features // 3
                    with torch.no_grad():
                        module.bias_mask.fill_(1.0)
                        module.bias_mask[third : 2 * third] = 0.0
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init_values)

    # --- what differs from v1/v2 ----------------------------------------------------------------
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Pixels → [CLS, storage…, patches…]; masked patch embeddings become `mask_token` first. No position
        is added: it enters the attention through RoPE. Sizes that are not multiples of the patch are floored."""
        B = x.shape[0]
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            # as the official code: mask_token takes part in every forward (value unchanged), so DDP sees it used
            cls_token = self.cls_token + 0 * self.mask_token
        parts = [cls_token.expand(B, -1, -1)]
        if self.storage_tokens is not None:
            parts.append(self.storage_tokens.expand(B, -1, -1))
        return torch.cat(parts + [x], dim=1)

    def rope_tables(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        return self.rope_embed(H=h, W=w)

    def _cls_norm(self, index: int = 0) -> nn.Module:
        if self.local_cls_norm is not None and self.training and index == 1:
            return self.local_cls_norm  # the local crops' [CLS] in training (second input of a list)
        return self.cls_norm if self.cls_norm is not None else self.norm

    def _norm_tokens(self, x: Tensor, index: int = 0) -> Tensor:
        first_patch = 1 + self.n_storage_tokens
        cls_norm = self._cls_norm(index)
        if cls_norm is self.norm:
            return self.norm(x)
        return torch.cat((cls_norm(x[:, :first_patch]), self.norm(x[:, first_patch:])), dim=1)

    def _split_output(self, x_prenorm: Tensor, masks: Tensor | None, index: int = 0) -> dict:
        cls_token, storage_tokens, patch_tokens = split_tokens(
            self._norm_tokens(x_prenorm, index), self.n_storage_tokens
        )
        return {
            "x_norm_clstoken": cls_token,
            "x_storage_tokens": storage_tokens,
            "x_norm_patchtokens": patch_tokens,
            "x_prenorm": x_prenorm,
            "masks": masks,
        }


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


# DINOv3 sizes: name → (embed_dim, depth, num_heads, mlp_ratio, ffn_layer, qkv_bias), as the official hub builds them
V3_ARCH_SIZES = {
    "vit_small": (384, 12, 6, 4.0, "mlp", True),
    "vit_small_plus": (384, 12, 6, 6.0, "swiglu_w123", True),
    "vit_base": (768, 12, 12, 4.0, "mlp", True),
    "vit_large": (1024, 24, 16, 4.0, "mlp", True),
    "vit_large_plus": (1024, 24, 16, 6.0, "swiglu_w123", True),
    "vit_huge_plus": (1280, 32, 20, 6.0, "swiglu_w123", True),
    "vit_7b": (4096, 40, 32, 3.0, "swiglu_w123_64", False),
}


def dinov3_vision_transformer(arch: str = "vit_small", **kwargs) -> DinoV3VisionTransformer:
    """Build a DINOv3 ViT of a named size (`V3_ARCH_SIZES`); `kwargs` go to `DinoV3VisionTransformer` and win."""
    embed_dim, depth, num_heads, mlp_ratio, ffn_layer, qkv_bias = V3_ARCH_SIZES[arch]
    params = dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        ffn_layer=ffn_layer,
        qkv_bias=qkv_bias,
    )
    params.update(kwargs)
    return DinoV3VisionTransformer(**params)
