"""Launch plumbing shared by the kernels: the epilogue type, launch plans, allocation, split-K counters, device.

A ``Launch`` is what a launcher decided (kernel, grid, compile-time constants, warps, stages) plus what the
launch costs (HBM bytes, multiply-adds). The launchers build one and run it; ``ptfast.kernels.audit`` builds the
same ones from shapes alone, so the cost model always audits what the dispatcher picks.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch


class Epilogue(NamedTuple):
    """What the GEMM kernel applies to each output element before the cast.

    bias: ``+ bias[n]``; relu: ``max(., 0)`` keeping NaN (``torch.relu``); mask: the ReLU backward
    ``0 if ref[m, n] <= 0 else .`` (``threshold_backward``: NaN in ``ref`` lets the gradient through); tanh:
    ``tanh(.)``; tanh_grad: the tanh backward ``. * (1 - ref[m, n]^2)`` (``tanh_backward`` of the saved output).
    """

    bias: bool = False
    relu: bool = False
    mask: bool = False
    tanh: bool = False
    tanh_grad: bool = False


#: Every (weight-transposed, epilogue) pair ``_linear_kernel`` is launched with (the forward's layers), and every
#: mask flag of ``_bwd_kernel`` (the backward's layers: masked for layers 3 and 2, plain for dx); the compile test
#: builds exactly these.
FWD_HIDDEN = (False, Epilogue(bias=True, relu=True))
FWD_OUT = (False, Epilogue(bias=True))
FWD_TANH = (False, Epilogue(bias=True, tanh=True))  # the prefix-tuning head's hidden layer
LINEAR_VARIANTS = (FWD_HIDDEN, FWD_OUT, FWD_TANH)
#: ``linear_dw_plan`` keyword sets: the ReLU head's masked layers and its dx layer, the prefix head's tanh layer.
BWD_EPILOGUES = (dict(mask=True), dict(mask=False), dict(mask=False, tanh_grad=True))


class Launch(NamedTuple):
    kernel: str  # attribute name in ptfast.kernels (module-qualified: "linear._linear_kernel")
    grid: tuple[int, ...]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    hbm_bytes: int  # compulsory DRAM traffic of this launch (every operand and output once, plus split-K partials)
    macs: int  # multiply-adds the launch executes, padding included
    useful_macs: int  # multiply-adds of the math it delivers, without padding or recomputation
    iters: int  # main-loop iterations per program
    parts: tuple = ()  # a launch running programs of several plans (the backward's GEMM + dW): those plans

    @property
    def ctas(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SMS: dict[torch.device, int] = {}


def num_sms(device: torch.device) -> int:
    """SMs of ``device`` (read once per device: the properties call costs microseconds)."""
    sms = _SMS.get(device)
    if sms is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        _SMS[device] = sms  # off CUDA (the interpreter, the stand-in driver) an H100 SXM's count shapes the grid
    return sms


def current_stream(device: torch.device) -> int:
    """The raw handle of ``device``'s current stream (0 off CUDA): the launch goes there, and buffers reused across
    launches (counters) are kept per stream."""
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


def _no_stream() -> int:
    return 0


def stream_getter(device: torch.device):
    """``current_stream(device)`` as a function of no arguments, for a launcher that runs on one device: the
    device's type and index are looked at once."""
    if device.type != "cuda":
        return _no_stream
    return functools.partial(
        torch._C._cuda_getCurrentRawStream, device.index if device.index is not None else torch.cuda.current_device()
    )


def contiguous(tensors) -> list:
    """The launchers' inputs, each as is when already contiguous (the common case: no copy, no dispatch)."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def alloc(shape, dtype, device):
    """Every output/workspace allocation goes through here or ``alloc_like`` (tests poison both with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def alloc_like(t: torch.Tensor) -> torch.Tensor:
    """An output with ``t``'s shape, dtype and device, ``t`` contiguous: cheaper than ``alloc``, which has a shape,
    dtype and device to parse."""
    return torch.empty_like(t)


_COUNTERS: dict[tuple, torch.Tensor] = {}
# Buffers replaced by a larger one stay alive: a captured CUDA graph may still point at them.
_RETIRED: list = []


def split_counters(device: torch.device, n: int, stream: int = None) -> torch.Tensor:
    """Zeroed int32 ticket counters for ``n`` output tiles, reused across launches.

    The reducing program of each tile resets its counter to 0, so the buffer is zero again when the launch ends.
    One buffer per (device, stream): launches on one stream run one after another, so they never share a counter
    while it is live.
    """
    key = (device, current_stream(device) if stream is None else stream, "split")
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


_SCRATCH: dict[tuple, tuple] = {}


def scratch(device: torch.device, stream: int, specs: tuple) -> tuple:
    """Flat scratch tensors ``((numel, dtype), ...)`` that only live inside one launch (split-K partials, the
    one-launch backward's g1/g2), kept per (device, stream, specs) and reused by the next launch: a stream runs its
    launches one after another, so they never share them while live, and a captured CUDA graph keeps pointing at
    memory that stays allocated. Never for a value that one launch leaves for the next: another thread may launch
    on the same stream in between. Saves an allocation per buffer and call."""
    key = (device, stream, specs)
    bufs = _SCRATCH.get(key)
    if bufs is None:
        bufs = _SCRATCH[key] = tuple(alloc((max(n, 1),), dt, device) for n, dt in specs)
    return bufs


_NO_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def no_workspace(device: torch.device) -> torch.Tensor:
    """The fp32 workspace argument of a launch without split-K (never read or written; fp32 so that the same
    binary serves both cases)."""
    buf = _NO_WORKSPACE.get(device)
    if buf is None:
        buf = _NO_WORKSPACE[device] = torch.zeros(4, dtype=torch.float32, device=device)
    return buf


def barrier_counters(device: torch.device, stream: int) -> torch.Tensor:
    """The two zeroed int32 counters of a grid barrier (arrivals, exits); the kernel zeroes them as it ends."""
    key = (device, stream, "barrier")
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = torch.zeros(2, dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def on_device(t: torch.Tensor):
    """Make ``t``'s CUDA device current: Triton launches on the current device, not on the tensors' device."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
