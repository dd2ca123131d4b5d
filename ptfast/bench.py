"""Shared benchmark library: providers, shapes, timing, floors, tables, JSON and plots.

``python -m ptfast`` (the report) and the pytest-benchmark suite in ``benchmarks/`` both build their callables
here, so the two always compare the same baselines on the same shapes.

Providers (what is timed; not every provider runs in every mode or on every device):

* ``peft``           PEFT's ``PromptEncoder``, eager: the reference.
* ``peft-graph``     the same eager PEFT calls replayed from a CUDA graph (CUDA only, no-grad modes): removes the
                     launch overhead PEFT pays, so the comparison with ptfast's kernels is fair at tiny shapes.
* ``ptfast``         ``ptfast.PromptEncoder`` without its table cache (eager on CPU, Triton on CUDA). In no-grad
                     modes the cache is dropped before every call, so each call is a cache miss.
* ``ptfast-cached``  ``ptfast.PromptEncoder`` with its cache (no-grad modes only): the steady state of inference.
* ``compile``        ``torch.compile(peft_encoder)``, default mode.
* ``compile-mat``    ``torch.compile(peft_encoder, mode="max-autotune-no-cudagraphs")`` (CUDA only).

Modes:

* ``infer``   ``encoder(indices)`` with grad disabled (once around each timing round, not per call); indices are ``arange(M)`` expanded to ``(B, M)``.
* ``train``   forward + ``backward(grad_out)`` with a fixed random ``grad_out``; grads are reset (set to None)
              every call, for every provider.
* ``prompt``  the PeftModel prompt path, by recipe, no grad: ``encoder(tokens[:1]).repeat(B, 1, 1)`` then
              ``torch.cat((prompts, inputs_embeds), 1)``, as ``PeftModel.get_prompt`` +
              ``PeftModelForCausalLM.forward`` do.
* ``model``   the same path through a real ``PeftModelForCausalLM`` over a tiny random causal LM (built from a
              config, nothing downloaded): ``word_embeddings(input_ids)``, ``get_prompt(B)``, ``.to(dtype)``,
              ``torch.cat``. ptfast's row uses ``ptfast.integrations.peft.patch`` and is skipped if that is missing.

Timing: ``loops`` calls per round (calibrated so a round lasts ``min_round_s``), ``repeats`` rounds after a warm-up
round; the per-call time of each round is kept, and the median is reported. On CUDA a round is bracketed by
synchronisations (and timed with CUDA events in :func:`time_fn`), since kernel launches are asynchronous.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _env

# ------------------------------------------------------------------------------------------------ constants

#: Measured on the H100 we test on (see shared GPU.md): device-to-device copy bandwidth, bf16 matmul peak.
HBM_BYTES_PER_S = _env.hbm_bytes_per_s(3.0e12)
#: Peak matmul throughput by dtype, for the compute side of the floor. bf16/fp16: measured ~800 TFLOP/s (GPU.md);
#: fp32 without TF32: the H100 SXM's 67 TFLOP/s datasheet number (not measured by us).
PEAK_FLOPS = {"bf16": 800e12, "fp16": 800e12, "fp32": 67e12}

PROVIDERS = ("peft", "peft-graph", "ptfast", "ptfast-cached", "compile", "compile-mat")
MODES = ("infer", "train", "prompt", "model")
NO_GRAD_MODES = ("infer", "prompt", "model")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SEQ_LEN = 128


class Unavailable(Exception):
    """This provider cannot run this case here (the message says why); callers skip it."""


# ------------------------------------------------------------------------------------------------ shapes and cases


@dataclass(frozen=True, order=True)
class Shape:
    """A prompt-encoder shape: M virtual tokens, token_dim D, encoder_hidden_size H."""

    M: int
    D: int
    H: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        parts = re.split(r"[x,:/]", text.strip().lower())
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad shape {text!r}: expected MxDxH with positive ints, e.g. 20x1024x128")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.M}x{self.D}x{self.H}"

    @property
    def label(self) -> str:
        return f"M{self.M}-D{self.D}-H{self.H}"


SEED_SHAPE = Shape(20, 1024, 128)
SHAPES = (SEED_SHAPE, Shape(20, 4096, 4096), Shape(100, 4096, 1024), Shape(20, 8192, 1024))
BATCHES = (1, 8)


@dataclass(frozen=True)
class Case:
    mode: str
    shape: Shape
    batch: int
    dtype: str = "fp32"
    seq_len: int = DEFAULT_SEQ_LEN

    @property
    def id(self) -> str:
        seq = f"-S{self.seq_len}" if self.mode in ("prompt", "model") else ""
        return f"{self.mode}-{self.shape.label}-B{self.batch}{seq}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def grid(name: str, device: str, *, shapes: Optional[Sequence[Shape]] = None, batches: Optional[Sequence[int]] = None,
         dtypes: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
         seq_len: int = DEFAULT_SEQ_LEN) -> List[Case]:
    """The cases of a named grid, optionally narrowed.

    * ``quick``: the seed shape, batches 1 and 8, every mode, fp32 (the CLI default).
    * ``cpu``:   ``quick`` plus the three large shapes at batch 1 for ``infer`` and ``train`` (the pytest default on
                 CPU; the large shapes cost tens of ms per call there).
    * ``full``:  every shape x batch x mode (``model`` at the seed shape only), fp32 plus bf16 on CUDA.
    """
    cuda = device.startswith("cuda")
    if name not in ("quick", "cpu", "full"):
        raise ValueError(f"unknown grid {name!r}: use quick, cpu or full")
    default_dtypes = ("fp32", "bf16") if (cuda and name == "full") else ("fp32",)
    dtypes = tuple(dtypes or default_dtypes)
    modes = tuple(modes or MODES)
    batches = tuple(batches or BATCHES)
    if shapes is not None:
        shape_list = tuple(shapes)
    else:
        shape_list = (SEED_SHAPE,) if name == "quick" else SHAPES
    cases = []
    for dtype in dtypes:
        for shape in shape_list:
            for mode in modes:
                for batch in batches:
                    if shapes is None and shape != SEED_SHAPE:
                        if mode == "model":
                            continue  # the tiny LM's width grows with D; the prompt recipe covers large shapes
                        if name == "cpu" and (batch != 1 or mode not in ("infer", "train")):
                            continue
                    cases.append(Case(mode, shape, batch, dtype, seq_len))
    return cases


def providers_for(case: Case, device: str, *, compile: bool = True) -> List[str]:
    """The providers that apply to ``case`` on ``device`` (``compile=False`` drops the torch.compile baselines)."""
    cuda = device.startswith("cuda")
    out = ["peft"]
    if cuda and case.mode in ("infer", "prompt"):
        out.append("peft-graph")
    out.append("ptfast")
    if case.mode in NO_GRAD_MODES:
        out.append("ptfast-cached")
    if compile and case.mode != "model":
        out.append("compile")
        if cuda:
            out.append("compile-mat")
    return out


# ------------------------------------------------------------------------------------------------ devices


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``. Raises ``Unavailable`` for CUDA without CUDA."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise Unavailable(f"--device {device} was requested but {why} (torch {torch.__version__}); "
                              "use --device cpu or --device auto")
        return device
    if device == "cpu":
        return device
    raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: str) -> str:
    """A file-name-safe device name, e.g. ``cpu-amd-epyc-2c`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.startswith("cuda"):
        name = "cuda-" + torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"cpu-{cpu_name()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


_ALLOCATOR_PINNED: Optional[str] = None


def pin_allocator() -> Optional[str]:
    """Fix glibc malloc's mmap/trim thresholds at 256 MiB for the whole run, for every provider alike.

    glibc raises its mmap threshold dynamically as large blocks are freed, so whether a ~5 MB output (the B=8
    prompt rows) comes from the heap or from fresh, page-faulting mmap depends on what the process allocated
    before. That history differs between providers and made B=8 prompt rows swing by 2-3x on the 2-core CPU.
    Returns a description of what was set, or None where there is no glibc.
    """
    global _ALLOCATOR_PINNED
    if _ALLOCATOR_PINNED is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold, size = -1, -3, 256 << 20
            if libc.mallopt(m_mmap_threshold, size) == 1 and libc.mallopt(m_trim_threshold, size) == 1:
                _ALLOCATOR_PINNED = "glibc mmap/trim thresholds 256 MiB"
        except (OSError, AttributeError):
            pass
    return _ALLOCATOR_PINNED


def machine_info(device: str) -> Dict[str, Any]:
    """Device, versions and load: stored with every result file."""
    from . import __version__

    info = {
        "device": device,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "ptfast": __version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "hbm_bytes_per_s": HBM_BYTES_PER_S if device.startswith("cuda") else None,
        "allocator": _ALLOCATOR_PINNED,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(info: Dict[str, Any]) -> str:
    return (f"{info['device_name']} | torch {info['torch']} | triton {info['triton'] or 'n/a'} | "
            f"ptfast {info['ptfast']}")


# ------------------------------------------------------------------------------------------------ encoders


def _peft_encoder_cls():
    try:
        from peft.tuners.p_tuning import PromptEncoder
    except ImportError as exc:  # pragma: no cover - peft is a test/bench dependency
        raise Unavailable(f"peft is not installed ({exc}); pip install 'ptfast[test]'") from exc
    return PromptEncoder


def peft_config(shape: Shape):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape.M, token_dim=shape.D,
                               encoder_hidden_size=shape.H, num_transformer_submodules=1)


_ENCODERS: Dict[tuple, tuple] = {}


def encoders(shape: Shape, dtype: str, device: str, seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """``(peft_encoder, ptfast_encoder)`` with identical weights, memoised per (shape, dtype, device).

    The last pair is kept only: the large shapes hold hundreds of MB of weights each.
    """
    key = (shape, dtype, device, seed)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        from .encoder import PromptEncoder as PtEncoder

        cls = _peft_encoder_cls()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            peft_enc = cls(peft_config(shape)).to(device=device, dtype=DTYPES[dtype])
        _ENCODERS[key] = (peft_enc, PtEncoder.from_peft(peft_enc))
    return _ENCODERS[key]


def clear_caches() -> None:
    _ENCODERS.clear()
    _MODELS.clear()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ the tiny LM


_MODELS: Dict[tuple, Any] = {}


def tiny_peft_model(shape: Shape, dtype: str, device: str, seed: int = 0):
    """A ``PeftModelForCausalLM`` (P-tuning, MLP) over a 1-layer random Llama of width ``shape.D``.

    The decoder layer is made narrow (2 heads of 16, MLP width 32) so the model stays small at any ``D``: only the
    word embeddings and the prompt encoder are on the timed path.
    """
    key = (shape, dtype, device, seed)
    if key in _MODELS:
        return _MODELS[key]
    _MODELS.clear()
    try:
        from peft import PromptEncoderConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise Unavailable(f"the model row needs peft and transformers ({exc})") from exc
    cfg = LlamaConfig(vocab_size=512, hidden_size=shape.D, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM(cfg)
        model = get_peft_model(base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape.M,
                                                          encoder_hidden_size=shape.H))
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    _MODELS[key] = model
    return model


def _patched_copy(model):
    """A deep copy of ``model`` with ptfast encoders, via ``ptfast.integrations.peft.patch``."""
    try:
        from .integrations.peft import patch
    except ImportError as exc:
        raise Unavailable(f"ptfast.integrations.peft.patch is not available yet ({exc})") from exc
    from .encoder import PromptEncoder as PtEncoder

    clone = copy.deepcopy(model)
    result = patch(clone)
    if isinstance(result, torch.nn.Module):
        clone = result
    enc = clone.prompt_encoder[clone.active_adapter]
    if not isinstance(enc, PtEncoder):
        raise Unavailable(f"patch() left a {type(enc).__name__} in place of ptfast.PromptEncoder")
    return clone, enc


# ------------------------------------------------------------------------------------------------ callables


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


def _set_recompile_limit() -> None:
    # The grid compiles the same `forward` code for many modules; dynamo's default limit (8) would silently fall
    # back to eager after a few shapes.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)


def _compiled(fn_or_module, provider: str, device: str):
    if provider == "compile-mat" and not device.startswith("cuda"):
        raise Unavailable("max-autotune-no-cudagraphs is a CUDA baseline")
    _set_recompile_limit()
    mode = "max-autotune-no-cudagraphs" if provider == "compile-mat" else None
    return torch.compile(fn_or_module, mode=mode)


def _cuda_graph(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """Capture one call of ``fn`` (no grad) in a CUDA graph; return its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph.replay


def _prompt_recipe(encoder, tokens: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
    # PeftModel.get_prompt: encode one row of tokens, repeat it for the batch; then PeftModelForCausalLM.forward:
    # cast to the embeddings' dtype and concatenate in front of them.
    prompts = encoder(tokens[:1]).repeat(inputs_embeds.shape[0], 1, 1)
    return torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)


def _first_call(fn: Callable[[], Any], device: str) -> float:
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def make_bench(case: Case, provider: str, device: str) -> Bench:
    """The callable for ``provider`` on ``case``. Raises ``Unavailable`` when it does not apply here."""
    cuda = device.startswith("cuda")
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}: one of {PROVIDERS}")
    if provider == "peft-graph" and not cuda:
        raise Unavailable("CUDA graphs need a CUDA device")
    if provider in ("peft-graph", "ptfast-cached") and case.mode == "train":
        raise Unavailable(f"{provider} is a no-grad provider")
    if case.mode == "model":
        return _make_model_bench(case, provider, device)
    if case.mode not in MODES:
        raise ValueError(f"unknown mode {case.mode!r}: one of {MODES}")

    t_setup = time.perf_counter()
    shape, B, dt = case.shape, case.batch, case.torch_dtype
    peft_enc, pt_enc = encoders(shape, case.dtype, device)
    indices = torch.arange(shape.M, device=device).unsqueeze(0).expand(B, -1)
    module = pt_enc if provider.startswith("ptfast") else peft_enc
    if provider.startswith("compile"):
        module = _compiled(peft_enc, provider, device)

    if case.mode == "infer":
        def call():
            return module(indices)
    elif case.mode == "prompt":
        gen = torch.Generator(device=device).manual_seed(1)
        inputs_embeds = torch.randn(B, case.seq_len, shape.D, device=device, dtype=dt, generator=gen)
        if provider.startswith("compile"):
            target = _compiled(lambda: _prompt_recipe(peft_enc, indices, inputs_embeds), provider, device)
            call = target
        else:
            def call():
                return _prompt_recipe(module, indices, inputs_embeds)
    else:  # train
        gen = torch.Generator(device=device).manual_seed(1)
        grad_out = torch.randn(B, shape.M, shape.D, device=device, dtype=dt, generator=gen)
        params = list((pt_enc if provider.startswith("ptfast") else peft_enc).parameters())

        def call():
            for p in params:
                p.grad = None
            out = module(indices)
            out.backward(grad_out)
            return out

    if provider == "ptfast" and case.mode != "train":
        inner = call

        def call():  # a cache miss every call: the cost after each optimizer step, or without the cache
            pt_enc.invalidate_cache()
            return inner()

    grad = case.mode == "train"
    fn = call
    note = ""
    if provider == "peft-graph":
        fn = _cuda_graph(call, device)
    setup_s = time.perf_counter() - t_setup
    if provider.startswith("compile"):
        try:
            with torch.set_grad_enabled(grad):
                compile_s = _first_call(fn, device)
        except Exception as exc:  # inductor needs a compiler; report, don't crash the grid
            raise Unavailable(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        setup_s += compile_s
        note = f"compile {compile_s:.1f}s"
    return Bench(fn=fn, device=device, setup_s=setup_s, note=note, grad=grad)


def _make_model_bench(case: Case, provider: str, device: str) -> Bench:
    if provider not in ("peft", "ptfast", "ptfast-cached"):
        raise Unavailable(f"{provider} is not run at the model level")
    t_setup = time.perf_counter()
    model = tiny_peft_model(case.shape, case.dtype, device)
    enc = None
    if provider != "peft":
        model, enc = _patched_copy(model)
    gen = torch.Generator(device=device).manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (case.batch, case.seq_len), device=device, generator=gen)
    word_embeddings = model.word_embeddings
    B = case.batch

    def call():
        # PeftModelForCausalLM.forward's P-tuning branch, without the base model call.
        inputs_embeds = word_embeddings(input_ids)
        prompts = model.get_prompt(batch_size=B)
        prompts = prompts.to(inputs_embeds.dtype)
        return torch.cat((prompts, inputs_embeds), dim=1)

    def fn():
        if provider == "ptfast":
            enc.invalidate_cache()
        return call()

    return Bench(fn=fn, device=device, setup_s=time.perf_counter() - t_setup, grad=False)


# ------------------------------------------------------------------------------------------------ timing


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


def run_providers(case: Case, providers: Sequence[str], device: str, repeats: int = 7, min_round_s: float = 0.02,
                  ) -> Tuple[List[Dict[str, Any]], Dict[str, str]]:
    """Time ``providers`` on ``case``, interleaved. Returns ``(rows, {provider: why skipped})``."""
    benches: Dict[str, Bench] = {}
    skipped: Dict[str, str] = {}
    for provider in providers:
        try:
            benches[provider] = make_bench(case, provider, device)
        except Unavailable as exc:
            skipped[provider] = str(exc)
    timings = time_interleaved(benches, device, repeats, min_round_s) if benches else {}
    rows = []
    for provider, t in timings.items():
        b = benches[provider]
        rows.append(result_row(case, provider, device, t.median_s, q20_s=t.q20_s, q80_s=t.q80_s,
                               min_s=t.rounds_s[0], loops=t.loops, repeats=t.repeats, setup_s=b.setup_s,
                               note=b.note))
    return rows, skipped


# ------------------------------------------------------------------------------------------------ floors


def work(case: Case) -> Tuple[int, int]:
    """``(bytes, flops)`` of the minimal work of ``case``: every weight, input and output read or written once.

    * infer:  weights + embedding table (M x D) + the output table (M x D); the batch is a broadcast of one table.
    * train:  the above + weight gradients (= weights) + embedding gradient (M x D) + grad_out (B x M x D);
              flops = 3 x forward.
    * prompt/model: infer + inputs_embeds (B x S x D) read + the concatenation (B x (M+S) x D) written.
    Flops: one forward of the head on M rows, 2*M*(D*H + H*H + H*D).
    """
    M, D, H = case.shape.M, case.shape.D, case.shape.H
    es = torch.empty((), dtype=case.torch_dtype).element_size()
    weights = H * D + H + H * H + H + D * H + D
    flops = 2 * M * (D * H + H * H + H * D)
    elems = weights + 2 * M * D
    if case.mode == "train":
        elems += weights + M * D + case.batch * M * D
        flops *= 3
    elif case.mode in ("prompt", "model"):
        elems += case.batch * case.seq_len * D + case.batch * (M + case.seq_len) * D
    return elems * es, flops


def floor_s(case: Case) -> float:
    """max(bytes / HBM bandwidth, flops / peak) on the GPU described in GPU.md."""
    nbytes, flops = work(case)
    return max(nbytes / HBM_BYTES_PER_S, flops / PEAK_FLOPS[case.dtype])


# ------------------------------------------------------------------------------------------------ one result row


def run_case(case: Case, provider: str, device: str, repeats: int = 7, min_round_s: float = 0.02) -> Dict[str, Any]:
    """Build, time and describe one (case, provider). Raises ``Unavailable`` when it does not apply."""
    b = make_bench(case, provider, device)
    with b.grad_mode():
        t = time_fn(b.fn, device, repeats=repeats, min_round_s=min_round_s)
    return result_row(case, provider, device, t.median_s, q20_s=t.q20_s, q80_s=t.q80_s, min_s=t.rounds_s[0],
                      loops=t.loops, repeats=t.repeats, setup_s=b.setup_s, note=b.note)


def result_row(case: Case, provider: str, device: str, median_s: float, **extra) -> Dict[str, Any]:
    nbytes, flops = work(case)
    row = {"id": case.id, "mode": case.mode, "M": case.shape.M, "D": case.shape.D, "H": case.shape.H,
           "batch": case.batch, "seq_len": case.seq_len if case.mode in ("prompt", "model") else None,
           "dtype": case.dtype, "provider": provider, "median_s": median_s, "bytes": nbytes, "flops": flops}
    row.update(extra)
    if device.startswith("cuda") and provider != "ptfast-cached":
        # The cached provider skips the work these numbers count, so a bandwidth figure would be meaningless.
        row["floor_s"] = floor_s(case)
        row["pct_of_floor"] = 100.0 * row["floor_s"] / median_s
        row["pct_of_hbm_bw"] = 100.0 * nbytes / median_s / HBM_BYTES_PER_S
    return row


def add_speedups(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Set ``speedup_vs_peft`` = PEFT's median / this median, per case."""
    base = {r["id"]: r["median_s"] for r in rows if r["provider"] == "peft"}
    for r in rows:
        ref = base.get(r["id"])
        r["speedup_vs_peft"] = ref / r["median_s"] if ref else None
    return rows


# ------------------------------------------------------------------------------------------------ parity


def parity(shape: Shape, dtype: str, device: str, batch: int = 2) -> Dict[str, Any]:
    """Max errors of ptfast against PEFT (same weights): forward uncached and cached, and every gradient.

    Also PEFT's own forward error against a float64 copy, as the scale of "close enough" for this dtype.
    """
    peft_enc, pt_enc = encoders(shape, dtype, device)
    idx = torch.arange(shape.M, device=device).unsqueeze(0).expand(batch, -1)
    gen = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        ref = peft_enc(idx)
        pt_enc.invalidate_cache()
        fwd = pt_enc(idx)
        cached = pt_enc(idx)
        ref64 = copy.deepcopy(peft_enc).double()(idx)
    grad_out = torch.randn(ref.shape, device=device, dtype=ref.dtype, generator=gen)
    grads = {}
    for enc in (peft_enc, pt_enc):
        enc.zero_grad(set_to_none=True)
        enc(idx).backward(grad_out)
        grads[enc] = {n: p.grad.detach().clone() for n, p in enc.named_parameters()}
        enc.zero_grad(set_to_none=True)

    def err(a, b):
        return float((a.double() - b.double()).abs().max())

    grad_err = max(err(grads[pt_enc][n], g) for n, g in grads[peft_enc].items())
    grad_scale = max(float(g.double().abs().max()) for g in grads[peft_enc].values())
    return {"shape": str(shape), "dtype": dtype, "batch": batch,
            "fwd_max_abs_err": err(fwd, ref), "cached_max_abs_err": err(cached, ref),
            "grad_max_abs_err": grad_err, "grad_max_abs": grad_scale,
            "out_max_abs": float(ref.double().abs().max()), "peft_vs_fp64_max_abs_err": err(ref, ref64),
            "finite": bool(torch.isfinite(fwd).all() and torch.isfinite(cached).all())}


# ------------------------------------------------------------------------------------------------ output


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_table(rows: List[Dict[str, Any]], info: Optional[Dict[str, Any]] = None,
                 providers: Optional[Sequence[str]] = None) -> str:
    """A text table: one row per case, the median per provider with its speedup over PEFT in parentheses.

    On CUDA, two last columns give ptfast's (uncached) floor / measured time, and its achieved bandwidth
    (bytes of :func:`work` / time) as a share of ``HBM_BYTES_PER_S``.
    """
    present = {r["provider"] for r in rows}
    providers = [p for p in (providers or PROVIDERS) if p in present]
    by_case: Dict[str, Dict[str, Dict[str, Any]]] = {}
    order: List[str] = []
    for r in rows:
        if r["id"] not in by_case:
            by_case[r["id"]] = {}
            order.append(r["id"])
        by_case[r["id"]][r["provider"]] = r
    show_floor = any("pct_of_floor" in r for r in rows)
    header = ["mode", "shape MxDxH", "B", "dtype"] + providers
    if show_floor:
        header += ["ptfast %floor", "ptfast %HBM"]
    table = [header]
    for cid in order:
        cells = by_case[cid]
        any_row = next(iter(cells.values()))
        line = [any_row["mode"] + (f" S{any_row['seq_len']}" if any_row.get("seq_len") else ""),
                f"{any_row['M']}x{any_row['D']}x{any_row['H']}", str(any_row["batch"]), any_row["dtype"]]
        for p in providers:
            r = cells.get(p)
            if r is None:
                line.append("-")
                continue
            text = fmt_time(r["median_s"])
            if p != "peft" and r.get("speedup_vs_peft"):
                text += f" ({r['speedup_vs_peft']:.2f}x)" if r["speedup_vs_peft"] < 10 else \
                    f" ({r['speedup_vs_peft']:.0f}x)"
            line.append(text)
        if show_floor:
            pr = cells.get("ptfast", {})
            line.append(f"{pr['pct_of_floor']:.0f}%" if "pct_of_floor" in pr else "-")
            line.append(f"{pr['pct_of_hbm_bw']:.0f}%" if "pct_of_hbm_bw" in pr else "-")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = []
    if info is not None:
        out.append(machine_line(info))
    for i, row in enumerate(table):
        out.append("  ".join(cell.ljust(w) if j < 4 else cell.rjust(w) for j, (cell, w) in
                             enumerate(zip(row, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("times: median per call; (Nx) = PEFT's median / this median")
    return "\n".join(out)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def plot(rows: List[Dict[str, Any]], path: str, info: Optional[Dict[str, Any]] = None) -> None:
    """A grouped bar chart of median time per case and provider (log scale), saved as PNG.

    Raises ImportError with the install command when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the plot needs matplotlib: pip install 'ptfast[bench]' (or pip install matplotlib)") \
            from exc
    present = {r["provider"] for r in rows}
    providers = [p for p in PROVIDERS if p in present]
    ids: List[str] = []
    for r in rows:
        if r["id"] not in ids:
            ids.append(r["id"])
    lookup = {(r["id"], r["provider"]): r["median_s"] for r in rows}
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(ids) + 2), 4.8))
    for k, p in enumerate(providers):
        xs = [i + (k - (len(providers) - 1) / 2) * width for i in range(len(ids))]
        ys = [lookup.get((cid, p), float("nan")) * 1e6 for cid in ids]
        bars = ax.bar(xs, ys, width, label=p)
        for x, y, cid in zip(xs, ys, ids):
            ref = lookup.get((cid, "peft"))
            if p != "peft" and ref and math.isfinite(y):
                ax.text(x, y, f"{ref * 1e6 / y:.1f}x", ha="center", va="bottom", fontsize=6, rotation=90)
        del bars
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (us, log)")
    first = {}
    for r in rows:
        first.setdefault(r["id"], r)
    shapes = {(r["M"], r["D"], r["H"]) for r in rows}
    labels = []
    for cid in ids:
        r = first[cid]
        extra = f"B{r['batch']}" + (f" S{r['seq_len']}" if r.get("seq_len") else "") + \
            ("" if r["dtype"] == "fp32" else f" {r['dtype']}")
        shape = "" if len(shapes) == 1 else f"\n{r['M']}x{r['D']}x{r['H']}"
        labels.append(f"{r['mode']}{shape}\n{extra}")
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels(labels, fontsize=7)
    title = "ptfast vs PEFT PromptEncoder"
    if len(shapes) == 1:
        title += " at MxDxH = {}x{}x{}".format(*next(iter(shapes)))
    if info:
        title += f"\n{info['device_name']}, torch {info['torch']}, ptfast {info['ptfast']}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dumps_case(case: Case) -> Dict[str, Any]:
    d = dataclasses.asdict(case)
    d["shape"] = str(case.shape)
    return d


__all__ = [
    "Bench", "Case", "Shape", "Timing", "Unavailable", "BATCHES", "MODES", "PROVIDERS", "SEED_SHAPE", "SHAPES",
    "add_speedups", "calibrate", "clear_caches", "device_slug", "encoders", "floor_s", "format_table", "grid",
    "machine_info", "make_bench", "parity", "plot", "providers_for", "resolve_device", "result_row",
    "round_target", "run_case", "run_providers", "time_interleaved", "time_fn", "work", "write_json",
]
