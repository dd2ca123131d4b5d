"""Host cost of the fused MLP head's Triton path, measured on a CPU-only machine.

    python -m ptfast.bench.host_cost [--shape 20x1024x128] [--rounds 15] [--hit-check auto|native|python] [--json OUT]

With the stand-in CUDA driver (:mod:`.stub_driver`) Triton's real launch path runs on CPU tensors: kernels compiled
for sm_90, Triton's C launcher, a ``cuLaunchKernelEx`` that only counts. So everything the CPU does for a call is
here -- the encoder's cache logic, the op wrapper, autograd, the launchers, Triton's launch -- and nothing the GPU
does. Times are thread CPU time per call (the minimum over interleaved rounds: load on a shared machine only adds),
reported as ratios to a cached hit of the same run, which is the load-robust number; absolute microseconds depend
on the CPU.

Rows:
  floor      a module whose forward only returns ``table.expand(B, -1, -1)``: the least any cached encoder can cost
  cached     ``PromptEncoder`` forward under no_grad, table cached (the unit of every ratio)
  uncached   the same right after a parameter's version counter moved (``increment_version``, no compute): what a
             forward costs after an optimizer step (the cache refreshes the table with the launch it prepared)
  full miss  the same after ``invalidate_cache()``: the whole computation (the module walk, the op's checks and
             choices, the launch plan lookup), what the first call after a structural change costs
  train      forward + backward with grad (``out.backward(g)``), the encoder's parameters requiring grad
  train floor the same step through an ``autograd.Function`` of the same parameters that launches nothing: its
             forward returns an empty table, its backward seven empty gradients (PyTorch's autograd alone)
  op fwd     ``fused_mlp_head`` on the embedding table, no_grad (the op layer and the launchers)
  launch fwd the forward launchers alone (``ptfast.kernels.mlp_head.mlp_head_forward``)
Launch counts come from the stub; the aten ops of a train step from a dispatch mode (on a GPU each one that
computes is another kernel). ``--hit-check``: the cache's hit check in C++ (``native``: the extension is built if
needed), in Python only (``python``), or whichever the process has (``auto``, the default: C++ where the extension
is loadable without a compile); the result names the one used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["measure", "main"]


def _thread_time_per_call(fn: Callable[[], object], calls: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(calls):
        fn()
    return (time.thread_time_ns() - t0) / calls / 1e3


def _time_interleaved(fns: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict[str, float]:
    """Minimum over ``rounds`` of the per-call thread CPU time (us) of each ``(callable, calls per round)``; every
    round runs every row once, so a machine that speeds up or slows down during the run affects all rows alike."""
    best = {name: float("inf") for name in fns}
    for fn, _ in fns.values():  # warm-up: compiles, first allocations, lazy imports
        _thread_time_per_call(fn, 3)
    for _ in range(rounds):
        for name, (fn, calls) in fns.items():
            best[name] = min(best[name], _thread_time_per_call(fn, calls))
    return best


def _aten_ops(fn: Callable[[], object]) -> list[str]:
    """The aten ops ``fn`` dispatches (views and metadata included), in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Log():
        fn()
    return seen


#: aten ops that neither compute nor allocate on a GPU (views, metadata, the autograd engine's own bookkeeping).
_FREE_OPS = {
    "view",
    "_unsafe_view",
    "expand",
    "unsqueeze",
    "squeeze",
    "t",
    "transpose",
    "as_strided",
    "detach",
    "alias",
    "reshape",
    "slice",
    "select",
    "permute",
    "is_same_size",
    "empty_like",
    "empty",
    "new_empty",
    "empty_strided",
    "new_empty_strided",
    "lift_fresh",
}


def measure(
    shape=(20, 1024, 128), *, batch: int = 1, rounds: int = 15, calls: int = 200, hit_check: str = "auto"
) -> dict:
    """Run every row under the stand-in driver; returns times (us), ratios to ``cached``, launches and aten ops."""
    from .. import native

    check_module = native.table_check_module
    if hit_check == "python":
        native.table_check_module = lambda: None  # restored at the end
    elif hit_check == "native" and not (native.native_available() and native.table_check_module()):
        raise RuntimeError(f"--hit-check native: the C++ extension is unavailable ({native.native_status()['error']})")
    try:
        return _measure(shape, batch, rounds, calls)
    finally:
        native.table_check_module = check_module


def _measure(shape, batch: int, rounds: int, calls: int) -> dict:
    import torch
    from torch import nn
    from torch.autograd.graph import increment_version

    from .. import PromptEncoder, PromptEncoderConfig
    from ..kernels.mlp_head import mlp_head_backward, mlp_head_forward
    from ..ops.mlp_head import fused_mlp_head
    from . import stub_driver

    M, D, H = shape
    torch.manual_seed(0)
    os.environ["PTFAST_BACKEND"] = "triton"
    encoder = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=M, token_dim=D, encoder_hidden_size=H))
    idx = torch.arange(M).unsqueeze(0).expand(batch, -1)
    l1, l2, l3 = encoder.mlp_head[0], encoder.mlp_head[2], encoder.mlp_head[4]
    weights = (l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias)
    x = encoder.embedding.weight
    grad = torch.randn(batch, M, D)

    class Floor(nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = table

        def forward(self, indices):
            return self.table.expand(indices.shape[0], -1, -1)

    floor = Floor(torch.randn(M, D))

    def cached():
        return encoder(idx)

    weight = encoder.embedding.weight

    def uncached():  # what an optimizer step leaves: a parameter's version counter moved on
        increment_version(weight)
        return encoder(idx)

    def full_miss():
        encoder.invalidate_cache()
        return encoder(idx)

    params = list(encoder.parameters())

    def train():
        for p in params:  # optimizer.zero_grad(): the backward writes fresh gradients, accumulates nothing
            p.grad = None
        with torch.enable_grad():
            encoder(idx).backward(grad)

    class _NoKernels(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            return torch.empty_like(tensors[0])

        @staticmethod
        def backward(ctx, grad_out):
            return tuple(torch.empty_like(p) for p in params)

    def train_floor():
        for p in params:
            p.grad = None
        with torch.enable_grad():
            table = _NoKernels.apply(*params)
            (table[None] if batch == 1 else table.expand(batch, -1, -1)).backward(grad)

    def op_fwd():
        return fused_mlp_head(x, *weights)

    wd = [w.detach() for w in weights]
    saved = []

    def launch_fwd():
        return mlp_head_forward(x, *weights, precision="tf32x3")

    def launch_bwd():
        return mlp_head_backward(grad[0], x, wd[0], wd[2], wd[4], saved[1], saved[2], precision="tf32x3")

    rows: dict[str, Callable[[], object]] = {
        "floor": lambda: floor(idx),
        "cached": cached,
        "uncached": uncached,
        "full miss": full_miss,
        "train": train,
        "train floor": train_floor,
        "op fwd": op_fwd,
        "launch fwd": launch_fwd,
        "launch bwd": launch_bwd,
    }
    # The train steps run a quarter of the calls (each costs 10-40 forwards); they set grad mode themselves.
    step_calls = max(1, calls // 4)
    timed = {k: (v, step_calls if k.startswith("train") else calls) for k, v in rows.items()}
    with stub_driver.active() as launches:
        with torch.no_grad():
            saved.extend(mlp_head_forward(x.detach(), *wd, precision="tf32x3"))
            times = _time_interleaved(timed, rounds)
        with torch.no_grad():
            start = launches.count
            uncached()
            fwd_launches = launches.count - start
            fwd_last = launches.last()
        start = launches.count
        train()
        train_launches = launches.count - start
        ops = _aten_ops(train)
    unit = times["cached"]
    computing = [op for op in ops if op not in _FREE_OPS]
    return {
        "shape": list(shape),
        "batch": batch,
        "rounds": rounds,
        "calls": calls,
        "times_us": times,
        "ratios": {k: v / unit for k, v in times.items()},
        "launches": {"uncached forward": fwd_launches, "train step": train_launches},
        "forward last launch": {"grid": list(fwd_last[0]), "threads": fwd_last[1], "cooperative": fwd_last[2]},
        "train step aten ops": dict(Counter(computing)),
        "hit check": "python" if encoder._cache.entry.native is None else "native",
    }


def _format(result: dict) -> str:
    lines = [
        f"host cost, shape {'x'.join(map(str, result['shape']))} fp32, B={result['batch']} "
        f"(thread CPU time, min of {result['rounds']} interleaved rounds; ratio = row / cached; "
        f"hit check: {result['hit check']})"
    ]
    for name, us in result["times_us"].items():
        lines.append(f"  {name:<11} {us:9.2f} us  {result['ratios'][name]:7.2f}x")
    lines.append(f"  launches: {result['launches']}; forward's last launch {result['forward last launch']}")
    lines.append(f"  aten ops of a train step that compute or allocate: {result['train step aten ops']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptfast.bench.host_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="20x1024x128", help="MxDxH (default: the seed shape)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument(
        "--hit-check", choices=("auto", "native", "python"), default="auto", help="the cache's hit check (see above)"
    )
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--shape must be MxDxH with positive integers, got {args.shape!r}")
    if min(args.batch, args.rounds, args.calls) < 1:
        parser.error("--batch, --rounds and --calls must be positive")
    from . import stub_driver

    if not stub_driver.available():
        print(f"ptfast: error: {stub_driver.unavailable_reason()}", file=sys.stderr)
        return 2
    result = measure(shape, batch=args.batch, rounds=args.rounds, calls=args.calls, hit_check=args.hit_check)
    print(_format(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
