"""Cross-entropy of soft targets against a temperature softmax, computed in row blocks without (M, K) temporaries.

For student logits s_i ∈ R^K, targets t_i ∈ R^K (teacher probabilities, no gradient) and temperature τ,

    H_i = −Σ_k t_ik · log softmax(s_i / τ)_k = T_i · lse_i − (t_i · s_i) / τ,
    lse_i = log Σ_k exp(s_ik / τ),   T_i = Σ_k t_ik   (1 for probabilities),

    ∂H_i / ∂s_ik = (T_i · softmax(s_i / τ)_k − t_ik) / τ.

This is the DINO / iBOT cross-entropy (Caron et al. 2021, eq. 1; Zhou et al. 2022).  The plain autograd form,
`(t * F.log_softmax(s / τ)).sum(-1)`, materialises s/τ, the log-probabilities, their product with t and, in the
backward pass, three more (M, K) tensors — for iBOT's M ≈ 600 masked patches × K = 65,536 prototypes each is
160 MB, written and read from main memory.  Here forward and backward walk over blocks of rows small enough
to stay in the CPU cache (or one pass per block on GPUs), the only (M, K) tensor made is the gradient itself,
and the result equals the plain form up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

# rows per block: ~2 MB of fp32 logits at K = 65,536, so a block's passes hit the cache after the first
_BLOCK_ELEMENTS = 1 << 19


def _row_blocks(rows: int, width: int) -> range:
    return range(0, rows, max(1, _BLOCK_ELEMENTS // max(width, 1)))


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        rows, width = logits.shape
        step = _row_blocks(rows, width).step
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        dot = torch.empty(rows, dtype=torch.float32, device=logits.device)
        mass = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in _row_blocks(rows, width):
            block = slice(start, start + step)
            s, t = logits[block].float(), targets[block].float()
            lse[block] = torch.logsumexp(s / temperature, dim=-1)
            dot[block] = torch.linalg.vecdot(t, s)
            mass[block] = t.sum(dim=-1)
        ctx.save_for_backward(logits, targets, lse, mass)
        ctx.temperature = temperature
        return mass * lse - dot / temperature

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        logits, targets, lse, mass = ctx.saved_tensors
        temperature = ctx.temperature
        rows, width = logits.shape
        step = _row_blocks(rows, width).step
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        scale = grad_rows.float() / temperature  # dH/ds carries 1/τ; upstream gradient per row
        for start in _row_blocks(rows, width):
            block = slice(start, start + step)
            g = grad[block]
            torch.div(logits[block], temperature, out=g)
            g.sub_(lse[block, None]).exp_()  # softmax(s / τ)
            g.mul_((mass[block] * scale[block])[:, None])  # · T_i · g_i / τ
            g.addcmul_(targets[block], scale[block, None], value=-1.0)  # − t_ik · g_i / τ
        return grad.to(logits.dtype), None, None


def soft_cross_entropy(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Per-row H_i = −Σ_k t_ik log softmax(s_i / τ)_k of (M, K) `logits` and `targets` → (M,) (fp32).

    Differentiable in `logits` only (the targets are the teacher's).  Same values and gradients as
    `-(targets * F.log_softmax(logits / temperature, -1)).sum(-1)` up to float rounding, in a fraction of the
    memory traffic (see the module docstring).
    """
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must both be (M, K); got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _SoftCrossEntropy.apply(logits, targets.detach(), float(temperature))
