"""fused_prefix_head: the prefix-tuning projection head, tanh(x @ w1.T + b1) @ w2.T + b2.

Public API
----------
``fused_prefix_head(x, w1, b1, w2, b2)``

* ``x`` is ``(..., D)``; weights in ``nn.Linear`` layout: w1 ``(H, D)``, b1 ``(H,)``, w2 ``(O, H)``, b2 ``(O,)``
  (for PEFT's ``PrefixEncoder``: D = token_dim, H = encoder_hidden_size, O = num_layers * 2 * token_dim).
  Floating-point tensors, all of one dtype and device.
* Backends, as for ``fused_mlp_head`` (``PTFAST_BACKEND``, README "Environment variables"): by default (``auto``)
  ``prefix_head_reference``, op for op what PEFT's ``nn.Sequential(Linear, Tanh, Linear)`` computes (``F.linear``,
  ``torch.tanh``, ``F.linear``, native autograd), so CPU results and gradients are bitwise PEFT's, and autocast,
  TF32 settings and double backward behave as for PEFT's head; on CUDA too, until a GPU run measures the kernels
  faster. ``PTFAST_BACKEND=triton``: the Triton kernels (``ptfast/kernels/prefix_head.py``, the MLP head's GEMM
  family with a tanh epilogue), fp32 / fp16 / bf16, forward and backward (not twice differentiable), the fp32 dot
  precision following PyTorch's matmul setting as in ``fused_mlp_head``. Under ``torch.compile`` the reference
  runs (the graph sees PyTorch's ops).
* Errors (TypeError / ValueError naming the offending argument) are raised before anything is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._env import resolve_backend
from .mlp_head import first_order_only, kernel_precision

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["fused_prefix_head", "prefix_head_reference"]

_NAMES = ("x", "w1", "b1", "w2", "b2")


def prefix_head_reference(x, w1, b1, w2, b2):
    """Eager PyTorch, op for op what PEFT's ``transform`` (Linear-Tanh-Linear) does."""
    return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


_KERNELS = None


def _kernels():
    """ptfast.kernels.prefix_head, imported on first use (it imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        from ..kernels import prefix_head

        _KERNELS = prefix_head
    return _KERNELS


class _FusedPrefixHead(torch.autograd.Function):
    """The Triton head with autograd; h (post-tanh) is saved, not returned."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, precision):
        out, h = _kernels().prefix_head_forward(x, w1, b1, w2, b2, precision=precision)
        ctx.save_for_backward(x, w1, w2, h)
        ctx.precision = precision
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        x, w1, w2, h = ctx.saved_tensors
        return (*_kernels().prefix_head_backward(grad_out, x, w1, w2, h, precision=ctx.precision), None)


def _triton_head(x, w1, b1, w2, b2):
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"fused_prefix_head: the Triton backend supports float32/float16/bfloat16, got {x.dtype}")
    D = x.shape[-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, D)
    p = kernel_precision(None, x.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2)):
        out = _FusedPrefixHead.apply(x2d, w1, b1, w2, b2, p)
    else:
        out = _kernels().prefix_head_forward(x2d, w1, b1, w2, b2, precision=p)[0]
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def _well_formed(x, w1, b1, w2, b2) -> bool:
    try:
        if not x.is_floating_point() or x.dim() < 1:
            return False
        D, H, O = x.shape[-1], w1.shape[0], w2.shape[0]
        if D == 0 or H == 0 or O == 0 or (w1.shape, b1.shape, w2.shape, b2.shape) != ((H, D), (H,), (O, H), (O,)):
            return False
        dtype, device = x.dtype, x.device
        return (
            w1.dtype == dtype
            and b1.dtype == dtype
            and w2.dtype == dtype
            and b2.dtype == dtype
            and w1.device == device
            and b1.device == device
            and w2.device == device
            and b2.device == device
        )
    except AttributeError:  # not tensors
        return False


def _validate(tensors) -> None:
    if _well_formed(*tensors):
        return  # the common case; the checks below only find the message for what is wrong
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_prefix_head: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"fused_prefix_head: {name} must be a floating-point tensor, got {t.dtype}")
    x, w1, b1, w2, b2 = tensors
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if t.dtype != x.dtype:
            raise TypeError(f"fused_prefix_head: all inputs must share x's dtype {x.dtype}, but {name} is {t.dtype}")
        if t.device != x.device:
            raise ValueError(
                f"fused_prefix_head: all inputs must be on x's device {x.device}, but {name} is on {t.device}"
            )
    if x.dim() < 1:
        raise ValueError("fused_prefix_head: x must have at least 1 dimension (..., D), got a 0-d tensor")
    for name, t, rank in (("w1", w1, 2), ("w2", w2, 2), ("b1", b1, 1), ("b2", b2, 1)):
        if t.dim() != rank:
            raise ValueError(f"fused_prefix_head: {name} must be {rank}-D, got shape {tuple(t.shape)}")
    D, H, O = x.shape[-1], w1.shape[0], w2.shape[0]
    if D == 0 or H == 0 or O == 0:
        raise ValueError(f"fused_prefix_head: D, H and O must be >= 1, got D={D}, H={H}, O={O}")
    expected = {"w1": (H, D), "b1": (H,), "w2": (O, H), "b2": (O,)}
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"fused_prefix_head: {name} has shape {tuple(t.shape)}, expected {expected[name]} "
                f"(x is (..., D={D}), w1 is (H={H}, D), w2 is (O={O}, H))"
            )


def fused_prefix_head(x, w1, b1, w2, b2) -> torch.Tensor:
    """``tanh(x @ w1.T + b1) @ w2.T + b2`` for ``x`` of shape ``(..., D)``.

    Args:
        x: ``(..., D)``; w1 ``(H, D)``, b1 ``(H,)``, w2 ``(O, H)``, b2 ``(O,)``.

    Returns: ``(..., O)``, x's dtype. Example::

        y = fused_prefix_head(x, l1.weight, l1.bias, l2.weight, l2.bias)

    See the module docstring for backends and autograd.
    """
    tensors = (x, w1, b1, w2, b2)
    _validate(tensors)
    if torch.compiler.is_compiling() or resolve_backend("prefix_head", x.device) == "eager":
        return prefix_head_reference(x, w1, b1, w2, b2)
    return _triton_head(x, w1, b1, w2, b2)
