"""The one timer of ptfast's benchmarks: calibrated rounds, interleaved across the things compared, median per call.

* :func:`calibrate`: calls per round, doubled from 1 until a round lasts ``min_round_s`` (timeit's rule), after two
  warm-up calls (allocator, autotuning, lazy init). A cached ptfast call takes a few microseconds, so a per-call
  clock would mostly measure itself; rounds of many calls remove that.
* :func:`time_interleaved`: one warm-up round each, then ``repeats`` rounds, round-robin over the callables, so a
  burst of load on a shared machine hits them all alike. The per-call time of each round is kept; the median is
  reported (q20/q80 and the fastest round too).
* A round is timed with CUDA events on CUDA (kernel launches are asynchronous), ``time.perf_counter`` on CPU.
* Under pytest, :func:`pytest_benchmark` hands the same rounds to pytest-benchmark (its clock and statistics):
  the same calibration, a warm-up round, ``repeats`` rounds of ``loops`` calls, each round closed by a CUDA sync.

Used by ``python -m ptfast`` (through :mod:`.runner`), ``benchmarks/test_bench_encoder.py`` and
``benchmarks/patched_model.py``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    #: The grad mode to time ``fn`` in, set once per round by the timer, not per call; None leaves it as it is.
    grad: bool | None = True

    def grad_mode(self):
        """``torch.set_grad_enabled(self.grad)``: enter it around a whole timing loop.

        A ``with torch.no_grad()`` per call costs a sizeable fraction of a cached ptfast call; real inference enters
        it once around many calls, so the timers do the same, for every provider alike.
        """
        return contextlib.nullcontext() if self.grad is None else torch.set_grad_enabled(self.grad)


Timed = Bench | Callable[[], Any]


def _as_bench(item: Timed, device: str) -> Bench:
    return item if isinstance(item, Bench) else Bench(fn=item, device=device, grad=None)


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
    """Per-call seconds: the median, 20th and 80th percentiles of the rounds, and every round's (sorted)."""

    median_s: float
    q20_s: float
    q80_s: float
    loops: int
    repeats: int
    rounds_s: list[float] = field(default_factory=list)

    @property
    def min_s(self) -> float:
        return self.rounds_s[0]


def _timing(per_call: list[float], loops: int) -> Timing:
    per_call = sorted(per_call)
    q = statistics.quantiles(per_call, n=5, method="inclusive") if len(per_call) > 1 else per_call * 4
    return Timing(statistics.median(per_call), q[0], q[3], loops, len(per_call), per_call)


def time_interleaved(
    benches: Mapping[str, Timed],
    device: str,
    repeats: int = 7,
    min_round_s: float = 0.02,
    loops: Mapping[str, int] | None = None,
) -> dict[str, Timing]:
    """Median per-call time of each callable, their rounds interleaved (round-robin).

    Args:
        benches: name -> :class:`Bench` (timed in its grad mode) or a plain callable (timed as it is).
        device: ``"cpu"`` or ``"cuda[:N]"``: how a round is clocked.
        repeats: timed rounds per callable, after one warm-up round each.
        min_round_s: the shortest round :func:`calibrate` aims for.
        loops: calls per round by name, instead of calibrating.

    On a shared machine a burst of load hits every callable alike, so the ratios stay stable even when the absolute
    times move.
    """
    items = {name: _as_bench(b, device) for name, b in benches.items()}
    n_loops = dict(loops or {})
    for name, b in items.items():
        with b.grad_mode():
            if name not in n_loops:
                n_loops[name] = calibrate(b.fn, device, min_round_s)
            _round_time(b.fn, n_loops[name], device)  # warm-up round
    per_call: dict[str, list[float]] = {name: [] for name in items}
    for _ in range(repeats):
        for name, b in items.items():
            with b.grad_mode():
                per_call[name].append(_round_time(b.fn, n_loops[name], device) / n_loops[name])
    return {name: _timing(times, n_loops[name]) for name, times in per_call.items()}


def pytest_benchmark(benchmark, bench: Timed, device: str, repeats: int = 7, min_round_s: float = 0.02) -> int:
    """Time ``bench`` with pytest-benchmark's ``benchmark`` fixture in this timer's rounds; returns calls per round.

    The rounds are :func:`calibrate`'s, with one warm-up round, as in :func:`time_interleaved`; pytest-benchmark
    keeps the clock (wall time; each round ends with a CUDA sync, see :func:`round_target`) and the statistics.
    """
    b = _as_bench(bench, device)
    with b.grad_mode():
        loops = calibrate(b.fn, device, min_round_s)
        synchronize(device)
        benchmark.pedantic(round_target(b.fn, loops, device), rounds=repeats, iterations=loops, warmup_rounds=1)
    return loops
