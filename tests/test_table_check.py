"""The C++ hit check (``csrc/table_check.cpp``): it serves hits and refreshes without the Python reading, answers
as that reading does after every kind of change, and never starts a compile. (``tests/test_cache.py`` runs every
cache test with and without it: the ``hit_check`` fixture.)"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from torch import nn
from torch.autograd.graph import increment_version

from ptfast import PromptEncoder, PromptEncoderConfig, _cache, native
from tests.helpers import settings as fp32_settings
from tests.helpers.settings import setting
from tests.test_native import _run

T, D, H = 7, 48, 19


@pytest.fixture
def check_module(native_check_module):
    return native_check_module


def make(kind="MLP", **extra):
    return PromptEncoder(
        PromptEncoderConfig(
            num_virtual_tokens=T, token_dim=D, encoder_hidden_size=H, encoder_reparameterization_type=kind, **extra
        )
    )


def idx(batch=1):
    return torch.arange(T).unsqueeze(0).expand(batch, -1)


def _native_answer(enc, grad_enabled=False):
    entry = enc._cache.entry
    check, record = entry.native
    return check(record, _cache._structure_generation, _cache._optimizer_steps, _cache._backend_key(), grad_enabled)


def _python_answer(enc, grad_enabled=False):
    """What the Python lookup concludes, in the native check's terms: True, the versions now, None (training), or
    False."""
    entry = enc._cache.entry
    snap = entry.snapshot
    if grad_enabled and snap.requires_grad():
        return None  # training: no table, whatever else changed
    if entry.table._version != entry.table_version:
        return False
    reading = snap.reading()
    if reading == snap.recorded:
        return True
    if reading is not None and _cache._only_values_changed(reading, snap.recorded):
        return tuple(reading[_cache._VERSIONS])
    return False


def test_hits_and_refreshes_skip_the_python_reading(check_module, monkeypatch):
    monkeypatch.setenv("PTFAST_BACKEND", "eager")
    enc = make()
    with torch.no_grad():
        first = enc(idx())
        assert enc._cache.entry.native is not None
        opt = torch.optim.SGD(enc.parameters(), lr=0.1)
        for p in enc.parameters():
            p.grad = torch.randn_like(p)

        def no_python_reading(self, *args):
            raise AssertionError("the Python reading ran")

        with monkeypatch.context() as m:
            m.setattr(_cache.Snapshot, "reading", no_python_reading)
            hit = enc(idx(3))
            opt.step()  # values only: the refresh, prepared at the last full computation
            refreshed = enc(idx())
            again = enc(idx())
        assert torch.equal(hit, first.expand(3, -1, -1))
        assert not torch.equal(refreshed, first)
        assert again.data_ptr() == refreshed.data_ptr()  # a hit on the refreshed table
        enc.invalidate_cache()
        assert torch.equal(enc(idx()), refreshed)  # the full computation gives the same bits


# Every fp32 precision setting the cache's key reads (torch.backends.<path>; cudnn's are the ("cuda", ...) levels).
_PRECISIONS = (
    "fp32_precision",
    "cuda.matmul.fp32_precision",
    "cudnn.fp32_precision",
    "cudnn.rnn.fp32_precision",
    "mkldnn.fp32_precision",
    "mkldnn.matmul.fp32_precision",
    "mkldnn.rnn.fp32_precision",
)


def _other_precision(path):
    """A value of the setting other than its current one."""
    if path.startswith("mkldnn"):
        return "bf16" if getattr(*setting(path)) != "bf16" else "ieee"
    return "tf32" if getattr(*setting(path)) != "tf32" else "ieee"


@contextlib.contextmanager
def _precision(path, value):
    """One fp32 precision setting (``torch.backends.<path>``) set to ``value`` while the body runs, every one of
    them restored after (``set_float32_matmul_precision`` and the levels write each other)."""
    with fp32_settings.fp32_settings_restored():
        setattr(*setting(path), value)
        yield


@contextlib.contextmanager
def _matmul_precision(value):
    """``torch.set_float32_matmul_precision(value)`` while the body runs, every fp32 setting restored after."""
    with fp32_settings.fp32_settings_restored():
        torch.set_float32_matmul_precision(value)
        yield


def _changes(enc):
    """(name, expected native answer, a context that makes the change while its body runs). Expected: True
    (current), "versions" (only values changed), False (a change: Python must not find the table current either),
    "python" (False, and whatever Python concludes stands)."""
    lin = enc.mlp_head[0]
    weight = enc.embedding.weight

    @contextlib.contextmanager
    def nothing():
        yield

    @contextlib.contextmanager
    def bump():
        increment_version(weight)
        yield

    @contextlib.contextmanager
    def optimizer_step_without_writes():
        opt = torch.optim.SGD(enc.parameters(), lr=0.1)
        opt.step()  # no gradients: nothing written, but the step is counted (fused kernels bump no versions)
        yield

    def weight_data_set_to(view):
        """``lin.weight.data = view(lin.weight.data)`` while the body runs."""

        @contextlib.contextmanager
        def change():
            old = lin.weight.data
            lin.weight.data = view(old)
            yield
            lin.weight.data = old

        return change

    @contextlib.contextmanager
    def swapped_into_dict():  # what torch.func.functional_call does
        old = lin._parameters["weight"]
        lin._parameters["weight"] = nn.Parameter(old.detach().clone())
        yield
        lin._parameters["weight"] = old

    @contextlib.contextmanager
    def mode():
        enc.train(not enc.training)
        yield
        enc.train(not enc.training)

    @contextlib.contextmanager
    def module_hook():
        handle = lin.register_forward_hook(lambda *a: None)
        yield
        handle.remove()

    @contextlib.contextmanager
    def global_hook():
        handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
        yield
        handle.remove()

    @contextlib.contextmanager
    def backend_env():
        with pytest.MonkeyPatch.context() as m:
            m.setenv("PTFAST_BACKEND", "eager" if os.environ.get("PTFAST_BACKEND") != "eager" else "auto")
            yield

    @contextlib.contextmanager
    def other_thread_count():
        old = torch.get_num_threads()
        torch.set_num_threads(1 if old != 1 else 2)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    @contextlib.contextmanager
    def table_written():
        enc._cache.entry.table.add_(0)
        yield

    @contextlib.contextmanager
    def subclass_at_place():
        class Tagged(torch.Tensor):
            pass

        old = enc._modules["embedding"]._parameters["weight"]
        enc._modules["embedding"]._parameters["weight"] = old.detach().as_subclass(Tagged)
        yield
        enc._modules["embedding"]._parameters["weight"] = old

    @contextlib.contextmanager
    def inference_tensor_at_place():
        old = lin._parameters["bias"]
        with torch.inference_mode():
            lin._parameters["bias"] = old.detach().clone()
        yield
        lin._parameters["bias"] = old

    return [
        ("nothing", True, nothing),
        ("version bump", "versions", bump),
        ("optimizer step, no writes", "versions", optimizer_step_without_writes),
        ("p.data = clone", False, weight_data_set_to(torch.clone)),
        ("p.data = p.data.t()", False, weight_data_set_to(torch.t)),
        ("p.data = p.data[:-1]", False, weight_data_set_to(lambda w: w[:-1])),
        ("tensor put into _parameters", False, swapped_into_dict),
        ("train/eval", False, mode),
        ("forward hook on a layer", False, module_hook),
        ("process-wide hook", False, global_hook),
        ("autocast", False, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        ("fp32 matmul precision", False, lambda: _matmul_precision("high")),
        ("oneDNN matmul precision", False, lambda: _precision("mkldnn.matmul.fp32_precision", "bf16")),
        ("oneDNN precision", False, lambda: _precision("mkldnn.fp32_precision", "bf16")),
        ("oneDNN RNN precision", False, lambda: _precision("mkldnn.rnn.fp32_precision", "bf16")),
        ("cuDNN RNN precision", False, lambda: _precision("cudnn.rnn.fp32_precision", "ieee")),
        ("PTFAST_BACKEND", False, backend_env),
        ("CPU thread count", False, other_thread_count),
        ("write into the table", False, table_written),
        ("tensor subclass at a place", "python", subclass_at_place),  # same memory and counter: Python says current
        ("inference tensor at a place", False, inference_tensor_at_place),
    ]


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_native_answers_as_the_python_reading_does(check_module, kind):
    names = [name for name, _, _ in _changes(make())]
    for i, name in enumerate(names):
        enc = make(kind)
        if name == "train/eval":
            enc.eval()
        with torch.no_grad():
            enc(idx())
        assert enc._cache.entry.native is not None, name
        _, expected, change = _changes(enc)[i]
        with change():
            native_answer, python_answer = _native_answer(enc), _python_answer(enc)
        if expected == "versions":
            assert isinstance(native_answer, tuple), (name, native_answer)
            assert native_answer == python_answer, name
        elif expected == "python":
            assert native_answer is False, (name, native_answer)
        else:
            assert native_answer is expected, (name, native_answer)
            assert (python_answer is True) is expected, (name, python_answer)  # Python sees the change too


def test_grad_mode_asks_python_while_a_parameter_requires_grad(check_module):
    enc = make()
    with torch.no_grad():
        enc(idx())
    assert _native_answer(enc, grad_enabled=True) is None  # training: computed with autograd
    assert _python_answer(enc, grad_enabled=True) is None
    assert _native_answer(enc, grad_enabled=False) is True
    enc.requires_grad_(False)
    assert _native_answer(enc, grad_enabled=True) is True  # frozen: the cached table serves grad mode too
    out = enc(idx())
    assert out.data_ptr() == enc._cache.entry.table.data_ptr()


def test_tensor_key_changes_with_what_the_index_memo_keys_on(check_module):
    key, same = check_module.tensor_key, check_module.same_tensor_key
    t = torch.arange(2 * T).reshape(2, T)
    k = key(t)
    assert isinstance(k, bytes) and key(t) == k and same(t, k)
    increment_version(t)
    assert key(t) != k and not same(t, k)
    k = key(t)
    t.data = t.data.clone()  # replaced memory, no version bump
    assert key(t) != k
    k = key(t)
    assert key(t.view(torch.float64)) != k  # same address, shape and strides; another dtype
    assert key(t.view(T, 2)) != k and key(t.t()) != k and key(t[:1]) != k
    assert not same(t, b"short")
    assert key(t.as_subclass(type("Tagged", (torch.Tensor,), {}))) is None
    with torch.inference_mode():
        assert key(torch.arange(3)) is None


def test_settings_word_sees_autocast_matmul_precision_and_threads(check_module):
    word = check_module.settings_word
    base = word()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = word()
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = word()
    with _matmul_precision("high"):
        high = word()
    levels = []
    for path in _PRECISIONS:
        with _precision(path, _other_precision(path)):
            levels.append(word())
    old = torch.get_num_threads()
    counts = [n for n in (1, 2, 3, 1000) if n != old]
    threads = {}
    try:
        for n in (*counts, 1023, 5000):
            torch.set_num_threads(n)
            threads[n] = word()
    finally:
        torch.set_num_threads(old)
    assert threads[1023] == threads[5000]  # counts from 1023 on share one value (the word's 10 bits for it)
    seen = [base, bf16, fp16, high, *levels, *(threads[n] for n in counts)]
    assert len(set(seen)) == 4 + len(_PRECISIONS) + len(counts), seen
    assert word() == base


_NO_COMPILE_CHILD = """
import json, os, torch
from ptfast import PromptEncoder, PromptEncoderConfig, native
native._prebuilt_candidates = lambda: []
enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=5, token_dim=12, encoder_hidden_size=7))
with torch.no_grad():
    outs = [enc(torch.arange(5).unsqueeze(0)) for _ in range(3)]
print(json.dumps(dict(
    status=native._status, module=native.table_check_module() is not None,
    entry_native=enc._cache.entry.native is not None, same=all(torch.equal(o, outs[0]) for o in outs),
)))
"""


def test_the_cache_never_starts_a_compile(tmp_path):
    """With no library built, the cache checks in Python: nothing compiled, nothing said, nothing recorded (a
    later ``prepend_prompts`` may still build)."""
    proc = _run(_NO_COMPILE_CHILD, {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"status": None, "module": False, "entry_native": False, "same": True}, res
    assert "ptfast" not in proc.stderr, proc.stderr
    assert not any(p.suffix == ".so" for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))


_REUSED_ADDRESS_CHILD = """
import ctypes, json, torch
import torch.nn.functional as F
# A fixed mmap threshold: glibc then keeps freed blocks of this size for the next allocation of the same size.
ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
from ptfast import PromptEncoder, PromptEncoderConfig, native
results = []
for check in ("python", "native"):
    if check == "python":
        lookup = native.table_check_module
        native.table_check_module = lambda: None
    else:
        native.table_check_module = lookup
        if not native.native_available():
            break
    T, B = 7, 8192  # an mmap-sized index tensor
    enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=T, token_dim=16, encoder_hidden_size=8)).eval()
    with torch.no_grad():
        idx = torch.empty(B, T, dtype=torch.long)
        idx.copy_(torch.arange(T).expand(B, T))
        enc(idx), enc(idx)  # the memo: these indices, the arange
        address = idx.data_ptr()
        idx.data = torch.zeros(B, T, dtype=torch.long)  # the memo's tensor object now points elsewhere
        other = torch.empty(B, T, dtype=torch.long)  # same size, same version counter after one write
        other.copy_(torch.arange(T - 1, -1, -1).expand(B, T))
        out = enc(other)
        correct = torch.equal(out, F.embedding(other, enc.table()))
        reused = other.data_ptr() == address
        results.append(dict(check=check, native_key=enc._index_check.native_key is not None, reused=reused,
                            correct=correct))
print(json.dumps(results))
"""


def test_the_index_memo_holds_the_memory_it_keys_on(tmp_path):
    """After ``idx.data = ...`` frees the memoized indices' memory, other indices allocated there (same address,
    version and layout) are checked, not taken for the memoized arange. Both keys, in a child process whose
    allocator reuses the freed block."""
    proc = _run(_REUSED_ADDRESS_CHILD, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results and all(r["correct"] for r in results), results
    assert results[0]["check"] == "python" and not results[0]["native_key"]


def test_a_cached_forward_never_waits_for_a_compile(monkeypatch):
    """While another thread holds the build lock (a first-use compile), the cache's load without building answers at
    once: no library yet, nothing recorded."""
    monkeypatch.delenv("PTFAST_NO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_check_module", None)
    monkeypatch.setattr(native, "_check_looked_at", native._NOT_LOOKED)
    with native._lock:  # what a compiling thread holds
        assert native._ensure_loaded(build=False) is False
        assert native.table_check_module() is None
    assert native._status is None


def test_ptfast_no_native_is_read_at_every_lookup(monkeypatch):
    monkeypatch.delenv("PTFAST_NO_NATIVE", raising=False)
    if not native.native_available() or native.table_check_module() is None:
        pytest.skip("no C++ extension here")
    monkeypatch.setenv("PTFAST_NO_NATIVE", "1")
    assert native.table_check_module() is None
    enc = make()
    with torch.no_grad():
        enc(idx())
    assert enc._cache.entry.native is None
