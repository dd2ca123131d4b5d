"""pytest-benchmark setup for ptfast's benchmark suite (run: ``pytest benchmarks/ --benchmark-only``).

* Results go to ``benchmarks/results/<device>.pytest.json`` (``<device>-prepend.pytest.json`` etc. for a run of
  other suites than the encoder's) unless ``--benchmark-json`` names another file
  (``$PTFAST_BENCH_RESULTS`` overrides the folder; ``benchmarks/gpu_check.sh`` points it at ``$OUT``).
* ``machine_info`` in that JSON gains the device name and the torch/triton/peft/ptfast versions and git commit.
* ``--ptfast-compile auto|on|off``: the torch.compile baselines (auto: on CUDA; on CPU with the full grid only).
* ``--ptfast-grid quick|cpu|full`` picks the grid (default: ``full`` on CUDA, ``cpu`` on CPU, see
  ``ptfast.bench.grid``); ``--ptfast-repeats`` the timed rounds per benchmark;
  ``$PTFAST_BENCH_THREADS`` sets ``torch.set_num_threads``. The ``PTFAST_BENCH_*`` variables are read through
  ``ptfast._env`` (the one switchboard), each the default of the matching option.

Unlike ``tests/conftest.py`` this does not set ``TRITON_INTERPRET``: benchmarks must time the real backends.
"""

from pathlib import Path

import pytest
import torch

from ptfast import _env, bench


def results_dir() -> Path:
    return Path(_env.bench_results_dir() or Path(__file__).parent / "results")


def pytest_addoption(parser):
    group = parser.getgroup("ptfast benchmarks")
    group.addoption(
        "--ptfast-grid",
        choices=("quick", "cpu", "full"),
        default=_env.bench_grid(),
        help="benchmark grid (default: full on CUDA, cpu on CPU); env PTFAST_BENCH_GRID",
    )
    group.addoption(
        "--ptfast-repeats",
        type=int,
        default=_env.bench_repeats(),
        help="timed rounds per benchmark; pytest-benchmark reports their statistics (default 7)",
    )
    group.addoption(
        "--ptfast-compile",
        choices=("auto", "on", "off"),
        default=_env.bench_compile(),
        help="torch.compile baselines (auto: on CUDA, and with the full grid on CPU)",
    )
    group.addoption("--ptfast-device", default=_env.bench_device(), help="auto, cpu or cuda (default auto)")


def pytest_configure(config):
    bench.pin_allocator()
    if _env.bench_threads():
        torch.set_num_threads(_env.bench_threads())
    # Runs before pytest-benchmark's own (trylast) configure, which reads the option.
    if config.getoption("benchmark_json", None) is None and not config.getoption("benchmark_disable", False):
        try:
            device = bench.resolve_device(config.getoption("ptfast_device"))
        except bench.Unavailable as exc:
            raise pytest.UsageError(str(exc)) from None
        results = results_dir()
        results.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = results / f"{bench.device_slug(device)}{_suite_suffix(config)}.pytest.json"


def _suite_suffix(config) -> str:
    """ "-prepend" for ``pytest benchmarks/test_bench_prepend.py``: a run of some suites must not overwrite the
    encoder suite's file. The whole folder or the encoder suite alone: no suffix."""
    files = [Path(arg.split("::")[0]) for arg in config.args]
    names = sorted({f.stem[len("test_bench_") :] for f in files if f.name.startswith("test_bench_")})
    return "" if not names or names == ["encoder"] else "-" + "-".join(names)


def pytest_benchmark_update_machine_info(config, machine_info):
    device = bench.resolve_device(config.getoption("ptfast_device"))
    machine_info["ptfast"] = bench.machine_info(device)


@pytest.fixture(scope="session")
def device(pytestconfig):
    try:
        return bench.resolve_device(pytestconfig.getoption("ptfast_device"))
    except bench.Unavailable as exc:
        pytest.exit(str(exc), returncode=2)


@pytest.fixture(scope="session")
def repeats(pytestconfig):
    return max(1, pytestconfig.getoption("ptfast_repeats"))


def collection_device(config) -> str:
    try:
        return bench.resolve_device(config.getoption("ptfast_device"))
    except bench.Unavailable:
        return "cpu"


def collection_grid(config, device: str) -> str:
    return config.getoption("ptfast_grid") or ("full" if device.startswith("cuda") else "cpu")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = collection_device(config)
    name = collection_grid(config, device)
    # torch.compile on CPU costs ~10 s per graph here (and was no faster than eager): full grid only.
    choice = config.getoption("ptfast_compile")
    use_compile = choice == "on" or (choice == "auto" and (device.startswith("cuda") or name == "full"))
    params = []
    for case in bench.grid(name, device):
        for provider in bench.providers_for(case, device, compile=use_compile):
            params.append(pytest.param(case, provider, id=f"{case.id}-{provider}"))
    metafunc.parametrize(("bench_case", "provider"), params)


def pytest_report_header(config):
    device = collection_device(config)
    return (
        f"ptfast bench: {bench.machine_line(bench.machine_info(device))}; "
        f"grid {collection_grid(config, device)}; cuda available: {torch.cuda.is_available()}"
    )
