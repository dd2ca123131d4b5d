"""The benchmark harness behind ``python -m ptfast`` and the pytest-benchmark suite in ``benchmarks/``.

Both build their callables here, so the two always compare the same baselines on the same shapes. One home for each
concern:

* :mod:`.cases`     shapes, cases, the named grids, which providers apply to a case;
* :mod:`.providers` the encoders, the tiny PeftModel, torch.compile and CUDA graphs: the callable to time;
* :mod:`.timing`    the timer (calibrated, interleaved rounds; CUDA events on GPU) and its pytest-benchmark adapter;
* :mod:`.runner`    build and time the providers of one case into result rows;
* :mod:`.floors`    the minimal bytes and flops of a case, and the GPU figures its floor is computed with;
* :mod:`.machine`   device, versions, git commit, allocator pinning;
* :mod:`.report`    result rows, parity, the text table, JSON and the plot.
"""

from .cases import (BATCHES, DEFAULT_SEQ_LEN, DTYPES, MODES, NO_GRAD_MODES, PARITY_BATCH, PROVIDERS, SEED_SHAPE,
                    SHAPES, Case, Shape, Unavailable, footprint_bytes, grid, providers_for)
from .floors import PEAK_FLOPS, floor_s, hbm_bytes_per_s, work
from .machine import (available_memory, device_name, device_slug, git_commit, machine_info, machine_line, pin_allocator,
                      resolve_device)
from .providers import (INSTALL_HINT, encoders, make_bench, peft_config, require_peft,
                        tiny_peft_model)
from .report import (PARITY_LEGEND, add_speedups, fmt_time, format_table, parity, parity_lines, plot, result_row,
                     write_json)
from .runner import run_providers
from .timing import (Bench, Timing, calibrate, pytest_benchmark, round_target, synchronize, time_fn,
                     time_interleaved)

__all__ = [
    "INSTALL_HINT", "PARITY_BATCH", "PARITY_LEGEND", "available_memory", "footprint_bytes", "parity_lines",
    "require_peft",
    "Bench", "Case", "Shape", "Timing", "Unavailable", "BATCHES", "DEFAULT_SEQ_LEN", "DTYPES", "MODES", "NO_GRAD_MODES", "PEAK_FLOPS", "PROVIDERS", "SEED_SHAPE", "SHAPES",
    "add_speedups", "calibrate", "device_name", "device_slug", "encoders", "floor_s",
    "fmt_time", "format_table", "git_commit", "grid", "hbm_bytes_per_s", "machine_info", "machine_line",
    "make_bench", "parity", "peft_config", "pin_allocator", "plot", "providers_for", "pytest_benchmark", "resolve_device", "result_row",
    "round_target", "run_providers", "synchronize", "time_interleaved", "time_fn", "tiny_peft_model",
    "work", "write_json",
]
