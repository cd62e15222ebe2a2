"""The private oneDNN operators of the fast CPU path (`dino.inference.fast`), in one place, behind a check.

`torch.ops.mkldnn._linear_pointwise` (+ `.binary`), `mkldnn._reorder_linear_weight`, `onednn.qlinear_prepack` and
`onednn.qlinear_pointwise` (+ `.binary`, 18 positional arguments) are PyTorch internals (inductor's CPU lowering
calls them): no deprecation cycle protects them, and a `hasattr` guard only says that a name exists. So:

- every operator's schema is compared with the one this module was written against (`EXPECTED_SCHEMAS`);
- the float and int8 GEMMs then run once on tiny tensors against `F.linear` (plain bias, exact GELU, residual add);
- `LINEAR_OK` / `INT8_OK` say whether the fused fp32 / int8 paths may be used; when a check fails the callers take
  the public route (`F.linear`; `torch.ao` dynamic int8) with the same results, only slower, and the reason is
  logged once at debug level (`reason()`).

Tested on: torch 2.14.1 (CPU wheel, x86-64, oneDNN). The schemas below have been stable since the int8 `.binary`
overload appeared (torch 2.3); on any other version the checks, not the version number, decide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dino.log import get_logger

logger = get_logger(__name__)

TESTED_TORCH = "2.14.1"

EXPECTED_SCHEMAS = {
    (
        "mkldnn",
        "_linear_pointwise",
        "default",
    ): "mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm) -> Tensor Y",
    (
        "mkldnn",
        "_linear_pointwise",
        "binary",
    ): "mkldnn::_linear_pointwise.binary(Tensor X, Tensor other, Tensor W, Tensor? B, str attr) -> Tensor Y",
    (
        "mkldnn",
        "_reorder_linear_weight",
        "default",
    ): "mkldnn::_reorder_linear_weight(Tensor self, int? batch_size=None) -> Tensor Y",
    ("onednn", "qlinear_prepack", "default"): "onednn::qlinear_prepack(Tensor weight, int[]? x_shape) -> Tensor",
    (
        "onednn",
        "qlinear_pointwise",
        "default",
    ): "onednn::qlinear_pointwise(Tensor qx, float x_scale, int x_zero_point, Tensor qw, Tensor w_scale, "
    "Tensor w_zero_point, Tensor? bias, float output_scale, int output_zero_point, ScalarType? output_dtype, "
    "str post_op_name, Scalar?[] post_op_args, str post_op_algorithm) -> Tensor",
    (
        "onednn",
        "qlinear_pointwise",
        "binary",
    ): "onednn::qlinear_pointwise.binary(Tensor qx, float x_scale, int x_zero_point, Tensor qw, Tensor w_scale, "
    "Tensor w_zero_point, Tensor? other, Tensor? bias, float output_scale, int output_zero_point, "
    "ScalarType? output_dtype, float other_scale, int other_zp, str binary_post_op, float binary_alpha, "
    "str unary_post_op, Scalar?[] unary_post_op_args, str unary_post_op_algorithm) -> Tensor",
}

_FLOAT_OPS = [key for key in EXPECTED_SCHEMAS if key[0] == "mkldnn"]
_INT8_OPS = [key for key in EXPECTED_SCHEMAS if key[0] == "onednn"]
_reasons: list[str] = []


def _overload(namespace: str, name: str, overload: str):
    packet = getattr(getattr(torch.ops, namespace), name)
    return getattr(packet, overload)


def _schemas_match(keys) -> bool:
    for key in keys:
        try:
            schema = str(_overload(*key)._schema)
        except (AttributeError, RuntimeError):
            _reasons.append(f"torch.ops.{key[0]}.{key[1]}.{key[2]} is missing")
            return False
        if schema != EXPECTED_SCHEMAS[key]:
            _reasons.append(f"torch.ops.{key[0]}.{key[1]}.{key[2]} changed: {schema}")
            return False
    return True


# --- the operators, each called in exactly one place ------------------------------------------------------------
def reorder_linear_weight(weight: Tensor, rows: int) -> Tensor:
    """`weight` packed once into oneDNN's blocked layout for GEMMs of about `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """x Wᵀ + b, optionally followed by exact (erf) GELU, in one oneDNN GEMM."""
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "none")  # "none": erf, not tanh
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_add(x: Tensor, residual: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """residual + x Wᵀ + b in one oneDNN GEMM."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")


def qlinear_prepack(qweight: Tensor) -> Tensor:
    return torch.ops.onednn.qlinear_prepack(qweight, None)


def qlinear(
    qx: Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor,
    bias: Tensor | None,
    output_scale: float = 1.0,
    output_zero_point: int = 0,
    output_dtype: torch.dtype = torch.float32,
    gelu: bool = False,
) -> Tensor:
    """int8 GEMM of uint8 activations (per tensor) and packed int8 weights (per channel), optional exact GELU."""
    return torch.ops.onednn.qlinear_pointwise(
        qx,
        x_scale,
        x_zero_point,
        packed,
        w_scale,
        w_zero_point,
        bias,
        output_scale,
        output_zero_point,
        output_dtype,
        "gelu" if gelu else "none",
        [],
        "none" if gelu else "",
    )


def qlinear_add(
    qx: Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor,
    residual: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """residual + int8 GEMM, fp32 output."""
    return torch.ops.onednn.qlinear_pointwise.binary(
        qx,
        x_scale,
        x_zero_point,
        packed,
        w_scale,
        w_zero_point,
        residual,
        bias,
        1.0,
        0,
        torch.float32,
        1.0,
        0,
        "add",
        1.0,
        "none",
        [],
        "",
    )


# --- the checks ---------------------------------------------------------------------------------------------------
def _float_path_works() -> bool:
    if not (torch.backends.mkldnn.is_available() and _schemas_match(_FLOAT_OPS)):
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(*s, generator=g) for s in ((5, 8), (6, 8), (6,), (5, 6)))
    try:
        with torch.no_grad():
            packed = reorder_linear_weight(w, 5)
            got = (linear(x, packed, b), linear(x, packed, b, gelu=True), linear_add(x, r, packed, b))
    except Exception as error:  # noqa: BLE001 - any failure means: do not use it
        _reasons.append(f"oneDNN fp32 linear failed: {type(error).__name__}: {error}")
        return False
    expected = (F.linear(x, w, b), F.gelu(F.linear(x, w, b)), r + F.linear(x, w, b))
    if not all(torch.allclose(a, e, atol=1e-5, rtol=1e-5) for a, e in zip(got, expected)):
        _reasons.append("oneDNN fp32 linear computes something else than F.linear")
        return False
    return True


def _int8_path_works() -> bool:
    if not (LINEAR_OK and _schemas_match(_INT8_OPS)):
        return False
    g = torch.Generator().manual_seed(0)
    qw = torch.randint(-20, 20, (6, 8), generator=g, dtype=torch.int8)
    w_scale, w_zp = torch.full((6,), 0.01), torch.zeros(6, dtype=torch.long)
    qx = torch.randint(0, 255, (5, 8), generator=g, dtype=torch.uint8)
    bias, residual = torch.randn(6, generator=g), torch.randn(5, 6, generator=g)
    try:
        packed = qlinear_prepack(qw)
        got = qlinear(qx, 0.02, 128, packed, w_scale, w_zp, bias)
        got_gelu = qlinear(qx, 0.02, 128, packed, w_scale, w_zp, bias, gelu=True)
        got_add = qlinear_add(qx, 0.02, 128, packed, w_scale, w_zp, residual.clone(), bias)
    except Exception as error:  # noqa: BLE001 - any failure means: do not use it
        _reasons.append(f"oneDNN int8 linear failed: {type(error).__name__}: {error}")
        return False
    expected = F.linear((qx.float() - 128) * 0.02, qw.float() * 0.01, bias)
    ok = (
        torch.allclose(got, expected, atol=1e-4)
        and torch.allclose(got_gelu, F.gelu(expected), atol=1e-4)
        and torch.allclose(got_add, residual + expected, atol=1e-4)
    )
    if not ok:
        _reasons.append("oneDNN int8 linear computes something else than the dequantised F.linear")
    return ok


def reason() -> str:
    """Why a fused path is off ('' when both are on)."""
    return "; ".join(_reasons)


LINEAR_OK = _float_path_works()
INT8_OK = _int8_path_works()
if _reasons:
    logger.debug(
        f"fast inference falls back to the public ops (torch {torch.__version__}, tested on {TESTED_TORCH}): {reason()}"
    )
