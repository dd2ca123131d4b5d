"""Launchers of the prefix-tuning projection head (P-tuning v2): which kernels run, with which plan.

    out = tanh(x @ w1.T + b1) @ w2.T + b2        x (M, D), w1 (H, D), w2 (O, H), O = num_layers * 2 * token_dim

The same kernel family as the MLP head (``linear.py``): O runs to tens of thousands, so layer 2 is a
weight-streaming GEMM like the MLP head's large path. Forward: two ``_linear_kernel`` launches, the tanh in layer
1's epilogue; h (M x H, post-tanh) is returned for the backward. Backward: two ``_bwd_kernel`` launches,
``g = (dY @ w2) * (1 - h^2)`` with ``dw2 = dY.T @ h``, ``db2``, then ``dx = g @ w1`` with ``dw1 = g.T @ x``, ``db1``.
Plans are kept per (shape, dtype, precision, device, test settings) and compiled kernels launched directly, as in
``mlp_head.py``. Launchers expect validated same-device, same-dtype tensors and a kernel precision
(``ptfast.ops.prefix_head`` chooses both).
"""

from __future__ import annotations

import torch

from .. import _env
from . import common
from .common import FWD_OUT, FWD_TANH, contiguous, current_stream, num_sms, on_device
from .launch import Launcher
from .linear import _bwd_kernel, _linear_kernel, linear_dw_plan, linear_plan, split_args
from .mlp_head import compiled_precision

__all__ = ["prefix_head_forward", "prefix_head_backward", "forward_plan", "backward_plan"]


def forward_plan(M, D, H, O, *, dtype, precision: str, sms: int = 132):
    p = compiled_precision(dtype, precision)
    return [
        linear_plan(M, H, D, w_t=False, epilogue=FWD_TANH[1], dtype=dtype, precision=p, sms=sms),
        linear_plan(M, O, H, w_t=False, epilogue=FWD_OUT[1], dtype=dtype, precision=p, sms=sms),
    ]


def backward_plan(M, D, H, O, *, dtype, precision: str, sms: int = 132):
    p = compiled_precision(dtype, precision)
    return [
        linear_dw_plan(M, H, O, mask=False, tanh_grad=True, dtype=dtype, precision=p, sms=sms),  # g, dw2, db2
        linear_dw_plan(M, D, H, mask=False, dtype=dtype, precision=p, sms=sms),
    ]  # dx, dw1, db1


class _ForwardRun:
    def __init__(self, M, D, H, O, dtype, precision, device):
        self.M, self.H, self.O, self.dtype, self.device = M, H, O, dtype, device
        self.layers = []  # (launcher, N, K, K per split, splits, counters, workspace elements)
        for plan, N, K in zip(
            forward_plan(M, D, H, O, dtype=dtype, precision=precision, sms=num_sms(device)), (H, O), (D, H)
        ):
            kps, split = split_args(plan, K)
            launcher = Launcher(
                _linear_kernel, plan.grid, plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages
            )
            self.layers.append(
                (launcher, N, K, kps, split, plan.grid[0] * plan.grid[1], split * M * N if split > 1 else 0)
            )

    def __call__(self, x, w1, b1, w2, b2):
        M, dt, device = self.M, self.dtype, self.device
        h = common.alloc((M, self.H), dt, device)
        out = common.alloc((M, self.O), dt, device)
        if M == 0:
            return out, h
        stream = current_stream(device)
        for (launch, N, K, kps, split, n_counters, ws_numel), (a, w, b, c) in zip(
            self.layers, ((x, w1, b1, h), (h, w2, b2, out))
        ):
            cnt = common.split_counters(device, n_counters, stream)
            ws = (
                common.scratch(device, stream, ((ws_numel, torch.float32),))[0]
                if ws_numel
                else common.no_workspace(device)
            )
            launch(a, w, b, c, c, ws, cnt, M, N, K, kps, split)
        return out, h


class _BackwardRun:
    def __init__(self, M, D, H, O, dtype, precision, device):
        self.M, self.D, self.H, self.O, self.dtype, self.device = M, D, H, O, dtype, device
        self.layers = []  # (launcher, N, K, K per split, splits, GEMM grid N, M, dW grid width, counters, workspace)
        for plan, N, K in zip(
            backward_plan(M, D, H, O, dtype=dtype, precision=precision, sms=num_sms(device)), (H, D), (O, H)
        ):
            lin, dwp = plan.parts
            kps, split = split_args(lin, K)
            launcher = Launcher(
                _bwd_kernel, plan.grid, plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages
            )
            self.layers.append(
                (
                    launcher,
                    N,
                    K,
                    kps,
                    split,
                    lin.grid[0],
                    lin.grid[1],
                    dwp.grid[0],
                    lin.grid[0] * lin.grid[1],
                    split * M * N if split > 1 else 0,
                )
            )

    def __call__(self, dy, x, w1, w2, h):
        M, D, H, O, dt, device = self.M, self.D, self.H, self.O, self.dtype, self.device
        wdt = w1.dtype
        dx = common.alloc((M, D), dt, device)
        dw1, db1 = common.alloc((H, D), wdt, device), common.alloc((H,), wdt, device)
        dw2, db2 = common.alloc((O, H), wdt, device), common.alloc((O,), wdt, device)
        if M == 0:
            for t in (dw1, db1, dw2, db2):
                t.zero_()
            return dx, dw1, db1, dw2, db2
        stream = current_stream(device)
        # g crosses from one launch to the next: its own allocation (a scratch buffer shared per stream could be
        # another thread's workspace in between, on the same stream)
        g = common.alloc((M, H), dt, device)
        args = ((dy, w2, h, g, dw2, db2), (g, w1, x, dx, dw1, db1))
        for (launch, N, K, kps, split, gn, gm, dgn, n_counters, ws_numel), (a, w, act, c, dw, db) in zip(
            self.layers, args
        ):
            cnt = common.split_counters(device, n_counters, stream)
            ws = (
                common.scratch(device, stream, ((ws_numel, torch.float32),))[0]
                if ws_numel
                else common.no_workspace(device)
            )
            launch(a, w, act, c, ws, cnt, dw, db, M, N, K, kps, split, gn, gm, dgn)
        return dx, dw1, db1, dw2, db2


_RUNS: dict[tuple, object] = {}


def _run_for(cls, x, w1, w2, precision):
    M, D = x.shape
    key = (cls, M, D, w1.shape[0], w2.shape[0], x.dtype, precision, x.device, _env.kernel_settings_key())
    run = _RUNS.get(key)
    if run is None:
        run = _RUNS[key] = cls(M, D, w1.shape[0], w2.shape[0], x.dtype, precision, x.device)
    return run


def prefix_head_forward(x, w1, b1, w2, b2, *, precision: str = "ieee"):
    """x (M, D). Returns (out (M, O), h (M, H)); h is the post-tanh activation the backward needs."""
    x, w1, b1, w2, b2 = contiguous((x, w1, b1, w2, b2))
    run = _run_for(_ForwardRun, x, w1, w2, compiled_precision(x.dtype, precision))
    with on_device(x):
        return run(x, w1, b1, w2, b2)


def prefix_head_backward(grad_out, x, w1, w2, h, *, precision: str = "ieee"):
    """Returns (dx, dw1, db1, dw2, db2); grad_out is (M, O)."""
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    grad_out, x, w1, w2, h = contiguous((grad_out, x, w1, w2, h))
    run = _run_for(_BackwardRun, x, w1, w2, compiled_precision(x.dtype, precision))
    with on_device(x):
        return run(grad_out, x, w1, w2, h)
