"""How long a call takes: calibrated rounds, medians, interleaved providers, and the pytest-benchmark adapter.

Timing: ``loops`` calls per round (calibrated so a round lasts ``min_round_s``), ``repeats`` rounds after a warm-up
round; the per-call time of each round is kept, and the median is reported. On CUDA a round is bracketed by
synchronisations (and timed with CUDA events in :func:`time_fn`), since kernel launches are asynchronous.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class Bench:
    """What to time: ``fn()`` runs one call; ``setup_s`` is the build/compile time paid before the first call."""

    fn: Callable[[], Any]
    device: str
    setup_s: float = 0.0
    note: str = ""
    grad: bool = True  # the grad mode to time ``fn`` in; set once per round by the timers, not per call

    def grad_mode(self):
        """``torch.set_grad_enabled(self.grad)``: enter it around a whole timing loop.

        A ``with torch.no_grad()`` per call costs ~1 us on this CPU, a sixth of a cached ptfast call; real inference
        enters it once around many calls, so the timers do the same, for every provider alike.
        """
        return torch.set_grad_enabled(self.grad)


def round_target(fn: Callable[[], Any], loops: int, device: str) -> Callable[[], Any]:
    """For ``benchmark.pedantic(target, iterations=loops)``: ``fn``, plus a CUDA sync after every ``loops`` calls.

    pytest-benchmark reads its wall clock right after the last call of a round; without the sync that clock would
    stop while the GPU is still working.
    """
    if not device.startswith("cuda"):
        return fn
    count = [0]

    def target():
        fn()
        count[0] += 1
        if count[0] % loops == 0:
            torch.cuda.synchronize(device)

    return target


def _round_time(fn: Callable[[], Any], loops: int, device: str) -> float:
    """Seconds for ``loops`` calls of ``fn`` (CUDA events on CUDA)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(loops):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return time.perf_counter() - t0


def calibrate(fn: Callable[[], Any], device: str, min_round_s: float = 0.02, max_loops: int = 1 << 20) -> int:
    """Calls per round so that a round lasts at least ``min_round_s`` (timeit's rule, doubling from 1).

    Runs ``fn`` at least twice first (warm-up: allocator, autotuning, lazy init).
    """
    fn()
    fn()
    synchronize(device)
    loops = 1
    while True:
        t = _round_time(fn, loops, device)
        if t >= min_round_s or loops >= max_loops:
            break
        loops = min(max_loops, loops * 2 if t <= 0 else max(loops * 2, int(loops * min_round_s / t * 1.2)))
    return loops


@dataclass
class Timing:
    median_s: float
    q20_s: float
    q80_s: float
    loops: int
    repeats: int
    rounds_s: List[float] = field(default_factory=list)


def time_fn(fn: Callable[[], Any], device: str, repeats: int = 7, min_round_s: float = 0.02,
            loops: Optional[int] = None) -> Timing:
    """Median per-call time of ``fn`` over ``repeats`` rounds of ``loops`` calls (calibrated if not given)."""
    if loops is None:
        loops = calibrate(fn, device, min_round_s)
    _round_time(fn, loops, device)  # warm-up round
    per_call = sorted(_round_time(fn, loops, device) / loops for _ in range(repeats))
    q = statistics.quantiles(per_call, n=5, method="inclusive") if len(per_call) > 1 else per_call * 4
    return Timing(statistics.median(per_call), q[0], q[3], loops, repeats, per_call)


def time_interleaved(benches: Dict[str, "Bench"], device: str, repeats: int = 7,
                     min_round_s: float = 0.02) -> Dict[str, Timing]:
    """Like :func:`time_fn` for several providers of one case, with their rounds interleaved (round-robin).

    On a shared machine a burst of load then hits every provider alike, so the speedups stay stable even when the
    absolute times move.
    """
    loops = {}
    for name, b in benches.items():
        with b.grad_mode():
            loops[name] = calibrate(b.fn, device, min_round_s)
            _round_time(b.fn, loops[name], device)  # warm-up round
    per_call: Dict[str, List[float]] = {name: [] for name in benches}
    for _ in range(repeats):
        for name, b in benches.items():
            with b.grad_mode():
                per_call[name].append(_round_time(b.fn, loops[name], device) / loops[name])
    out = {}
    for name, times in per_call.items():
        times.sort()
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
        out[name] = Timing(statistics.median(times), q[0], q[3], loops[name], repeats, times)
    return out
