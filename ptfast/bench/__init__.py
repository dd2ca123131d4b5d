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

from .cases import (
    BATCHES,
    DEFAULT_SEQ_LEN,
    DTYPES,
    MODES,
    NO_GRAD_MODES,
    PARITY_BATCH,
    PROVIDERS,
    SEED_SHAPE,
    SHAPES,
    Case,
    Shape,
    Unavailable,
    footprint_bytes,
    grid,
    providers_for,
)
from .floors import PEAK_FLOPS, floor_s, hbm_bytes_per_s, work
from .machine import (
    available_memory,
    device_name,
    device_slug,
    git_commit,
    machine_info,
    machine_line,
    pin_allocator,
    resolve_device,
)
from .providers import INSTALL_HINT, encoders, make_bench, peft_config, require_peft, tiny_peft_model
from .report import (
    PARITY_LEGEND,
    add_speedups,
    fmt_time,
    format_table,
    parity,
    parity_lines,
    plot,
    result_row,
    write_json,
)
from .runner import run_providers
from .timing import Bench, Timing, calibrate, pytest_benchmark, round_target, synchronize, time_interleaved

__all__ = [
    # cases
    "BATCHES",
    "DEFAULT_SEQ_LEN",
    "DTYPES",
    "MODES",
    "NO_GRAD_MODES",
    "PARITY_BATCH",
    "PROVIDERS",
    "SEED_SHAPE",
    "SHAPES",
    "Case",
    "Shape",
    "Unavailable",
    "footprint_bytes",
    "grid",
    "providers_for",
    # floors
    "PEAK_FLOPS",
    "floor_s",
    "hbm_bytes_per_s",
    "work",
    # machine
    "available_memory",
    "device_name",
    "device_slug",
    "git_commit",
    "machine_info",
    "machine_line",
    "pin_allocator",
    "resolve_device",
    # providers
    "INSTALL_HINT",
    "encoders",
    "make_bench",
    "peft_config",
    "require_peft",
    "tiny_peft_model",
    # report
    "PARITY_LEGEND",
    "add_speedups",
    "fmt_time",
    "format_table",
    "parity",
    "parity_lines",
    "plot",
    "result_row",
    "write_json",
    # runner, timing
    "run_providers",
    "Bench",
    "Timing",
    "calibrate",
    "pytest_benchmark",
    "round_target",
    "synchronize",
    "time_interleaved",
]
