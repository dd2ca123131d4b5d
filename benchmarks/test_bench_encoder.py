"""ptfast vs PEFT's P-tuning PromptEncoder: inference, training and the PeftModel prompt path.

Run: ``pytest benchmarks/ --benchmark-only`` (see benchmarks/NOTES.md). Cases and providers come from
``ptfast.bench`` (shared with ``python -m ptfast``); pytest-benchmark's table groups the providers of each case.

Timing: ``bench.pytest_benchmark``, the rounds of ptfast's one timer (``ptfast/bench/timing.py``) handed to
pytest-benchmark: calls per round calibrated so a round lasts >= 20 ms, a warm-up round, then ``--ptfast-repeats``
rounds; on CUDA each round ends with a synchronisation, so pytest-benchmark's wall clock covers the GPU work, not
just the launches.
"""

import pytest
import torch

from ptfast import bench


def test_encoder(benchmark, bench_case, provider, device, repeats):
    try:
        b = bench.make_bench(bench_case, provider, device)
    except bench.Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.group = bench_case.id
    benchmark.name = provider
    bench.pytest_benchmark(benchmark, b, device, repeats=repeats, min_round_s=0.02)  # no_grad once per round
    if benchmark.stats is not None:  # None under --benchmark-disable
        # the CLI's row (shape, bytes, flops and, on CUDA, the floor) for the saved JSON's extra_info
        row = bench.result_row(
            bench_case, provider, device, benchmark.stats.stats.median, setup_s=b.setup_s, note=b.note
        )
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("id", "median_s")})
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
