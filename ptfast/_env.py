"""The switchboard: every environment variable ptfast reads, and every backend decision, in one place.

Each flag is read when it is asked for (not cached at import), so tests and users can change it between calls.
The table in the README ("Environment variables") lists them all; keep the two in step.

This module imports only the standard library at import time (torch is imported inside the functions that need
it), so ``setup.py`` can load it standalone, without the package and without torch.
"""

from __future__ import annotations

import functools
import os

__all__ = [
    "BACKENDS",
    "backend_key",
    "backend_override",
    "build_ext_requested",
    "build_verbose",
    "compile_workers",
    "cxx",
    "flag",
    "hbm_bytes_per_s",
    "interpreting",
    "kernel_settings_key",
    "mlp_head_forced_path",
    "mlp_head_forced_split_k",
    "native_disabled",
    "resolve_backend",
    "stop_interpreting",
    "torch_extensions_dir",
    "triton_available",
    "allow_triton_on_cpu",
]

#: What ``PTFAST_BACKEND`` accepts; an op's ``backend=`` argument may also name ``"native"``.
BACKENDS = ("auto", "eager", "triton")
# os.environ's own store: a plain dict lookup, ~10x cheaper than os.environ.get's encode-and-decode.
_ENVIRON_GET = getattr(os.environ, "_data", os.environ).get
_BACKEND_KEY = os.environ.encodekey("PTFAST_BACKEND") if hasattr(os.environ, "encodekey") else "PTFAST_BACKEND"
_TRUE = ("1", "true", "yes", "on")


def flag(name: str) -> bool:
    """Whether the boolean variable ``name`` is set to 1/true/yes/on (case-insensitive)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


# ------------------------------------------------------------------------------------------------ flags
def native_disabled() -> bool:
    """``PTFAST_NO_NATIVE``: never build or load the C++ extension."""
    return flag("PTFAST_NO_NATIVE")


def build_verbose() -> bool:
    """``PTFAST_BUILD_VERBOSE``: show the compiler and ninja output of the JIT build."""
    return flag("PTFAST_BUILD_VERBOSE")


def build_ext_requested() -> bool:
    """``PTFAST_BUILD_EXT`` (install time, read by setup.py): build ``ptfast._C`` ahead of time."""
    return flag("PTFAST_BUILD_EXT")


def cxx() -> str:
    """``CXX``: the C++ compiler torch's extension builder will call (default ``c++``)."""
    return os.environ.get("CXX", "").strip() or "c++"


def torch_extensions_dir() -> str | None:
    """``TORCH_EXTENSIONS_DIR``: torch's JIT build cache root, if set."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or None


def interpreting() -> bool:
    """``TRITON_INTERPRET``: Triton kernels run on CPU tensors in the interpreter (must be set before triton is
    imported, which is triton's rule, not ours)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def stop_interpreting() -> None:
    """Unset ``TRITON_INTERPRET`` for this process, so a later ``import triton`` compiles for real (the audit)."""
    os.environ.pop("TRITON_INTERPRET", None)


def compile_workers() -> int:
    """``PTFAST_COMPILE_WORKERS`` (default 2): parallel compiles of the kernel audit and the compile tests."""
    value = os.environ.get("PTFAST_COMPILE_WORKERS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 2


def backend_override() -> str:
    """``PTFAST_BACKEND``: ``auto`` (default), ``eager`` or ``triton``; anything else is a ValueError."""
    value = os.environ.get("PTFAST_BACKEND", "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PTFAST_BACKEND must be 'auto', 'eager' or 'triton', got {value!r}")
    return value


def backend_key():
    """The raw ``PTFAST_BACKEND`` value, for cache keys: read on every cached call, so no parsing here."""
    return _ENVIRON_GET(_BACKEND_KEY)


_SETTING_KEYS = tuple(
    os.environ.encodekey(n) if hasattr(os.environ, "encodekey") else n
    for n in ("PTFAST_MLP_HEAD_PATH", "PTFAST_MLP_HEAD_SPLIT_K")
)
_PATH_VAR, _SPLIT_VAR = _SETTING_KEYS  # unpacked: read without a loop on every launch


def kernel_settings_key() -> tuple:
    """The raw values of the kernels' test knobs, for keying cached launch plans (parsed when a plan is built)."""
    return (_ENVIRON_GET(_PATH_VAR), _ENVIRON_GET(_SPLIT_VAR))


def mlp_head_forced_path() -> str | None:
    """``PTFAST_MLP_HEAD_PATH=small|large`` (testing): force the fused head's forward path; None = heuristic."""
    value = os.environ.get("PTFAST_MLP_HEAD_PATH", "").strip().lower()
    if value not in ("", "auto", "small", "large"):
        raise ValueError(f"PTFAST_MLP_HEAD_PATH must be 'small', 'large' or 'auto', got {value!r}")
    return value if value in ("small", "large") else None


def mlp_head_forced_split_k() -> int | None:
    """``PTFAST_MLP_HEAD_SPLIT_K=<int>`` (testing): force the split-K factor of the large path; None = heuristic."""
    value = os.environ.get("PTFAST_MLP_HEAD_SPLIT_K", "").strip()
    if not value:
        return None
    try:
        split = int(value)
    except ValueError:
        raise ValueError(f"PTFAST_MLP_HEAD_SPLIT_K must be a positive int, got {value!r}") from None
    if split < 1:
        raise ValueError(f"PTFAST_MLP_HEAD_SPLIT_K must be a positive int, got {value!r}")
    return split


def hbm_bytes_per_s(default: float) -> float:
    """``PTFAST_HBM_BW``: the GPU memory bandwidth (bytes/s) the benchmark report's floors are computed with."""
    value = os.environ.get("PTFAST_HBM_BW", "").strip()
    if not value:
        return default
    try:
        bandwidth = float(value)
    except ValueError:
        bandwidth = float("nan")
    if not bandwidth > 0:  # also NaN: a floor divides by it
        raise ValueError(f"PTFAST_HBM_BW must be a positive number of bytes/s, got {value!r}")
    return bandwidth


# ------------------------------------------------------------------------------------------------ backends
# Set by ptfast.bench.stub_driver while a stand-in CUDA driver is active: Triton kernels then "launch" with CPU
# tensors (compiled for sm_90, launched into a stub that computes nothing), so host cost can be measured.
_triton_on_cpu = False


def allow_triton_on_cpu(value: bool) -> bool:
    """Let ``PTFAST_BACKEND=triton`` take CPU tensors without the interpreter; returns the previous setting."""
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, bool(value)
    return previous


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported here (it is a Linux x86_64 dependency only)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platform without triton
        return False
    return True


# resolve_backend's answers for backend=None, keyed by everything they depend on (the raw variables, the device
# type, the stand-in driver switch): parsing the environment on every call cost more than a cached kernel launch.
_BACKEND_MEMO: dict = {}
_MEMO_KEYS = tuple(
    os.environ.encodekey(n) if hasattr(os.environ, "encodekey") else n
    for n in ("PTFAST_BACKEND", "PTFAST_NO_NATIVE", "TRITON_INTERPRET")
)
_BACKEND_VAR, _NO_NATIVE_VAR, _INTERPRET_VAR = _MEMO_KEYS


def resolve_backend(op: str, device, *, backend: str | None = None) -> str:
    """The backend an op runs on (see ``_resolve_backend``); answers for ``backend=None`` are memoized."""
    if backend is not None:
        return _resolve_backend(op, device, backend=backend)
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    get = _ENVIRON_GET
    key = (op, device_type, _triton_on_cpu, get(_BACKEND_VAR), get(_NO_NATIVE_VAR), get(_INTERPRET_VAR))
    answer = _BACKEND_MEMO.get(key)
    if answer is None:
        answer = _BACKEND_MEMO[key] = _resolve_backend(op, device)
    return answer


def _resolve_backend(op: str, device, *, backend: str | None = None) -> str:
    """The backend an op runs on: ``"triton"``, ``"native"`` or ``"eager"``, from the variables and the device.

    Args:
        op: ``"mlp_head"``, ``"prefix_head"`` or ``"prepend"``.
        device: the device of the op's tensors.
        backend: an explicit choice from the caller (``prepend_prompts(backend=...)``); ``None`` reads
            ``PTFAST_BACKEND``.

    ``auto`` picks Triton for CUDA ``prepend`` tensors (the MLP head stays eager on CUDA, below), ``"native"`` for
    CPU/Meta ``prepend`` tensors (whether the C++ extension loads is the op's question: ``ptfast.ops.prepend``
    falls back to eager where it does not, and raises for an explicit ``native``), and eager PyTorch otherwise. An
    explicit ``triton`` or ``native`` that cannot run here raises instead of falling back.
    """
    import torch

    if op not in ("mlp_head", "prefix_head", "prepend"):
        raise ValueError(f"unknown op {op!r}")
    device = torch.device(device)
    source = "PTFAST_BACKEND"
    if backend is None:
        backend = backend_override()
    else:
        source = "backend"
        allowed = BACKENDS + (("native",) if op == "prepend" else ())
        if backend not in allowed:
            raise ValueError(f"{op}: backend must be one of {allowed}, got {backend!r}")

    if backend == "auto":
        if device.type == "cuda":
            if not triton_available():
                return "eager"
            if op in ("mlp_head", "prefix_head"):
                # PyTorch's own ops until a GPU run measures the kernels faster (README, Benchmarks);
                # PTFAST_BACKEND=triton selects them.
                return "eager"
            return "triton"
        if op == "prepend" and device.type in ("cpu", "meta"):
            return "native"
        return "eager"
    if backend == "native":
        if device.type not in ("cpu", "meta"):
            raise ValueError(f"prepend_prompts: the native backend has CPU and Meta kernels only, got {device}")
        if native_disabled():
            raise RuntimeError("prepend_prompts: backend='native' but PTFAST_NO_NATIVE is set")
        return "native"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{source}=triton but triton cannot be imported")
        if device.type != "cuda" and not (device.type == "cpu" and (interpreting() or _triton_on_cpu)):
            raise ValueError(
                f"{source}=triton with {device.type} tensors needs CUDA, or CPU tensors with TRITON_INTERPRET=1 "
                "(set before triton is imported); use CUDA tensors or PTFAST_BACKEND=eager"
            )
        return "triton"
    return "eager"


# ------------------------------------------------------------------------------------------------ benchmarks
# Read by benchmarks/conftest.py (the pytest-benchmark suite); each has a pytest option that wins over it.
def _bench_choice(name: str, choices, default: str | None) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _bench_positive_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def bench_results_dir() -> str | None:
    """``PTFAST_BENCH_RESULTS``: the folder of ``<device>.pytest.json`` (default ``benchmarks/results``)."""
    return os.environ.get("PTFAST_BENCH_RESULTS", "").strip() or None


def bench_grid() -> str | None:
    """``PTFAST_BENCH_GRID=quick|cpu|full``: the benchmark grid; None = full on CUDA, cpu on CPU."""
    return _bench_choice("PTFAST_BENCH_GRID", ("quick", "cpu", "full"), None)


def bench_repeats() -> int:
    """``PTFAST_BENCH_REPEATS``: timed rounds per benchmark (default 7)."""
    return _bench_positive_int("PTFAST_BENCH_REPEATS") or 7


def bench_compile() -> str:
    """``PTFAST_BENCH_COMPILE=auto|on|off``: the torch.compile baselines (default auto)."""
    return _bench_choice("PTFAST_BENCH_COMPILE", ("auto", "on", "off"), "auto")


def bench_device() -> str:
    """``PTFAST_BENCH_DEVICE``: auto (default), cpu or cuda[:N]."""
    return os.environ.get("PTFAST_BENCH_DEVICE", "").strip() or "auto"


def bench_threads() -> int | None:
    """``PTFAST_BENCH_THREADS``: ``torch.set_num_threads`` for the benchmark run; None = torch's default."""
    return _bench_positive_int("PTFAST_BENCH_THREADS")


__all__ += ["bench_compile", "bench_device", "bench_grid", "bench_repeats", "bench_results_dir", "bench_threads"]
