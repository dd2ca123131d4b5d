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
    nbytes, flops = bench.work(bench_case)
    benchmark.extra_info.update(
        mode=bench_case.mode, M=bench_case.shape.M, D=bench_case.shape.D, H=bench_case.shape.H,
        batch=bench_case.batch, dtype=bench_case.dtype, provider=provider,
        seq_len=bench_case.seq_len if bench_case.mode in ("prompt", "model") else None,
        setup_s=b.setup_s, note=b.note, bytes=nbytes, flops=flops,
    )
    if device.startswith("cuda"):
        benchmark.extra_info["floor_s"] = bench.floor_s(bench_case)
    bench.pytest_benchmark(benchmark, b, device, repeats=repeats, min_round_s=0.02)  # no_grad once per round
    if device.startswith("cuda") and provider != "ptfast-cached" and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["pct_of_floor"] = 100.0 * bench.floor_s(bench_case) / median
        benchmark.extra_info["pct_of_hbm_bw"] = 100.0 * nbytes / median / bench.hbm_bytes_per_s()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
