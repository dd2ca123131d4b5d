"""prepend_prompts / extend_attention_mask / extend_labels: values, dtypes, validation, backends, GPU compile."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ptfast import _env
from ptfast.ops.prepend import (
    extend_attention_mask,
    extend_labels,
    prepend_backend,
    prepend_prompts,
    prepend_prompts_reference,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
# PTFAST_NO_NATIVE=1 (a run of the suite without the extension): the native cases are left out, not failed
NATIVE = [] if _env.native_disabled() else ["native"]
needs_native = pytest.mark.skipif(not NATIVE, reason="PTFAST_NO_NATIVE is set")
CPU_BACKENDS = ["eager"] + NATIVE + (["triton"] if INTERPRET else [])


def _inputs(B=3, L=7, V=50, D=24, A=4, T=5, dtype=torch.float32, id_dtype=torch.int64, device="cpu"):
    we = (torch.randn(V, D) * 3).to(dtype)
    tables = (torch.randn(A, T, D) * 3).to(dtype)
    ids = torch.randint(0, V, (B, L), dtype=id_dtype)
    ai = torch.randint(0, A, (B,), dtype=torch.int64)
    return ids.to(device), we.to(device), tables.to(device), ai.to(device)


def _peft_path(ids, we, table):
    """PEFT's PeftModelForCausalLM.forward for one adapter: embed, repeat, cast, cat."""
    embeds = F.embedding(ids, we)
    prompts = table.unsqueeze(0).repeat(ids.shape[0], 1, 1).to(embeds.dtype)
    return torch.cat((prompts, embeds), dim=1)


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool, torch.complex64],
)
def test_matches_reference_bitwise(backend, dtype):
    ids, we, tables, ai = _inputs(dtype=dtype)
    out = prepend_prompts(ids, we, tables, ai, backend=backend)
    ref = prepend_prompts_reference(ids, we, tables, ai)
    assert out.dtype == dtype and out.shape == (3, 5 + 7, 24) and out.is_contiguous()
    # Compare bits (NaN-safe, -0.0-safe).
    assert (
        torch.equal(out.view(torch.uint8), ref.contiguous().view(torch.uint8))
        if dtype != torch.bool
        else torch.equal(out, ref)
    )
    for b in range(3):
        assert torch.equal(out[b, :5], tables[ai[b]])
        assert torch.equal(out[b, 5:], we[ids[b]])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_equals_peft_path_per_adapter(backend):
    ids, we, tables, _ = _inputs(B=4, dtype=torch.bfloat16)
    for a in range(tables.shape[0]):
        ai = torch.full((4,), a, dtype=torch.int64)
        assert torch.equal(prepend_prompts(ids, we, tables, ai, backend=backend), _peft_path(ids, we, tables[a]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_and_int32_indices(backend):
    V, D = 40, 16
    big = torch.randn(V, 2 * D)
    we = big[:, ::2]  # innermost stride 2 -> made dense
    we_rows = torch.randn(V, D + 3)[:, :D]  # row stride D + 3, dense inner dim
    tables = torch.randn(5, 2, 3, D)[:, 1]  # (A, T, D) with a gap between adapters
    ids = torch.randint(0, V, (6, 4), dtype=torch.int32).t()  # (4, 6) transposed
    ai = torch.randint(0, 5, (8,), dtype=torch.int32)[::2]
    for w in (we, we_rows):
        out = prepend_prompts(ids, w, tables, ai, backend=backend)
        assert torch.equal(out, prepend_prompts_reference(ids, w, tables, ai))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [dict(B=0), dict(L=0), dict(T=0), dict(D=1), dict(D=1000, L=3), dict(B=1, L=1)])
def test_edge_shapes(backend, shape):
    ids, we, tables, ai = _inputs(**shape)
    out = prepend_prompts(ids, we, tables, ai, backend=backend)
    assert torch.equal(out, prepend_prompts_reference(ids, we, tables, ai))


@needs_interpreter
def test_triton_large_row_multiple_column_blocks():
    # D > BLOCK_D (2048 fp32) -> several column programs per row, masked tail
    ids, we, tables, ai = _inputs(B=2, L=2, V=9, D=2048 + 37, A=2, T=1)
    out = prepend_prompts(ids, we, tables, ai, backend="triton")
    assert torch.equal(out, prepend_prompts_reference(ids, we, tables, ai))


@needs_interpreter
def test_env_forces_triton_and_eager(monkeypatch):
    ids, we, tables, ai = _inputs()
    monkeypatch.setenv("PTFAST_BACKEND", "triton")
    assert prepend_backend(we.device) == "triton"
    assert torch.equal(prepend_prompts(ids, we, tables, ai), prepend_prompts_reference(ids, we, tables, ai))
    monkeypatch.setenv("PTFAST_BACKEND", "eager")
    assert prepend_backend(we.device) == "eager"
    monkeypatch.setenv("PTFAST_BACKEND", "native")  # not a PTFAST_BACKEND value (fused_mlp_head rejects it too)
    with pytest.raises(ValueError, match="PTFAST_BACKEND"):
        prepend_prompts(ids, we, tables, ai)


def test_auto_backend_on_cpu_is_native(monkeypatch):
    monkeypatch.delenv("PTFAST_BACKEND", raising=False)
    monkeypatch.delenv("PTFAST_NO_NATIVE", raising=False)
    assert prepend_backend(torch.device("cpu")) == "native"
    monkeypatch.setenv("PTFAST_NO_NATIVE", "1")  # read at call time
    assert prepend_backend(torch.device("cpu")) == "eager"
    with pytest.raises(RuntimeError, match="PTFAST_NO_NATIVE"):
        prepend_backend(torch.device("cpu"), "native")


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        prepend_backend(torch.device("cpu"), "triton")


def test_meta_tensors_shape_only():
    ids, we, tables, ai = _inputs(device="meta")
    for backend in NATIVE + ["eager"]:
        out = prepend_prompts(ids, we, tables, ai, backend=backend)
        assert out.device.type == "meta" and out.shape == (3, 12, 24) and out.dtype == torch.float32


@needs_native
def test_autograd_routes_to_eager():
    ids, we, tables, ai = _inputs()
    we.requires_grad_(True)
    tables.requires_grad_(True)
    out = prepend_prompts(ids, we, tables, ai, backend="native")
    assert out.grad_fn is not None
    out.sum().backward()
    ref_we = torch.zeros_like(we).index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), we.shape[1]))
    assert torch.equal(we.grad, ref_we)
    assert torch.equal(tables.grad.sum(), torch.tensor(float(3 * 5 * 24)))
    with torch.no_grad():
        assert prepend_prompts(ids, we, tables, ai, backend="native").grad_fn is None


def test_native_op_direct_checks_protect_memory():
    # Even when called directly (no Python validation), the C++ op refuses bad indices instead of reading OOB.
    ids, we, tables, ai = _inputs()
    bad = ids.clone()
    bad[1, 2] = 50
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.ptfast.prepend_prompts(bad, we, tables, ai)
    with pytest.raises(RuntimeError, match="adapter index"):
        torch.ops.ptfast.prepend_prompts(ids, we, tables, torch.tensor([0, 4, 0]))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ptfast.prepend_prompts(ids, we, tables.double(), ai)


# ------------------------------------------------------------------------------------------------ validation
def _bad_cases():
    ids, we, tables, ai = _inputs()
    neg = ids.clone()
    neg[0, 0] = -1
    big = ids.clone()
    big[2, 6] = 50
    return [
        ("ids out of range (high)", (big, we, tables, ai), IndexError, r"token id 50 out of range \[0, 50\)"),
        ("ids out of range (neg)", (neg, we, tables, ai), IndexError, "token id -1"),
        ("adapter out of range", (ids, we, tables, torch.tensor([0, 4, 1])), IndexError, "adapter index 4"),
        ("adapter negative", (ids, we, tables, torch.tensor([0, -1, 1])), IndexError, "adapter index -1"),
        ("float ids", (ids.float(), we, tables, ai), TypeError, "input_ids must be an integer"),
        ("bool ids", (ids > 3, we, tables, ai), TypeError, "input_ids must be an integer"),
        ("int16 ids", (ids.short(), we, tables, ai), TypeError, "input_ids must be an integer"),
        ("float adapter index", (ids, we, tables, ai.float()), TypeError, "adapter_index must be an integer"),
        ("list ids", (ids.tolist(), we, tables, ai), TypeError, "input_ids must be a torch.Tensor"),
        ("1-D ids", (ids[0], we, tables, ai), ValueError, "input_ids must be 2-D"),
        ("3-D we", (ids, we[None], tables, ai), ValueError, "word_embeddings must be 2-D"),
        ("2-D tables", (ids, we, tables[0], ai), ValueError, "tables must be 3-D"),
        ("2-D adapter index", (ids, we, tables, ai[None]), ValueError, "adapter_index must be 1-D"),
        ("dtype mismatch", (ids, we, tables.half(), ai), TypeError, "cast the tables once"),
        ("width mismatch", (ids, we, tables[..., :-1], ai), ValueError, "width 23"),
        ("batch mismatch", (ids, we, tables, ai[:2]), ValueError, "2 entries but input_ids has 3 rows"),
        ("device mismatch", (ids.to("meta"), we, tables, ai), ValueError, "input_ids is on meta"),
        ("no tables", (ids, we, tables[:0], ai), IndexError, "adapter index"),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_before_any_kernel(backend, case, monkeypatch):
    _, args, exc, match = case
    import ptfast.kernels.prepend as kp

    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("kernel launched before validation")

    monkeypatch.setattr(kp, "prepend_prompts_triton", boom)
    with pytest.raises(exc, match=match):
        prepend_prompts(*args, backend=backend)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        prepend_prompts(*_inputs(), backend="cuda")


# ------------------------------------------------------------------------------------------------ mask / labels
def _peft_mask(mask, T):  # PeftModelForCausalLM.forward, verbatim
    prefix = torch.ones(mask.shape[0], T).to(mask.device)
    return torch.cat((prefix, mask), dim=1)


def _peft_labels(labels, T):
    prefix = torch.full((labels.shape[0], T), -100).to(labels.device)
    return torch.cat((prefix, labels), dim=1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float16, torch.float32])
def test_extend_attention_mask_like_peft(dtype):
    mask = (torch.rand(3, 6) > 0.3).to(dtype)
    out = extend_attention_mask(mask, 4)
    ref = _peft_mask(mask, 4)
    assert out.dtype == ref.dtype == torch.promote_types(torch.float32, dtype)
    assert torch.equal(out, ref) and out.device == mask.device
    assert torch.equal(out[:, :4], torch.ones(3, 4, dtype=out.dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_extend_labels_like_peft(dtype):
    labels = torch.randint(0, 100, (2, 5), dtype=dtype)
    out = extend_labels(labels, 3)
    ref = _peft_labels(labels, 3)
    assert out.dtype == ref.dtype == torch.int64
    assert torch.equal(out, ref) and (out[:, :3] == -100).all()


def test_extend_helpers_validate():
    with pytest.raises(ValueError, match="2-D"):
        extend_attention_mask(torch.ones(3), 2)
    with pytest.raises(TypeError):
        extend_labels([[1, 2]], 2)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        extend_labels(torch.ones(1, 2, dtype=torch.long), -1)
    assert extend_labels(torch.ones(1, 2, dtype=torch.long), 0).shape == (1, 2)


# ------------------------------------------------------------------------------------------------ GPU compile
@pytest.mark.slow
def test_triton_kernel_compiles_for_sm80_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.triton_compile", "--set", "prepend"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )  # the shared compile harness
    if proc.returncode == 3:
        pytest.skip(f"triton compile API / cuobjdump unavailable: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(recs) >= 2 * (8 + 9 + 9)
    for rec in recs:
        assert rec["local"] in (0, None) and rec["stack"] in (0, None), rec  # no spills / local memory
        assert rec["shared"] in (0, None), rec  # a pure copy needs no shared memory
        assert rec["reg"] is not None and rec["reg"] <= 64, rec
    # 16-byte aligned rows are moved with vector loads (the D = 4096 serving case)
    assert all(
        r["vector_ld"]
        for r in recs
        if r["aligned"]
        and r["BLOCK_D"] * {"fp32": 4}.get(r["dtype"], 2) >= 512
        and r["dtype"] in ("fp32", "fp16", "bf16")
    )
