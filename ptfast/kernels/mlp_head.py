"""Launchers of the P-tuning MLP head: which kernels run, in which order, with which plan.

    out = relu(relu(x @ w1.T + b1) @ w2.T + b2) @ w3.T + b3        x (M, D), w1 (H, D), w2 (H, H), w3 (D, H)

Small H (<= 256) and M <= 32 (the seed shape 20x1024x128): one launch forward and one backward
(``mlp_head_fused.py``: persistent programs, a grid barrier between layers); under the interpreter the same kernels
run one launch per phase. Small H with more rows: layer 1 as a split-K GEMM (``linear.py``), then layers 2+3 fused
(``mlp_head_small.py``), and three backward launches. Larger H: 3 launches each way, one split-K GEMM per layer
forward, one ``_bwd_kernel`` per layer backward. Every split-K reduction happens inside its GEMM launch,
deterministically.
``forward_plan`` / ``backward_plan`` are what the launchers run, and what ``python -m ptfast.kernels.audit`` costs.

The host path is part of the design: what a call launches is planned once per (shape, dtype, precision, device,
test settings) and kept (``_RUNS``); a call then allocates its outputs and hands the arguments to compiled
kernels (``launch.Launcher``).

Launchers expect validated, same-device, same-dtype tensors (fp32 / fp16 / bf16; any layout: non-contiguous ones
are copied) and a kernel precision string ("ieee", "tf32", "tf32x3"; ignored for 16-bit inputs), chosen by
``ptfast.ops.mlp_head``. Test knobs (``ptfast/_env.py``): ``PTFAST_MLP_HEAD_PATH=small|large``,
``PTFAST_MLP_HEAD_SPLIT_K=<int>``. Design notes and the cost model: docs/design.md, "Kernels".
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _env
from . import common
from .common import FWD_HIDDEN, FWD_OUT, Epilogue, Launch, cdiv, contiguous, num_sms, on_device  # noqa: F401
from .launch import BoundLaunch, Launcher
from .linear import _bwd_kernel, _linear_kernel, linear, linear_dw_plan, linear_plan, split_args  # noqa: F401
from .mlp_head_fused import _bwd_kernel3, _fwd_kernel, fused_backward_plan, fused_forward_plan
from .mlp_head_small import SMALL_MAX_H, _head23_kernel, head23_plan, small_max_h  # noqa: F401

__all__ = [
    "mlp_head_forward",
    "mlp_head_backward",
    "bind_forward",
    "bind_backward",
    "forward_plan",
    "backward_plan",
    "use_small_path",
    "compiled_precision",
]


def compiled_precision(dtype, precision: str) -> str:
    """The precision a binary is compiled with: ``precision`` for fp32; 16-bit dots ignore input_precision, so one
    variant ("ieee") for them. (``ptfast.ops.mlp_head.kernel_precision`` maps a user's request to ``precision``.)"""
    return precision if dtype == torch.float32 else "ieee"


def use_small_path(H: int, dtype=torch.float32, precision: str = "tf32x3") -> bool:
    """The fused one-launch kernels when h1/h2 rows fit on chip (the kernel rereads w2 from L2 per program)."""
    return _path(H, dtype, compiled_precision(dtype, precision)) == "small"


def _path(H, dtype, precision) -> str:
    fits = H <= small_max_h(dtype, precision)
    forced = _env.mlp_head_forced_path()
    if forced == "small" and not fits:  # a test that forces a path must run that path, not silently another
        raise ValueError(
            f"PTFAST_MLP_HEAD_PATH=small, but H={H} exceeds the small path's limit "
            f"{small_max_h(dtype, precision)} for {dtype} / {precision}"
        )
    return forced or ("small" if fits else "large")


#: The one-launch kernels hold both phases' tiles in one binary. It spills (fp32, sm_90 compile sweep) with 64-row
#: GEMM tiles (M > 32), and without the divisibility hints Triton adds for sizes that are multiples of 16 (D, H of
#: 1000 or 129: more address registers); there the small path is two launches forward and three backward.
FUSED_MAX_M = 32


def _fused(M, D, H, dtype, p) -> bool:
    return M <= FUSED_MAX_M and D % 16 == 0 and H % 16 == 0 and _path(H, dtype, p) == "small"


def forward_plan(M, D, H, *, dtype, precision: str, sms: int = 132) -> list[Launch]:
    p = compiled_precision(dtype, precision)
    l1 = linear_plan(M, H, D, w_t=False, epilogue=FWD_HIDDEN[1], dtype=dtype, precision=p, sms=sms)
    if _path(H, dtype, p) == "small":
        h23 = head23_plan(M, D, H, dtype=dtype, precision=p)
        if not _fused(M, D, H, dtype, p):
            return [l1, h23]
        return [fused_forward_plan(l1, h23, sms=sms, fma_dot=dtype == torch.float32 and p == "ieee")]
    return [
        l1,
        linear_plan(M, H, H, w_t=False, epilogue=FWD_HIDDEN[1], dtype=dtype, precision=p, sms=sms),
        linear_plan(M, D, H, w_t=False, epilogue=FWD_OUT[1], dtype=dtype, precision=p, sms=sms),
    ]


def _backward_layers(M, D, H, dtype, p, sms) -> list[Launch]:
    return [
        linear_dw_plan(M, H, D, mask=True, dtype=dtype, precision=p, sms=sms),  # g2, dw3, db3
        linear_dw_plan(M, H, H, mask=True, dtype=dtype, precision=p, sms=sms),  # g1, dw2, db2
        linear_dw_plan(M, D, H, mask=False, dtype=dtype, precision=p, sms=sms),  # dx, dw1, db1
    ]


def backward_plan(M, D, H, *, dtype, precision: str, sms: int = 132) -> list[Launch]:
    p = compiled_precision(dtype, precision)
    layers = _backward_layers(M, D, H, dtype, p, sms)
    if _fused(M, D, H, dtype, p):
        return [fused_backward_plan(layers, sms=sms)]
    return layers


# ------------------------------------------------------------------------------------------------ runs
def _interpreted() -> bool:
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def _launchers(fn, plan: Launch, n_phases: int) -> list[Launcher]:
    """One cooperative launch of every phase on a GPU; under the interpreter one launch per phase."""
    opts = dict(num_warps=plan.num_warps, num_stages=plan.num_stages)
    if not _interpreted():
        return [Launcher(fn, plan.grid, plan.constexprs, cooperative=True, **opts)]
    return [Launcher(fn, plan.grid, dict(plan.constexprs, PHASE=ph), **opts) for ph in range(1, n_phases + 1)]


class _ForwardBuffers(NamedTuple):
    """What a forward launch on one stream reuses (see ``_ForwardRun._buffers``)."""

    ws: torch.Tensor
    cnt: torch.Tensor
    bar: torch.Tensor | None
    h1: torch.Tensor | None
    h2: torch.Tensor | None


class _BackwardBuffers(NamedTuple):
    """What a backward launch on one stream reuses (see ``_BackwardRun._buffers``)."""

    g1: torch.Tensor | None
    g2: torch.Tensor | None
    ws: torch.Tensor
    cnt: torch.Tensor
    bar: torch.Tensor | None


class _ForwardRun:
    """What a forward at one (M, D, H, dtype, precision, device, settings) launches, planned once."""

    def __init__(self, M, D, H, dtype, precision, device):
        self.M, self.D, self.H, self.dtype, self.device = M, D, H, dtype, device
        plans = forward_plan(M, D, H, dtype=dtype, precision=precision, sms=num_sms(device))
        self.fused = len(plans) == 1
        self.head23 = None
        if len(plans) == 2:  # layer 1, then layers 2+3 in one launch
            h23 = plans[1]
            self.head23 = Launcher(
                _head23_kernel, h23.grid, h23.constexprs, num_warps=h23.num_warps, num_stages=h23.num_stages
            )
            plans = plans[:1]
        if self.fused:
            l1, h23 = plans[0].parts
            kps, split = split_args(l1, D)
            self.launchers = _launchers(_fwd_kernel, plans[0], 2)
            self.scalars = (M, D, H, kps, split, l1.grid[0], l1.grid[1], l1.ctas, h23.grid[1], h23.ctas)
            self.ws_numel = split * M * H if split > 1 else 0
            self.n_counters = l1.grid[0] * l1.grid[1]
        else:  # three split-K GEMMs: (K, splits, counters) per layer
            self.layers = []
            for plan, K in zip(plans, (D, H, H)):  # with head23: layer 1 only
                kps, split = split_args(plan, K)
                c = plan.constexprs
                launcher = Launcher(_linear_kernel, plan.grid, c, num_warps=plan.num_warps, num_stages=plan.num_stages)
                self.layers.append((launcher, K, kps, split))
            self.ws_numel = max(
                split * M * (D if i == 2 else H) if split > 1 else 0 for i, (_, _, _, split) in enumerate(self.layers)
            )
            self.n_counters = max(p.grid[0] * p.grid[1] for p in plans)
        self.per_stream: dict[int, tuple] = {}  # stream -> buffers
        self.current_stream = common.stream_getter(device)
        # h1 / h2 are allocated like this template (``alloc_like``: no shape, dtype and device to parse)
        self.like_h = common.alloc((M, H), dtype, device)
        # Only one launch may keep h1 / h2 it does not return in per-stream scratch: between two launches (the
        # interpreter's phases, the per-layer kernels) another thread's launch on the stream could reuse it.
        self.activations_in_scratch = self.fused and len(self.launchers) == 1

    def _buffers(self, stream: int) -> tuple:
        """The buffers a launch on ``stream`` reuses (split-K counters, workspace, grid barrier, and for the one
        launch also h1 / h2 of a call that does not keep them), looked up once per stream."""
        device, M, H = self.device, self.M, self.H
        cnt = common.split_counters(device, self.n_counters, stream)
        if self.ws_numel:
            ws = common.scratch(device, stream, ((self.ws_numel, torch.float32),))[0]
        else:
            ws = common.no_workspace(device)
        bar = common.barrier_counters(device, stream) if self.fused else None
        h1 = h2 = None
        if self.activations_in_scratch:  # they live inside the one launch when nobody keeps them
            h1, h2 = common.scratch(device, stream, ((M * H, self.dtype), (M * H, self.dtype)))
        bufs = self.per_stream[stream] = _ForwardBuffers(ws, cnt, bar, h1, h2)
        return bufs

    def bind(self, x, w1, b1, w2, b2, w3, b3) -> _BoundForward | None:
        """A forward of these tensors as one prepared launch (``_BoundForward``); None unless the forward is one
        launch that already launches directly, with h1 / h2 in scratch where nobody keeps them."""
        if not self.activations_in_scratch or self.M == 0:
            return None
        stream = self.current_stream()
        ws, cnt, bar, h1, h2 = self.per_stream.get(stream) or self._buffers(stream)
        # x stands in for ``out``, whose address every launch puts in (_BoundForward.OUT)
        tensors = (x, w1, b1, w2, b2, w3, b3, x, h1, h2, ws, cnt, bar)
        launch = self.launchers[0].bind((*tensors, *self.scalars))
        if launch is None:
            return None
        # out is allocated like a detached alias of x: its shape and dtype stay the bound ones whatever is later
        # assigned to x.data
        storages = [t.untyped_storage() for t in tensors]
        return _BoundForward(launch, stream, self.current_stream, x.detach(), self.like_h, storages)

    def __call__(self, x, w1, b1, w2, b2, w3, b3, keep_activations: bool = True):
        """``x`` (M, D) contiguous. Returns (out, h1, h2); h1 / h2 are None unless ``keep_activations``."""
        M, H = self.M, self.H
        out = common.alloc_like(x)
        if M == 0:
            if not keep_activations:
                return out, None, None
            return out, common.alloc_like(self.like_h), common.alloc_like(self.like_h)
        stream = self.current_stream()
        ws, cnt, bar, h1, h2 = self.per_stream.get(stream) or self._buffers(stream)
        if keep_activations or not self.activations_in_scratch:
            h1, h2 = common.alloc_like(self.like_h), common.alloc_like(self.like_h)
        if self.fused:
            for launch in self.launchers:
                launch(x, w1, b1, w2, b2, w3, b3, out, h1, h2, ws, cnt, bar, *self.scalars)
        else:
            D = self.D
            for (launch, K, kps, split), (a, w, b, c, N) in zip(
                self.layers, ((x, w1, b1, h1, H), (h1, w2, b2, h2, H), (h2, w3, b3, out, D))
            ):
                launch(a, w, b, c, c, ws, cnt, M, N, K, kps, split)
            if self.head23 is not None:
                self.head23(h1, w2, b2, w3, b3, out, h2, M, D, H)
        if keep_activations:
            return out, h1, h2
        return out, None, None


class _BoundForward:
    """A forward with its tensors fixed (``_ForwardRun.bind``): ``bound()`` launches the one kernel on their current
    values into a new ``out`` (h1 / h2 in the stream's scratch), ``bound.with_activations()`` into new ``out``, h1
    and h2 (what a train step saves for the backward); either returns None, launching nothing, where that would not
    be the launch the run makes (another stream or device, a launch hook installed): then call the run.

    It holds the storages of the bound tensors, so the addresses it launches with stay valid memory; that they
    still are the caller's tensors, with the same shapes and strides, is the caller's to know."""

    OUT = 7  # the slot of ``out`` among the forward kernel's arguments; h1 and h2 follow it
    WITH_ACTIVATIONS = (7, 8, 9)

    __slots__ = ("launch", "stream", "current_stream", "like_out", "like_h", "storages")

    def __init__(self, launch, stream: int, current_stream, like_out: torch.Tensor, like_h: torch.Tensor, storages):
        self.launch, self.stream, self.current_stream = launch, stream, current_stream
        self.like_out, self.like_h, self.storages = like_out, like_h, storages

    def __call__(self) -> torch.Tensor | None:
        stream = self.current_stream()
        if stream != self.stream:  # the bound scratch buffers (h1 / h2, counters, barrier) are this stream's
            return None
        out = common.alloc_like(self.like_out)
        return out if self.launch.launch_with((self.OUT,), (out.data_ptr(),), stream) else None

    def with_activations(self) -> tuple | None:
        """``(out, h1, h2)``, or None (nothing launched)."""
        stream = self.current_stream()
        if stream != self.stream:  # the bound counters and barrier are this stream's
            return None
        out, h1, h2 = common.alloc_like(self.like_out), common.alloc_like(self.like_h), common.alloc_like(self.like_h)
        addresses = (out.data_ptr(), h1.data_ptr(), h2.data_ptr())
        return (out, h1, h2) if self.launch.launch_with(self.WITH_ACTIVATIONS, addresses, stream) else None


class _BackwardRun:
    """What a backward at one (M, D, H, dtype, precision, device, settings) launches, planned once."""

    def __init__(self, M, D, H, dtype, precision, device):
        self.M, self.D, self.H, self.dtype, self.device = M, D, H, dtype, device
        plans = backward_plan(M, D, H, dtype=dtype, precision=precision, sms=num_sms(device))
        self.fused = len(plans) == 1
        layers = plans[0].parts if self.fused else plans
        self.layer_args = []  # per layer (3, 2, 1): K per split, splits, GEMM grid N x M, dW grid width, tiles
        for plan, K in zip(layers, (D, H, H)):
            lin, dwp = plan.parts
            kps, split = split_args(lin, K)
            self.layer_args.append((kps, split, lin.grid[0], lin.grid[1], dwp.grid[0], plan.ctas))
        self.ws_numel = max(a[1] * M * N if a[1] > 1 else 0 for a, N in zip(self.layer_args, (H, H, D)))
        self.n_counters = max(a[2] * a[3] for a in self.layer_args)
        self.per_stream: dict[int, tuple] = {}  # stream -> buffers
        self.current_stream = common.stream_getter(device)
        # Bias gradients are allocated like these (``alloc_like``: no shape, dtype and device to parse; a train step
        # allocates seven gradients).
        self.like_hidden_bias, self.like_out_bias = common.alloc((H,), dtype, device), common.alloc((D,), dtype, device)
        if self.fused:
            self.launchers = _launchers(_bwd_kernel3, plans[0], 3)
            self.scalars = (M, D, H) + tuple(v for a in self.layer_args for v in a)
        else:
            self.launchers = [
                Launcher(_bwd_kernel, p.grid, p.constexprs, num_warps=p.num_warps, num_stages=p.num_stages)
                for p in plans
            ]
        # g1 / g2 in per-stream scratch only inside one launch (see _ForwardRun.activations_in_scratch)
        self.activations_in_scratch = self.fused and len(self.launchers) == 1

    def _buffers(self, stream: int) -> tuple:
        """What a launch on ``stream`` reuses (workspace, split-K counters, grid barrier, and for the one launch
        g1 / g2, which live inside it), looked up once per stream."""
        device, M, H, dt = self.device, self.M, self.H, self.dtype
        bar = common.barrier_counters(device, stream) if self.fused else None
        if self.activations_in_scratch:
            g1, g2, ws = common.scratch(device, stream, ((M * H, dt), (M * H, dt), (self.ws_numel, torch.float32)))
        else:
            g1 = g2 = None
            ws = common.scratch(device, stream, ((self.ws_numel, torch.float32),))[0]
        if not self.ws_numel:
            ws = common.no_workspace(device)
        cnt = common.split_counters(device, self.n_counters, stream)
        bufs = self.per_stream[stream] = _BackwardBuffers(g1, g2, ws, cnt, bar)
        return bufs

    def bind(self, x, w1, w2, w3) -> _BoundBackward | None:
        """A backward through these tensors as one prepared launch (``_BoundBackward``); None unless the backward is
        one launch that already launches directly."""
        if not self.activations_in_scratch or self.M == 0:
            return None
        stream = self.current_stream()
        g1, g2, ws, cnt, bar = self.per_stream.get(stream) or self._buffers(stream)
        # x stands in for what every launch puts in (_BoundBackward.SWAPPED): dy, h1, h2 and the seven gradients
        tensors = (x, x, w1, w2, w3, x, x, g1, g2, x, x, x, x, x, x, x, ws, cnt, bar)
        launch = self.launchers[0].bind((*tensors, *self.scalars))
        if launch is None:
            return None
        likes = (x, w1, self.like_hidden_bias, w2, self.like_hidden_bias, w3, self.like_out_bias)
        storages = [t.untyped_storage() for t in tensors]
        return _BoundBackward(launch, stream, self.current_stream, tuple(t.detach() for t in likes), storages)

    def __call__(self, dy, x, w1, w2, w3, h1, h2):
        """Every tensor contiguous; the weight gradients take the weights' dtype, dx x's."""
        M, D, H, device = self.M, self.D, self.H, self.device
        dx = common.alloc_like(x)
        dw1, db1 = common.alloc_like(w1), common.alloc_like(self.like_hidden_bias)
        dw2, db2 = common.alloc_like(w2), common.alloc_like(self.like_hidden_bias)
        dw3, db3 = common.alloc_like(w3), common.alloc_like(self.like_out_bias)
        if M == 0:
            for t in (dw1, db1, dw2, db2, dw3, db3):
                t.zero_()
            return dx, dw1, db1, dw2, db2, dw3, db3
        stream = self.current_stream()
        g1, g2, ws, cnt, bar = self.per_stream.get(stream) or self._buffers(stream)
        if not self.activations_in_scratch:  # g1 / g2 cross launches: their own memory (another thread's launch on
            # this stream could come in between and use a shared buffer)
            g1, g2 = common.alloc((M, H), self.dtype, device), common.alloc((M, H), self.dtype, device)
        if self.fused:
            for launch in self.launchers:
                launch(dy, x, w1, w2, w3, h1, h2, g1, g2, dx, dw1, db1, dw2, db2, dw3, db3, ws, cnt, bar, *self.scalars)
        else:
            layers = (
                (dy, w3, h2, g2, dw3, db3, H, D),
                (g2, w2, h1, g1, dw2, db2, H, H),
                (g1, w1, x, dx, dw1, db1, D, H),
            )
            for launch, (g, w, act, c, dw, db, N, K), (kps, split, gn, gm, dgn, _) in zip(
                self.launchers, layers, self.layer_args
            ):
                launch(g, w, act, c, ws, cnt, dw, db, M, N, K, kps, split, gn, gm, dgn)
        return dx, dw1, db1, dw2, db2, dw3, db3


class _BoundBackward:
    """A backward with x and the weights fixed (``_BackwardRun.bind``): ``bound(dy, h1, h2)`` allocates the seven
    gradients and launches the one kernel, or returns None, launching nothing, where that would not be the launch
    the run makes (another stream or device, a launch hook installed, a ``dy``, h1 or h2 that is not contiguous, not
    16-byte aligned or not of x's dtype): then call the run. Like ``_BoundForward``, it holds the bound tensors'
    storages."""

    # dy, h1, h2, then dx, dw1, db1, dw2, db2, dw3, db3 among the backward kernel's arguments
    SWAPPED = (0, 5, 6, 9, 10, 11, 12, 13, 14, 15)

    __slots__ = ("launch", "stream", "current_stream", "likes", "dtype", "storages")

    def __init__(self, launch: BoundLaunch, stream: int, current_stream, likes: tuple, storages: list):
        self.launch, self.stream, self.current_stream = launch, stream, current_stream
        self.likes, self.dtype, self.storages = likes, likes[0].dtype, storages

    def __call__(self, dy, h1, h2) -> tuple | None:
        stream, dtype = self.current_stream(), self.dtype
        if stream != self.stream or dy.dtype != dtype or h1.dtype != dtype or h2.dtype != dtype:
            return None
        # The binary was compiled for 16-byte aligned pointers (a gradient may be a view at any offset), and h1 / h2
        # come back from saved-tensor hooks as those make them
        inputs = (dy.data_ptr(), h1.data_ptr(), h2.data_ptr())
        if (inputs[0] | inputs[1] | inputs[2]) % 16 or not (
            dy.is_contiguous() and h1.is_contiguous() and h2.is_contiguous()
        ):
            return None
        grads = tuple(map(common.alloc_like, self.likes))
        addresses = (*inputs, *[g.data_ptr() for g in grads])
        return grads if self.launch.launch_with(self.SWAPPED, addresses, stream) else None


_RUNS: dict[tuple, object] = {}


def _run_for(cls, M, D, H, dtype, precision, device):
    key = (cls, M, D, H, dtype, precision, device, _env.kernel_settings_key())
    run = _RUNS.get(key)
    if run is None:
        run = _RUNS[key] = cls(M, D, H, dtype, precision, device)
    return run


def mlp_head_forward(x, w1, b1, w2, b2, w3, b3, *, precision: str = "ieee", keep_activations: bool = True):
    """x (M, D). Returns (out (M, D), h1 (M, H), h2 (M, H)); h1 / h2 are the post-ReLU activations, which the
    backward needs; without ``keep_activations`` they are None (and on the one-launch path never allocated)."""
    x, w1, b1, w2, b2, w3, b3 = contiguous((x, w1, b1, w2, b2, w3, b3))
    M, D = x.shape
    run = _run_for(_ForwardRun, M, D, w1.shape[0], x.dtype, compiled_precision(x.dtype, precision), x.device)
    with on_device(x):
        return run(x, w1, b1, w2, b2, w3, b3, keep_activations)


def bind_forward(x, w1, b1, w2, b2, w3, b3, *, precision: str) -> _BoundForward | None:
    """``mlp_head_forward(x, ..., keep_activations=False)`` prepared once for repeated calls on these same tensors
    (``_BoundForward``); None where that is not one directly launched kernel (the interpreter, larger shapes,
    before the first launch) or a tensor is not contiguous (the launch would read a copy)."""
    tensors = (x, w1, b1, w2, b2, w3, b3)
    if not all(t.is_contiguous() for t in tensors):
        return None
    M, D = x.shape
    run = _run_for(_ForwardRun, M, D, w1.shape[0], x.dtype, compiled_precision(x.dtype, precision), x.device)
    with on_device(x):
        return run.bind(*tensors)


def bind_backward(x, w1, w2, w3, *, precision: str) -> _BoundBackward | None:
    """``mlp_head_backward(dy, x, w1, w2, w3, h1, h2)`` prepared once for repeated calls through these same x and
    weights (``_BoundBackward``); None where that is not one directly launched kernel or a tensor is not
    contiguous."""
    if not all(t.is_contiguous() for t in (x, w1, w2, w3)):
        return None
    M, D = x.shape
    run = _run_for(_BackwardRun, M, D, w1.shape[0], x.dtype, compiled_precision(x.dtype, precision), x.device)
    with on_device(x):
        return run.bind(x, w1, w2, w3)


def mlp_head_backward(grad_out, x, w1, w2, w3, h1, h2, *, precision: str = "ieee"):
    """Returns (dx, dw1, db1, dw2, db2, dw3, db3); x / grad_out are (M, D)."""
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    grad_out, x, w1, w2, w3, h1, h2 = contiguous((grad_out, x, w1, w2, w3, h1, h2))
    M, D = x.shape
    run = _run_for(_BackwardRun, M, D, w1.shape[0], x.dtype, compiled_precision(x.dtype, precision), x.device)
    with on_device(x):
        return run(grad_out, x, w1, w2, w3, h1, h2)
