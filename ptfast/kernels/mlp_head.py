"""Launchers of the P-tuning MLP head: which kernels run, in which order, with which plan.

    out = relu(relu(x @ w1.T + b1) @ w2.T + b2) @ w3.T + b3        x (M, D), w1 (H, D), w2 (H, H), w3 (D, H)

Forward, small H (<= 256, e.g. the seed shape 20x1024x128): 2 launches, layer 1 as a split-K GEMM
(``linear.py``), then layers 2+3 fused (``mlp_head_small.py``). Otherwise 3 launches, one split-K GEMM per layer.
Backward: 3 launches, one per layer: g = (dY @ W) masked by the ReLU (threshold_backward), and dW, db. Every split-K
reduction happens inside its GEMM launch, deterministically. ``forward_plan`` / ``backward_plan`` are what the
launchers run, and what ``python -m ptfast.kernels.audit`` costs.

Launchers expect validated, contiguous-or-not, same-device, same-dtype tensors (fp32 / fp16 / bf16) and a kernel
precision string ("ieee", "tf32", "tf32x3"; ignored for 16-bit inputs), chosen by ``ptfast.ops.mlp_head``.
Test knobs (``ptfast/_env.py``): ``PTFAST_MLP_HEAD_PATH=small|large``, ``PTFAST_MLP_HEAD_SPLIT_K=<int>``.
Design notes and the cost model: docs/design.md, "Kernels".
"""

from __future__ import annotations

from typing import List

import torch

from .. import _env
from .common import FWD_HIDDEN, FWD_OUT, Epilogue, Launch, on_device  # noqa: F401
from .linear import _bwd_kernel, _linear_kernel, linear, linear_dw, linear_dw_plan, linear_plan  # noqa: F401
from .mlp_head_small import SMALL_MAX_H, _head23_kernel, head23, head23_plan, small_max_h  # noqa: F401

__all__ = ["mlp_head_forward", "mlp_head_backward", "forward_plan", "backward_plan", "use_small_path",
           "kernel_precision"]



def kernel_precision(dtype, precision: str) -> str:
    """16-bit dots ignore input_precision: compile one variant ("ieee") for them."""
    return precision if dtype == torch.float32 else "ieee"


def use_small_path(H: int, dtype=torch.float32, precision: str = "tf32x3") -> bool:
    """Layers 2+3 fused in one launch when h1/h2 rows fit on chip (the kernel rereads w2 from L2 per program)."""
    return _path(H, dtype, kernel_precision(dtype, precision)) == "small"


def _path(H, dtype, precision) -> str:
    fits = H <= small_max_h(dtype, precision)
    forced = _env.mlp_head_forced_path()
    if forced == "small" and not fits:  # a test that forces a path must run that path, not silently another
        raise ValueError(f"PTFAST_MLP_HEAD_PATH=small, but H={H} exceeds the small path's limit "
                         f"{small_max_h(dtype, precision)} for {dtype} / {precision}")
    return forced or ("small" if fits else "large")


def forward_plan(M, D, H, *, dtype, precision: str, sms: int = 132) -> List[Launch]:
    p = kernel_precision(dtype, precision)
    l1 = linear_plan(M, H, D, w_t=False, epilogue=FWD_HIDDEN[1], dtype=dtype, precision=p, sms=sms)
    if _path(H, dtype, p) == "small":
        return [l1, head23_plan(M, D, H, dtype=dtype, precision=p)]
    return [l1, linear_plan(M, H, H, w_t=False, epilogue=FWD_HIDDEN[1], dtype=dtype, precision=p, sms=sms),
            linear_plan(M, D, H, w_t=False, epilogue=FWD_OUT[1], dtype=dtype, precision=p, sms=sms)]


def backward_plan(M, D, H, *, dtype, precision: str, sms: int = 132) -> List[Launch]:
    p = kernel_precision(dtype, precision)
    return [
        linear_dw_plan(M, H, D, mask=True, dtype=dtype, precision=p, sms=sms),   # g2, dw3, db3
        linear_dw_plan(M, H, H, mask=True, dtype=dtype, precision=p, sms=sms),   # g1, dw2, db2
        linear_dw_plan(M, D, H, mask=False, dtype=dtype, precision=p, sms=sms),  # dx, dw1, db1
    ]


def mlp_head_forward(x, w1, b1, w2, b2, w3, b3, *, precision: str = "ieee"):
    """x (M, D). Returns (out (M, D), h1 (M, H), h2 (M, H)); h1 / h2 are the post-ReLU activations."""
    x, w1, b1, w2, b2, w3, b3 = (t.contiguous() for t in (x, w1, b1, w2, b2, w3, b3))
    p = kernel_precision(x.dtype, precision)
    H = w1.shape[0]
    dt = x.dtype
    with on_device(x):
        h1 = linear(x, w1, bias=b1, relu=True, precision=p, out_dtype=dt)
        if _path(H, dt, p) == "small":
            out, h2 = head23(h1, w2, b2, w3, b3, precision=p)
            return out, h1, h2
        h2 = linear(h1, w2, bias=b2, relu=True, precision=p, out_dtype=dt)
        out = linear(h2, w3, bias=b3, precision=p, out_dtype=dt)
        return out, h1, h2


def mlp_head_backward(grad_out, x, w1, w2, w3, h1, h2, *, precision: str = "ieee"):
    """Returns (dx, dw1, db1, dw2, db2, dw3, db3); x / grad_out are (M, D)."""
    grad_out, x, w1, w2, w3, h1, h2 = (t.contiguous() for t in (grad_out, x, w1, w2, w3, h1, h2))
    dt = x.dtype
    p = kernel_precision(dt, precision)
    grad_out = grad_out.to(dt)
    with on_device(x):  # one launch per layer: g = threshold_backward(g_next @ W, h), dW = g_next.T @ h, db
        g2, dw3, db3 = linear_dw(grad_out, w3, h2, mask=True, precision=p, out_dtype=dt, w_dtype=w3.dtype)
        g1, dw2, db2 = linear_dw(g2, w2, h1, mask=True, precision=p, out_dtype=dt, w_dtype=w2.dtype)
        dx, dw1, db1 = linear_dw(g1, w1, x, mask=False, precision=p, out_dtype=dt, w_dtype=w1.dtype)
    return dx, dw1, db1, dw2, db2, dw3, db3
