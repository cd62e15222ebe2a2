"""A faster inference copy of a `VisionTransformer`, with the same outputs.

`optimize_for_inference(model, ...)` returns an `InferenceViT`: a frozen copy of the backbone whose forward
pass does less work per image than the training model but computes the same function:

- LayerScale is folded into the linear layer before it (`proj`, `fc2` / `w3`): (W x + b)·γ = (γ⊙W) x + γ⊙b,
  so each block does two fewer full-size elementwise passes over the tokens;
- the interpolated position embedding is computed once per input size and cached (the training model
  re-runs a bicubic resize of the 37×37 grid on every call at 224 px);
- residual additions are done in place, and attention always goes through PyTorch's
  `scaled_dot_product_attention`, which picks the fastest kernel that is exact for the device and dtype
  (flash attention on CPU and on CUDA in bf16/fp16, memory-efficient otherwise) — never the explicit
  softmax(q kᵀ) path that materialises the attention matrix;
- the patch embedding (a conv with kernel = stride = p) runs as one matrix product over unfolded patches;
- optional: bf16 weights (`dtype`), int8 dynamic quantisation of every Linear (`int8`, CPU), `torch.compile`.

The fp32 result equals the training model's up to float rounding (folding γ into the weights changes the
order of two multiplications); the tests hold it to 1e-4. int8 is lossy: `feature_cosine` measures the cost.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino.models.vision_transformer import Mlp, VisionTransformer

def _fold_layerscale(linear: nn.Linear, gamma: Tensor) -> None:
    """Scale the output rows of `linear` by γ, so linear(x)·γ needs no separate multiply."""
    with torch.no_grad():
        linear.weight.mul_(gamma.unsqueeze(1))
        if linear.bias is not None:
            linear.bias.mul_(gamma)


class InferenceBlock(nn.Module):
    """One transformer block with LayerScale folded away; forward(x) mutates and returns x (inference only)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.qkv, self.proj = block.attn.qkv, block.attn.proj
        self.num_heads = block.attn.num_heads
        self.mlp = block.mlp
        if hasattr(block.ls1, "gamma"):
            _fold_layerscale(self.proj, block.ls1.gamma)
        if hasattr(block.ls2, "gamma"):
            last = self.mlp.fc2 if isinstance(self.mlp, Mlp) else self.mlp.w3
            _fold_layerscale(last, block.ls2.gamma)

    def attention(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        # (B, N, 3, heads, hd) → three (B, heads, N, hd) views; SDPA takes strided inputs without a copy
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))  # not in place: x may be a view the caller still needs
        x += self.mlp(self.norm2(x))
        return x


class InferenceViT(nn.Module):
    """Inference-only copy of a `VisionTransformer`; same `forward_features` / `forward` results.

    Built by `optimize_for_inference`; the source model is not modified.
    """

    def __init__(self, model: VisionTransformer, matmul_patch_embed: bool = True):
        super().__init__()
        model = copy.deepcopy(model).eval().requires_grad_(False)
        self.patch_size = model.patch_size
        self.embed_dim = self.num_features = model.embed_dim
        self.num_register_tokens = model.num_register_tokens
        self.matmul_patch_embed = matmul_patch_embed
        self.source = model  # keeps the position-embedding interpolation and the output split of the original
        conv = model.patch_embed.proj
        # the conv weight (D, C, p, p) as a (C·p·p, D) matrix, in the order the unfolded patches use
        self.register_buffer("patch_weight", conv.weight.detach().flatten(1).t().contiguous(), persistent=False)
        self.register_buffer("patch_bias", conv.bias.detach().clone(), persistent=False)
        self.blocks = nn.ModuleList(InferenceBlock(block) for block in model.blocks)
        model.blocks = nn.ModuleList()  # the source keeps tokens and embeddings only; the blocks live here
        self.norm = model.norm
        self._pos_cache: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}

    def _position_embedding(self, num_tokens: int, height: int, width: int, like: Tensor) -> Tensor:
        key = (height, width, like.dtype, like.device)
        cached = self._pos_cache.get(key)
        if cached is None:
            with torch.no_grad():
                pos = self.source.interpolate_pos_encoding(num_tokens, height, width)
                # the [CLS] row gets cls_token folded in, so preparing tokens is one concat and one add
                pos = pos.clone()
                pos[:, :1] += self.source.cls_token
                cached = pos.to(like.dtype).contiguous()
            self._pos_cache[key] = cached
        return cached

    def patch_embed(self, x: Tensor) -> Tensor:
        if not self.matmul_patch_embed:
            return self.source.patch_embed.proj(x).flatten(2).transpose(1, 2)
        B, C, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        return torch.addmm(self.patch_bias.to(x.dtype), patches.reshape(B * h * w, -1), self.patch_weight.to(x.dtype)).view(B, h * w, -1)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        patches = self.patch_embed(x)
        pos = self._position_embedding(patches.shape[1] + 1, H, W, patches)
        tokens = torch.cat((pos[:, :1].expand(B, -1, -1), patches + pos[:, 1:]), dim=1)
        if self.source.register_tokens is not None:
            registers = self.source.register_tokens.to(tokens.dtype).expand(B, -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Pixels → final normalised tokens (B, 1 + registers + patches, D)."""
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_features(self, x: Tensor) -> dict:
        x_norm = self.forward_tokens(x)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_tokens(x)[:, 0]


def quantize_int8(model: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of every nn.Linear (weights per output channel, activations per batch), CPU only."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager quantisation is deprecated in favour of torchao, which is not a dependency
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False)


def optimize_for_inference(model: VisionTransformer, dtype: torch.dtype | None = None, int8: bool = False,
                           compile: bool = False, matmul_patch_embed: bool = True,
                           device: torch.device | str | None = None) -> InferenceViT:
    """A frozen, faster copy of `model` with the same `forward_features` and `forward`.

    dtype: cast the weights (torch.bfloat16 or torch.float16); inputs must then be given in that dtype
        (`InferenceViT.input_dtype` says which). None keeps fp32.
    int8: quantise the Linear layers to int8 (dynamic, CPU); the accuracy cost is reported by `feature_cosine`.
    compile: wrap `forward_tokens` in `torch.compile` with inductor's weight freezing (the first call per
        input shape compiles, minutes on a small CPU; call it under `torch.no_grad` / `inference_mode`).
    """
    if int8 and dtype is not None:
        raise ValueError("int8 quantisation works on fp32 models; do not combine it with dtype")
    fast = InferenceViT(model, matmul_patch_embed=matmul_patch_embed)
    if device is not None:
        fast = fast.to(device)
    if dtype is not None:
        fast = fast.to(dtype)
    if int8:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("int8 dynamic quantisation runs on the CPU only")
        fast.blocks = quantize_int8(fast.blocks)
    fast.input_dtype = dtype or torch.float32
    if compile:
        # freezing: weights become constants, so inductor can pre-pack them for the CPU matmul kernels
        fast.forward_tokens = torch.compile(fast.forward_tokens, dynamic=False, options={"freezing": True})
    return fast.eval()


@torch.no_grad()
def feature_cosine(reference: nn.Module, candidate: nn.Module, images: Tensor) -> float:
    """Smallest cosine similarity between the [CLS] features of two models over a batch (1.0 = identical)."""
    expected = reference(images).float()
    dtype = getattr(candidate, "input_dtype", images.dtype)
    got = candidate(images.to(dtype)).float()
    return float(F.cosine_similarity(expected, got, dim=-1).min())
