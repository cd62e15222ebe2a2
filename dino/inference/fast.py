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
- fp32 on the CPU: each block's four Linear layers run as oneDNN GEMMs on weights packed once
  (`mkldnn._linear_pointwise`, private: isolated and checked in `dino.inference.onednn`), with the bias, the exact (erf) GELU and both residual additions fused into
  the GEMMs — no bias copy before each GEMM and no separate GELU / add passes over the tokens;
- `forward` (the [CLS] feature) runs the last block's attention with [CLS] as the only query and its projection,
  MLP and the final LayerNorm on the [CLS] row only (the other tokens' outputs of the last block are never used);
- optional: bf16 weights (`dtype`), int8 quantisation of every Linear (`int8`, CPU: oneDNN int8 GEMMs with the
  same fusions where available; activation ranges dynamic, or static with `calibration_images`), `torch.compile`.

The fp32 result equals the training model's up to float rounding (folding γ into the weights changes the
order of two multiplications); the tests hold it to 1e-4. int8 is lossy: `feature_cosine` measures the cost.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino.inference import onednn
from dino.log import get_logger
from dino.models.rope import apply_rope
from dino.models.vision_transformer import Mlp, SwiGLUFFNSplit, VisionTransformer, split_tokens

logger = get_logger(__name__)

# the quint8 creation functions warn that they are deprecated; `_Int8Linear` only uses them as a fast one-pass
# fp32 → uint8 rounding (the codes are read back as plain uint8), so the warning says nothing to our users.
# Scoped to calls made from this module (`module=`): the same warning from the user's own code is left alone.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", module=r"dino\.inference\.fast")

# the private oneDNN operators live in `dino.inference.onednn`, checked (schemas + a tiny run against F.linear)
# once at import; off when a check fails, and the public path computes the same
_HAS_MKLDNN_LINEAR = onednn.LINEAR_OK


class _PackedLinears:
    """oneDNN-packed copies of a block's fp32 Linear weights, made on first use and remade if a weight changes.

    Plain `F.linear` on the CPU copies the bias into the output before the GEMM and runs GELU / the residual
    add as separate passes over the tokens; `mkldnn._linear_pointwise` adds the bias, applies exact (erf)
    GELU or adds the residual inside the GEMM, on weights reordered once into oneDNN's blocked layout.
    """

    def __init__(self):
        self._cache: dict[int, tuple[tuple, Tensor]] = {}

    def __deepcopy__(self, memo) -> "_PackedLinears":  # a copy has its own Linear modules: pack afresh
        return _PackedLinears()

    def __getstate__(self) -> dict:  # oneDNN tensors do not pickle; they are rebuilt on first use
        return {"_cache": {}}

    def get(self, linear: nn.Linear, rows: int) -> Tensor:
        weight = linear.weight
        # inference tensors (made under torch.inference_mode) keep no version counter: key on storage alone
        key = (weight.data_ptr(), None if weight.is_inference() else weight._version, rows)
        entry = self._cache.get(id(linear))
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, onednn.reorder_linear_weight(weight.detach(), rows))
            self._cache[id(linear)] = entry
        return entry[1]


_HAS_ONEDNN_INT8 = onednn.INT8_OK


def _uint8_view(qx: Tensor) -> Tensor:
    """The raw uint8 codes of a quint8 tensor without a copy (`int_repr()` would copy them)."""
    return torch.empty(0, dtype=torch.uint8, device=qx.device).set_(
        qx.untyped_storage(), qx.storage_offset(), qx.shape, qx.stride()
    )


def _affine_uint8(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point that map [lo, hi] (widened to contain 0) onto the 256 uint8 codes."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    return scale, min(255, max(0, round(-lo / scale)))


class _Int8Linear:
    """int8 oneDNN Linear: weights int8 per output channel (symmetric), activations uint8 per tensor; bias, exact
    GELU or a residual add fused into the GEMM.

    Activation ranges are either dynamic (each call's min/max: one extra pass over the input, and an image's
    features depend slightly on the rest of its batch) or static, fixed by `calibrate` from the min/max seen
    over calibration batches (no range pass, batch-independent results, and the GEMM before can write uint8
    directly: see `output_quantization`).
    """

    def __init__(self, linear: nn.Linear):
        weight = linear.weight.detach().float()
        self.out_features = weight.shape[0]
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
        qweight = torch.clamp(torch.round(weight / scale[:, None]), -128, 127).to(torch.int8)
        self.qweight = qweight  # plain int8 copy: the packed (opaque) tensor can be neither copied nor pickled
        self.weight = onednn.qlinear_prepack(qweight)
        self.scale = scale
        self.zero_point = torch.zeros(self.out_features, dtype=torch.long)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.input_quantization: tuple[float, int] | None = None  # static (scale, zero point) once calibrated
        self.observed_range: tuple[float, float] | None = None  # min/max of the inputs while calibrating
        self.observing = False

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "weight"}

    def __setstate__(self, state: dict) -> None:  # deepcopy / unpickle: pack the int8 weight again
        self.__dict__.update(state)
        self.weight = onednn.qlinear_prepack(self.qweight)

    def calibrate(self) -> None:
        """Freeze the input range observed so far into a static scale and zero point."""
        if self.observed_range is None:
            raise RuntimeError("no calibration batch has passed through this layer")
        self.input_quantization = _affine_uint8(*self.observed_range)
        self.observing = False

    def quantize_input(self, x: Tensor) -> tuple[Tensor, float, int]:
        if x.dtype == torch.uint8:  # already quantised by the previous GEMM with this layer's static range
            return x, *self.input_quantization
        if self.input_quantization is not None:
            scale, zero_point = self.input_quantization
        else:
            lo, hi = (float(v) for v in torch.aminmax(x))
            if self.observing:
                seen = self.observed_range or (lo, hi)
                self.observed_range = (min(seen[0], lo), max(seen[1], hi))
            scale, zero_point = _affine_uint8(lo, hi)
        return _uint8_view(torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)), scale, zero_point

    def __call__(
        self,
        x: Tensor,
        gelu: bool = False,
        residual: Tensor | None = None,
        output_quantization: tuple[float, int] | None = None,
    ) -> Tensor:
        """fp32 output, or uint8 codes on `output_quantization`'s grid (for the next layer's static input)."""
        qx, scale, zero_point = self.quantize_input(x)
        if residual is not None:
            return onednn.qlinear_add(
                qx, scale, zero_point, self.weight, self.scale, self.zero_point, residual, self.bias
            )
        out_scale, out_zero_point, out_dtype = 1.0, 0, torch.float32
        if output_quantization is not None:
            (out_scale, out_zero_point), out_dtype = output_quantization, torch.uint8
        return onednn.qlinear(
            qx,
            scale,
            zero_point,
            self.weight,
            self.scale,
            self.zero_point,
            self.bias,
            out_scale,
            out_zero_point,
            out_dtype,
            gelu=gelu,
        )


def _use_mkldnn(x: Tensor, *linears: nn.Module) -> bool:
    """True when the oneDNN fused path computes exactly what the plain path would (fp32 CPU inference)."""
    if not _HAS_MKLDNN_LINEAR or x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return False
    return all(
        type(linear) is nn.Linear and linear.weight.dtype == torch.float32 and not linear.weight.requires_grad
        for linear in linears
    )


def _plain_qkv(qkv: nn.Linear) -> nn.Linear:
    """DINOv3's k-masked qkv (`LinearKMaskedBias`: bias × `bias_mask` on every call) as a plain Linear whose bias
    holds bias × mask once (the mask is 0 or 1, so the product is exact); the weight is shared, not copied."""
    mask = getattr(qkv, "bias_mask", None)
    if type(qkv) is nn.Linear or qkv.bias is None or mask is None:
        return qkv
    plain = nn.Linear(qkv.in_features, qkv.out_features, bias=True, device="meta")
    plain.weight = qkv.weight
    plain.bias = nn.Parameter(qkv.bias.detach() * mask.to(qkv.bias.dtype), requires_grad=False)
    return plain


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
        self.qkv, self.proj = _plain_qkv(block.attn.qkv), block.attn.proj
        self.num_heads = block.attn.num_heads
        self.mlp = block.mlp
        if hasattr(block.ls1, "gamma"):
            _fold_layerscale(self.proj, block.ls1.gamma)
        if hasattr(block.ls2, "gamma"):
            last = self.mlp.fc2 if isinstance(self.mlp, Mlp) else self.mlp.w3
            _fold_layerscale(last, block.ls2.gamma)
        self._packed = _PackedLinears()

    def _attend(self, qkv: Tensor, B: int, N: int, C: int, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        # (B, N, 3, heads, hd) → three (B, heads, N, hd) views; SDPA takes strided inputs without a copy
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:  # DINOv3: rotate the patch rows of q and k (the model's own `apply_rope`)
            q, k = apply_rope(q, k, rope)
        # CPU flash attention writes (B, N, heads, hd) memory, so transpose + reshape below is free
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)

    def attention(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, N, C = x.shape
        return self.proj(self._attend(self.qkv(x), B, N, C, rope))

    def quantize_int8_onednn(self) -> None:
        """Run the four Linear layers as int8 oneDNN GEMMs (`_Int8Linear`) from now on (CPU, Mlp blocks)."""
        self._int8 = {
            name: _Int8Linear(linear)
            for name, linear in (("qkv", self.qkv), ("proj", self.proj), ("fc1", self.mlp.fc1), ("fc2", self.mlp.fc2))
        }

    def _forward_int8(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, N, C = x.shape
        q = self._int8
        qkv = q["qkv"](self.norm1(x).reshape(B * N, C))
        attended = self._attend(qkv, B, N, C, rope).reshape(B * N, C)
        x = q["proj"](attended, residual=x.reshape(B * N, C))  # x + proj(attn)
        # static ranges: fc1 writes GELU's output straight onto fc2's uint8 input grid (no fp32 round trip)
        hidden = q["fc1"](self.norm2(x), gelu=True, output_quantization=q["fc2"].input_quantization)
        return q["fc2"](hidden, residual=x).view(B, N, C)  # x + fc2(GELU(fc1(norm2(x))))

    def forward_cls(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """This block's output for the [CLS] token only, (B, 1, C) — what a [CLS] feature needs from the last block.

        Every token is still a key and a value, but only [CLS] is a query, and the projection and MLP run on one
        row per image: about a tenth of the block's work (same result up to float rounding).
        """
        B, N, C = x.shape
        int8 = getattr(self, "_int8", None)
        normed = self.norm1(x)
        if int8 is not None:
            qkv = int8["qkv"](normed.reshape(B * N, C))
        elif _use_mkldnn(x, self.qkv):
            qkv = onednn.linear(normed, self._packed.get(self.qkv, B * N), self.qkv.bias)
        else:
            qkv = self.qkv(normed)
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:  # [CLS] is never rotated: only the keys need the tables
            q, k = apply_rope(q, k, rope)
        attended = F.scaled_dot_product_attention(q[:, :, :1], k, v).reshape(B, C)  # (B, heads, 1, hd) → (B, C)
        cls = x[:, 0]
        if int8 is not None:  # static ranges hold for any subset of rows; dynamic ones are taken over these rows
            cls = int8["proj"](attended, residual=cls.contiguous())
            hidden = int8["fc1"](self.norm2(cls), gelu=True, output_quantization=int8["fc2"].input_quantization)
            return int8["fc2"](hidden, residual=cls).unsqueeze(1)
        cls = cls + self.proj(attended)
        return (cls + self.mlp(self.norm2(cls))).unsqueeze(1)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`rope`: DINOv3's (sin, cos) tables for the patch grid, None for v1/v2."""
        if getattr(self, "_int8", None) is not None:
            return self._forward_int8(x, rope)
        if isinstance(self.mlp, Mlp) and _use_mkldnn(x, self.qkv, self.proj, self.mlp.fc1, self.mlp.fc2):
            return self._forward_mkldnn(x, rope)
        if isinstance(self.mlp, SwiGLUFFNSplit) and _use_mkldnn(
            x, self.qkv, self.proj, self.mlp.w1, self.mlp.w2, self.mlp.w3
        ):
            return self._forward_mkldnn(x, rope)
        x = x + self.attention(self.norm1(x), rope)  # not in place: x may be a view the caller still needs
        x += self.mlp(self.norm2(x))
        return x

    def _forward_mkldnn(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Same function as `forward`, with bias, GELU and the residual adds fused into oneDNN GEMMs."""
        B, N, C = x.shape
        rows = B * N
        pack = self._packed.get
        qkv = onednn.linear(self.norm1(x), pack(self.qkv, rows), self.qkv.bias)
        attended = self._attend(qkv, B, N, C, rope)
        x = onednn.linear_add(attended, x, pack(self.proj, rows), self.proj.bias)  # x + proj(attn)
        if isinstance(self.mlp, SwiGLUFFNSplit):  # DINOv3 S+/L+/H+: x + w3(SiLU(w1 h) ⊙ w2 h), h = norm2(x)
            w1, w2, w3 = self.mlp.w1, self.mlp.w2, self.mlp.w3
            normed = self.norm2(x)
            gate = onednn.linear(normed, pack(w1, rows), w1.bias)
            hidden = F.silu(gate, inplace=True).mul_(onednn.linear(normed, pack(w2, rows), w2.bias))
            return onednn.linear_add(hidden, x, pack(w3, rows), w3.bias)
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        hidden = onednn.linear(self.norm2(x), pack(fc1, rows), fc1.bias, gelu=True)  # exact erf GELU
        return onednn.linear_add(hidden, x, pack(fc2, rows), fc2.bias)  # x + fc2(GELU(fc1(norm2(x))))


class InferenceViT(nn.Module):
    """Inference-only copy of a `VisionTransformer` or a DINOv3 ViT; same `forward_features` / `forward` results.

    DINOv3 (`rope`): the tokens are [CLS, storage, patches] with no position embedding; the rotary tables of each
    input size are computed once by the model's own `rope_tables` and cached; the k-masked qkv bias is folded
    into a plain bias (`_plain_qkv`); the final norm is the model's (`cls_norm` for [CLS] / storage when untied);
    sizes that are not multiples of the patch are floored, as the model's strided conv does.
    Built by `optimize_for_inference`; the source model is not modified (unless built with `copy=False`).
    """

    def __init__(self, model: VisionTransformer, matmul_patch_embed: bool = True, copy: bool = True):
        super().__init__()
        model = (_copy_module(model) if copy else model).eval().requires_grad_(False)
        self.patch_size = model.patch_size
        self.embed_dim = self.num_features = model.embed_dim
        self.num_register_tokens = model.num_register_tokens
        self.matmul_patch_embed = matmul_patch_embed
        self.rope = hasattr(model, "rope_embed")  # DINOv3: rotary position embedding, storage tokens
        self.extra_tokens_key = getattr(model, "extra_tokens_key", "x_norm_regtokens")
        self.source = model  # keeps the position-embedding interpolation and the output split of the original
        conv = model.patch_embed.proj
        # the conv weight (D, C, p, p) as a (C·p·p, D) matrix, in the order the unfolded patches use
        self.register_buffer("patch_weight", conv.weight.detach().flatten(1).t().contiguous(), persistent=False)
        self.register_buffer("patch_bias", conv.bias.detach().clone(), persistent=False)
        self.blocks = nn.ModuleList(InferenceBlock(block) for block in model.blocks)
        model.blocks = nn.ModuleList()  # the source keeps tokens and embeddings only; the blocks live here
        self.norm = model.norm
        # the norm of the [CLS] row: v3's untied `cls_norm` where a model has one
        self.cls_norm = model._cls_norm() if self.rope else model.norm
        self._pos_cache: dict[tuple, Tensor] = {}
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

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

    def rope_tables(self, h: int, w: int) -> tuple[Tensor, Tensor] | None:
        """DINOv3's (sin, cos) for an h×w patch grid, from the model's own `rope_tables`, cached per size.

        Traced (ONNX export) they are recomputed, so the graph computes them from the input's size."""
        if not self.rope:
            return None
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.source.rope_tables(h, w)
        key = (h, w, self.source.rope_embed.periods.device)
        cached = self._rope_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = tuple(t.contiguous() for t in self.source.rope_tables(h, w))
            self._rope_cache[key] = cached
        return cached

    def _grid(self, x: Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def patch_embed(self, x: Tensor) -> Tensor:
        if not self.matmul_patch_embed:
            return self.source.patch_embed.proj(x).flatten(2).transpose(1, 2)
        B, C, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        if H % p or W % p:  # v3 floors the size (what the strided conv reads); v1/v2 refuse it in prepare_tokens
            x = x[:, :, : h * p, : w * p]
        patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        return torch.addmm(
            self.patch_bias.to(x.dtype), patches.reshape(B * h * w, -1), self.patch_weight.to(x.dtype)
        ).view(B, h * w, -1)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        p = self.patch_size
        if self.rope:  # [CLS, storage…, patches…]; no position added (RoPE acts inside the attention)
            patches = self.patch_embed(x)
            prefix = [self.source.cls_token]
            if self.source.storage_tokens is not None:
                prefix.append(self.source.storage_tokens)
            prefix = torch.cat(prefix, dim=1).to(patches.dtype)
            return torch.cat((prefix.expand(B, -1, -1), patches), dim=1)
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        patches = self.patch_embed(x)
        pos = self._position_embedding(patches.shape[1] + 1, H, W, patches)
        tokens = torch.cat((pos[:, :1].expand(B, -1, -1), patches + pos[:, 1:]), dim=1)
        if self.source.register_tokens is not None:
            registers = self.source.register_tokens.to(tokens.dtype).expand(B, -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    def _final_norm(self, tokens: Tensor) -> Tensor:
        if self.cls_norm is self.norm:
            return self.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        return torch.cat((self.cls_norm(tokens[:, :first_patch]), self.norm(tokens[:, first_patch:])), dim=1)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Pixels → final normalised tokens (B, 1 + registers + patches, D)."""
        return self._final_norm(self.forward_blocks(x))

    def forward_blocks(self, x: Tensor) -> Tensor:
        """Pixels → tokens after the last block, before the final LayerNorm."""
        tokens = self.prepare_tokens(x)
        rope = self.rope_tables(*self._grid(x))
        for block in self.blocks:
            tokens = block(tokens, rope)
        return tokens

    def forward_features(self, x: Tensor) -> dict:
        cls_token, register_tokens, patch_tokens = split_tokens(self.forward_tokens(x), self.num_register_tokens)
        return {
            "x_norm_clstoken": cls_token,
            self.extra_tokens_key: register_tokens,
            "x_norm_patchtokens": patch_tokens,
        }

    def forward(self, x: Tensor) -> Tensor:
        if "forward_tokens" in self.__dict__:  # replaced by its torch.compile'd version: use that graph
            return self.forward_tokens(x)[:, 0]
        # only [CLS] leaves the last block, and LayerNorm is per token: the same [CLS] for less work
        tokens = self.prepare_tokens(x)
        rope = self.rope_tables(*self._grid(x))
        for block in self.blocks[:-1]:
            tokens = block(tokens, rope)
        if len(self.blocks):
            tokens = self.blocks[-1].forward_cls(tokens, rope)
        return self.cls_norm(tokens[:, 0])


class EagerInference(nn.Module):
    """A frozen copy of a backbone that `InferenceViT` does not rebuild (the DINOv3 ConvNeXts): the model's own
    forward, with the same interface (`forward_features`, `forward`, `input_dtype`)."""

    def __init__(self, model: nn.Module, copy: bool = True):
        super().__init__()
        self.model = (_copy_module(model) if copy else model).eval().requires_grad_(False)
        self.patch_size = model.patch_size
        self.embed_dim = self.num_features = model.embed_dim
        self.num_register_tokens = getattr(model, "num_register_tokens", 0)

    def forward_features(self, x: Tensor) -> dict:
        return self.model.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)["x_norm_clstoken"]


def _copy_module(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def supports_fast_path(model: nn.Module) -> bool:
    """Whether `InferenceViT` rebuilds this backbone (the ViTs of every generation); else `EagerInference`."""
    return (
        hasattr(model, "blocks")
        and hasattr(model, "patch_embed")
        and (hasattr(model, "interpolate_pos_encoding") or hasattr(model, "rope_embed"))
    )


def quantize_int8(model: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of every nn.Linear (weights per output channel, activations per batch), CPU only."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager quantisation is deprecated in favour of torchao, which is not a dependency
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False)


def optimize_for_inference(
    model: VisionTransformer,
    dtype: torch.dtype | None = None,
    int8: bool = False,
    compile: bool = False,
    matmul_patch_embed: bool = True,
    device: torch.device | str | None = None,
    calibration_images: Tensor | Iterable[Tensor] | None = None,
    copy: bool = True,
) -> InferenceViT | EagerInference:
    """A frozen, faster copy of `model` with the same `forward_features` and `forward`.

    dtype: cast the weights (torch.bfloat16 or torch.float16); inputs must then be given in that dtype
        (`InferenceViT.input_dtype` says which). None keeps fp32.
    int8: quantise the Linear layers to int8 (dynamic, CPU); the accuracy cost is reported by `feature_cosine`.
        With oneDNN (standard x86 builds) and Mlp blocks: int8 oneDNN GEMMs, weights per output channel,
        activations per tensor, bias / GELU / residual adds fused (`_Int8Linear`); otherwise (SwiGLU, other
        builds) `torch.ao` dynamic quantisation (`quantize_int8`).
    calibration_images: with int8 on the oneDNN path, a batch (or an iterable of batches) of typical inputs:
        the activation ranges seen on them become static, so no range pass runs per layer, fc1 writes fc2's
        uint8 input directly, and an image's features no longer depend on the rest of its batch (static int8).
        Inputs outside the calibrated range are clipped to it: calibrate on images like the ones to embed.
        None: dynamic ranges (each call's min/max).
    compile: wrap `forward_tokens` in `torch.compile` with inductor's weight freezing (the first call per
        input shape compiles, minutes on a small CPU; call it under `torch.no_grad` / `inference_mode`).
    copy: False builds the inference model from `model` itself (its blocks move into the copy, LayerScale is
        folded into its weights): no second copy of the weights in memory, but `model` is no longer usable.
    A backbone `InferenceViT` does not rebuild (a DINOv3 ConvNeXt) runs its own forward (`EagerInference`).
    """
    if int8 and dtype is not None:
        raise ValueError("int8 quantisation works on fp32 models; do not combine it with dtype")
    if not supports_fast_path(model):
        logger.info(f"{type(model).__name__}: no fast inference copy for this backbone; its own forward is used")
        fast = EagerInference(model, copy=copy)
        if device is not None:
            fast = fast.to(device)
        if dtype is not None:
            fast = fast.to(dtype)
        if int8:
            if device is not None and torch.device(device).type != "cpu":
                raise ValueError("int8 dynamic quantisation runs on the CPU only")
            fast.model = quantize_int8(fast.model)
        fast.input_dtype = dtype or torch.float32
        if compile:
            fast.forward_features = torch.compile(fast.forward_features, dynamic=False)
        return fast.eval()
    fast = InferenceViT(model, matmul_patch_embed=matmul_patch_embed, copy=copy)
    if device is not None:
        fast = fast.to(device)
    if dtype is not None:
        fast = fast.to(dtype)
    if int8:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("int8 dynamic quantisation runs on the CPU only")
        if _HAS_ONEDNN_INT8 and all(isinstance(block.mlp, Mlp) for block in fast.blocks):
            for block in fast.blocks:
                block.quantize_int8_onednn()
            if calibration_images is not None:
                calibrate_int8(fast, calibration_images)
        else:
            fast.blocks = quantize_int8(fast.blocks)
    fast.input_dtype = dtype or torch.float32
    if compile:
        # freezing: weights become constants, so inductor can pre-pack them for the CPU matmul kernels
        fast.forward_tokens = torch.compile(fast.forward_tokens, dynamic=False, options={"freezing": True})
    return fast.eval()


@torch.no_grad()
def calibrate_int8(model: InferenceViT, batches: Tensor | Iterable[Tensor]) -> None:
    """Fix every int8 layer's input range to the min/max seen over `batches` (static int8)."""
    layers = _int8_layers(model)
    for layer in layers:
        layer.input_quantization, layer.observed_range, layer.observing = None, None, True
    seen = 0
    for batch in [batches] if isinstance(batches, Tensor) else batches:
        model.forward_blocks(batch.float())
        seen += len(batch)
    if not seen:
        raise ValueError("calibrate_int8 needs at least one image")
    for layer in layers:
        layer.calibrate()


def _int8_layers(model: InferenceViT) -> list[_Int8Linear]:
    layers = [layer for block in model.blocks for layer in (getattr(block, "_int8", None) or {}).values()]
    if not layers:
        raise ValueError("this needs a model made with optimize_for_inference(..., int8=True) on oneDNN")
    return layers


def int8_ranges(model: InferenceViT) -> list[list[float]]:
    """The static activation grids [scale, zero point] of every int8 layer, in order (to store next to features)."""
    layers = _int8_layers(model)
    if any(layer.input_quantization is None for layer in layers):
        raise ValueError("the model is not calibrated (dynamic int8): call calibrate_int8 first")
    return [[float(layer.input_quantization[0]), int(layer.input_quantization[1])] for layer in layers]


def load_int8_ranges(model: InferenceViT, ranges: list[list[float]]) -> None:
    """Restore grids saved by `int8_ranges`, so that new images are embedded exactly like the stored ones."""
    layers = _int8_layers(model)
    if len(ranges) != len(layers):
        raise ValueError(f"{len(ranges)} stored int8 ranges for a model with {len(layers)} int8 layers")
    for layer, (scale, zero_point) in zip(layers, ranges):
        layer.input_quantization, layer.observing = (float(scale), int(zero_point)), False


@torch.no_grad()
def feature_cosine(reference: nn.Module, candidate: nn.Module, images: Tensor) -> float:
    """Smallest cosine similarity between the [CLS] features of two models over a batch (1.0 = identical)."""
    expected = reference(images).float()
    dtype = getattr(candidate, "input_dtype", images.dtype)
    got = candidate(images.to(dtype)).float()
    return float(F.cosine_similarity(expected, got, dim=-1).min())
