"""fused_mlp_head: CPU eager fallback, input validation, backend selection, and the drivers for the
interpreter suite (tests/test_mlp_head_interp.py) and the compile-for-GPU check
(tests/helpers/triton_compile.py), both run in subprocesses so they work whatever this process imported.
GPU tests are marked ``gpu`` and skip without CUDA."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ptfast.ops import mlp_head as ops  # noqa: E402
from ptfast.ops.mlp_head import fused_mlp_head, mlp_head_reference  # noqa: E402
from tests.helpers.mlp_head import mlp_head_params  # noqa: E402
from tests.helpers.settings import fp32_settings_restored  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _kernels_on_cuda(request, monkeypatch):
    """GPU tests here test the kernels: `auto` keeps the head eager on CUDA (measured slower, ptfast/_env.py)."""
    if request.node.get_closest_marker("gpu") is not None:
        monkeypatch.setenv("PTFAST_BACKEND", "triton")


@pytest.fixture
def eager_env(monkeypatch):
    monkeypatch.delenv("PTFAST_BACKEND", raising=False)


# ------------------------------------------------------------------------------------------------
# CPU fallback
# ------------------------------------------------------------------------------------------------


def test_cpu_default_is_bitwise_peft_sequential(eager_env):
    M, D, H = 7, 64, 33
    torch.manual_seed(0)
    seq = torch.nn.Sequential(
        torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, H), torch.nn.ReLU(), torch.nn.Linear(H, D)
    )
    x = torch.randn(2, M, D, requires_grad=True)
    ref = seq(x)
    ref.sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in seq.parameters()]
    x.grad = None
    seq.zero_grad()
    ws = [seq[0].weight, seq[0].bias, seq[2].weight, seq[2].bias, seq[4].weight, seq[4].bias]
    out = fused_mlp_head(x, *ws)
    assert torch.equal(out, ref)
    out.sum().backward()
    for a, b in zip([x.grad] + [p.grad for p in seq.parameters()], ref_grads):
        assert torch.equal(a, b)
    assert torch.equal(out, mlp_head_reference(x, *ws))


def test_forced_eager_backend_and_float64(monkeypatch):
    monkeypatch.setenv("PTFAST_BACKEND", "eager")
    p = mlp_head_params(3, 16, 8, dtype=torch.float64)
    assert torch.equal(fused_mlp_head(*p), mlp_head_reference(*p))


# ------------------------------------------------------------------------------------------------
# Validation / backend selection
# ------------------------------------------------------------------------------------------------


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("PTFAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="PTFAST_BACKEND"):
        fused_mlp_head(*mlp_head_params(2, 8, 4))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="interpreter is on")
def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("PTFAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_mlp_head(*mlp_head_params(2, 8, 4))


def test_bad_precision(eager_env):
    with pytest.raises(ValueError, match="precision"):
        fused_mlp_head(*mlp_head_params(2, 8, 4), precision="fast")
    with pytest.raises(ValueError, match="precision"):
        fused_mlp_head(*mlp_head_params(2, 8, 4), precision=3)


@pytest.fixture
def restore_matmul_precision():
    with fp32_settings_restored():
        yield


def test_precision_follows_pytorch(restore_matmul_precision):
    """None reads PyTorch's fp32 matmul setting at call time: "highest" -> 3xTF32, "high"/"medium" -> TF32."""
    for setting, expected in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32"), ("highest", "tf32x3")):
        torch.set_float32_matmul_precision(setting)
        assert ops.resolve_precision(None, torch.float32) == expected, setting
        assert ops.resolve_precision(None, torch.bfloat16) == "ieee"  # 16-bit dots: one variant
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return  # torch < 2.9 has only the switch above
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # the newer per-backend switch
    assert ops.resolve_precision(None) == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert ops.resolve_precision(None) == "tf32x3"
    for name, kernel in (
        ("highest", "tf32x3"),
        ("high", "tf32"),
        ("medium", "tf32"),
        ("ieee", "ieee"),
        ("tf32", "tf32"),
        ("tf32x3", "tf32x3"),
    ):
        assert ops.resolve_precision(name, torch.float32) == kernel
    with pytest.raises(ValueError, match="precision"):
        ops.resolve_precision("fast", torch.float32)


def _replace(p, i, v):
    p = list(p)
    p[i] = v
    return p


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda p: _replace(p, 1, p[1][:, :-1]), ValueError, "w1 has shape"),
        (lambda p: _replace(p, 3, p[3][:-1]), ValueError, "w2 has shape"),
        (lambda p: _replace(p, 5, p[5].t()), ValueError, "w3 has shape"),
        (lambda p: _replace(p, 2, p[2][:-1]), ValueError, "b1 has shape"),
        (lambda p: _replace(p, 4, p[4][:-1]), ValueError, "b2 has shape"),
        (lambda p: _replace(p, 6, p[6][:-1]), ValueError, "b3 has shape"),
        (lambda p: _replace(p, 0, p[0][:, :-1]), ValueError, "w1 has shape"),
        (lambda p: _replace(p, 1, p[1][None]), ValueError, "w1 must be 2-D"),
        (lambda p: _replace(p, 6, p[6][None]), ValueError, "b3 must be 1-D"),
        (lambda p: _replace(p, 0, torch.tensor(1.0)), ValueError, "at least 1 dimension"),
        (lambda p: _replace(p, 3, p[3].half()), TypeError, "w2 is torch.float16"),
        (lambda p: _replace(p, 0, p[0].to(torch.int64)), TypeError, "x must be a floating-point"),
        (lambda p: _replace(p, 4, p[4].to(torch.int32)), TypeError, "b2 must be a floating-point"),
        (lambda p: _replace(p, 5, p[5].numpy()), TypeError, "w3 must be a torch.Tensor"),
        (lambda p: _replace(p, 2, p[2].to("meta")), ValueError, "b1 is on meta"),
        (lambda p: [t[..., :0] if i == 0 else t for i, t in enumerate(p)], ValueError, "D and H"),
    ],
)
def test_bad_inputs(make, exc, match, eager_env):
    with pytest.raises(exc, match=match):
        fused_mlp_head(*make(mlp_head_params(3, 8, 4)))


def test_bad_dtype_for_triton_backend_is_rejected_before_launch(monkeypatch):
    monkeypatch.setenv("PTFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # get past the interpreter check; nothing launches
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        fused_mlp_head(*mlp_head_params(3, 8, 4, dtype=torch.float64))


def test_config_heuristics_are_enumerated():
    """The compile test enumerates configs from these tables; make sure they are exhaustive."""
    pytest.importorskip("triton")
    from ptfast.kernels import linear
    from ptfast.kernels import mlp_head as k
    from ptfast.kernels import mlp_head_small as small

    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for prec in ("ieee", "tf32", "tf32x3"):
            for H in range(1, small.small_max_h(dt, prec) + 1):
                assert small.head23_config(20, H, dt, prec)["BLOCK_H"] in small.BLOCK_H_CHOICES
            for M in range(1, 300):
                assert linear.linear_config(M, dt, prec)["BLOCK_M"] in linear.BLOCK_M_CHOICES
                assert small.head23_config(M, 128, dt, prec)["BLOCK_M"] in (16, 32)
    assert k.use_small_path(128, torch.float32, "tf32x3")  # seed shape: one launch each way
    assert not k.use_small_path(4096, torch.bfloat16, "ieee")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_counts_and_split_k_plans(dtype):
    """Forward and backward: 1 launch each at the seed shape (every phase in one grid); small H with M > 32: 2 and
    3; 3 each otherwise. Split-K never needs another launch."""
    pytest.importorskip("triton")
    from ptfast.kernels import mlp_head as k

    prec = "tf32x3" if dtype == torch.float32 else "ieee"
    for (M, D, H), n, n_bwd in (
        ((20, 1024, 128), 1, 1),
        ((64, 1024, 128), 2, 3),
        ((20, 4096, 4096), 3, 3),
        ((100, 4096, 1024), 3, 3),
        ((20, 8192, 8192), 3, 3),
    ):
        fwd = k.forward_plan(M, D, H, dtype=dtype, precision=prec)
        bwd = k.backward_plan(M, D, H, dtype=dtype, precision=prec)
        assert len(fwd) == n and len(bwd) == n_bwd
        if n == 1:  # every program resident: the grid barrier needs it
            assert fwd[0].ctas <= 132 and bwd[0].ctas <= 132
            assert [p.kernel for p in fwd[0].parts] == ["linear._linear_kernel", "mlp_head_small._head23_kernel"]
            assert len(bwd[0].parts) == 3
        if (M, D, H) == (20, 1024, 128):  # every weight byte once; recomputed layer 2 <= 1.5x the useful MACs
            useful = M * (D * H + H * H + H * D)
            real_rows = sum(
                plan.macs * M // (plan.grid[0 if "head23" in plan.kernel else 1] * plan.constexprs["BLOCK_M"])
                for plan in fwd[0].parts
            )
            assert real_rows <= 1.5 * useful, real_rows / useful


# ------------------------------------------------------------------------------------------------
# Subprocess drivers: interpreter suite and compile-for-GPU
# ------------------------------------------------------------------------------------------------


def _kernels_interpreted_here() -> bool:
    try:
        from ptfast.kernels import mlp_head as k
    except Exception:
        return False
    return type(k._linear_kernel).__name__ == "InterpretedFunction"


def _subprocess_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.update(extra)
    return env


@pytest.mark.slow
def test_interpreter_suite():
    pytest.importorskip("triton")
    if _kernels_interpreted_here():
        pytest.skip("interpreter active in this process: tests/test_mlp_head_interp.py runs in-process")
    env = _subprocess_env(TRITON_INTERPRET="1", PTFAST_BACKEND="triton")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(ROOT, "tests", "test_mlp_head_interp.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.split("\n")[-2], tail


@pytest.mark.slow
def test_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "compile.json"
    env = _subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(
        [sys.executable, "-m", "tests.helpers.triton_compile", "--set", "mlp_head", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode == 3:
        pytest.skip(f"triton compile API / tools unavailable: {r.stderr[-500:]}")
    bad = [ln for ln in r.stdout.splitlines() if ln.startswith("{") and '"problems": []' not in ln]
    assert r.returncode == 0 and not bad, "\n".join(bad)[-6000:] + r.stderr[-3000:]
    records = json.loads(out.read_text())
    kernels = {rec["kernel"] for rec in records}
    assert kernels == {"_head23_kernel", "_linear_kernel", "_bwd_kernel", "_fwd_kernel", "_bwd_kernel3"}
    assert {rec["cc"] for rec in records} == {80, 90}
    assert {rec["dtype"] for rec in records} == {"fp32", "fp16", "bf16"}
    # tensor cores wherever they are meant (the harness flags a missing MMA as a problem too)
    assert all(rec["loop"]["mma"] > 0 for rec in records if rec["precision"] != "ieee" or rec["dtype"] != "fp32")


@pytest.mark.slow
def test_audit_cost_model(tmp_path):
    """python -m ptfast.kernels.audit: what must hold for every launch the dispatcher picks at the benchmark
    shapes on sm_90 (MMA in every main loop, no spills, every launch costed). ~1-2 min cold."""
    pytest.importorskip("triton")
    out = tmp_path / "audit.json"
    env = _subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(
        [sys.executable, "-m", "ptfast.kernels.audit", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode == 3:
        pytest.skip(r.stderr[-500:])
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(out.read_text())
    for row in data["rows"]:
        assert row["loop"]["mma"] > 0, row
        assert row["spill_stores"] == row["spill_loads"] == row["local"] == row["stack"] == 0, row
    summary = {(tuple(s["shape"]), s["dtype"], s["precision"]): s for s in data["summary"]}
    assert {k[1:] for k in summary} == {("fp32", "tf32x3"), ("fp32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee")}
    assert ops.resolve_precision("highest") == "tf32x3" and ops.resolve_precision("high") == "tf32"  # what it audits
    from ptfast.kernels.mlp_head import backward_plan, forward_plan

    for (shape, dtype, prec), s in summary.items():  # every launch the dispatcher plans is costed, once
        td = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        assert s["fwd_launches"] == len(forward_plan(*shape, dtype=td, precision=prec))
        assert s["bwd_launches"] == len(backward_plan(*shape, dtype=td, precision=prec))
        assert 0 < s["fwd_s"] and 0 < s["bwd_s"], s
    for dtype, prec in (("fp32", "tf32x3"), ("bf16", "ieee")):  # the small path recomputes layer 2 within bounds
        seed = summary[((20, 1024, 128), dtype, prec)]
        assert seed["fwd_real_row_macs"] <= 1.5 * seed["useful_macs"], seed
    # the model's fit to the H200 measurements and the time goals: tests/test_audit_calibration.py


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------------


def _check_vs_fp64(M, D, H, dtype, precision=None, path=None, monkeypatch=None):
    if path and monkeypatch is not None:
        monkeypatch.setenv("PTFAST_MLP_HEAD_PATH", path)
    p = mlp_head_params(M, D, H, seed=1)
    go = torch.randn(M, D, generator=torch.Generator().manual_seed(2))

    def run(fn, dt, dev):
        ts = [t.to(device=dev, dtype=dt).detach().requires_grad_() for t in p]
        y = fn(*ts)
        y.backward(go.to(device=dev, dtype=dt))
        return [y.detach().double().cpu()] + [t.grad.double().cpu() for t in ts]

    ref = run(mlp_head_reference, torch.float64, "cuda")
    got = run(lambda *a: fused_mlp_head(*a, precision=precision), dtype, "cuda")
    base = run(mlp_head_reference, dtype, "cuda")  # PyTorch's own error at this dtype (and matmul precision)
    kernel_prec = ops.kernel_precision(precision, dtype)
    rel = {torch.float32: 5e-3 if kernel_prec == "tf32" else 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    for r, a, b in zip(ref, got, base):
        assert torch.isfinite(a).all()
        scale = r.abs().max().item()
        assert (a - r).abs().max().item() <= 2 * (b - r).abs().max().item() + rel * scale + 1e-6


# Shapes and M values are chosen to reach every config with few compiles: M not a multiple of 16 (M is never
# marked divisible at launch, like the real token counts), D and H both aligned (div16) and odd (i32).
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,D,H", [(20, 1024, 128), (7, 1000, 129), (200, 768, 256), (20, 4096, 4096)])
def test_gpu_shapes(M, D, H, dtype):
    _check_vs_fp64(M, D, H, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("precision", ["tf32", "ieee", "tf32x3"])
@pytest.mark.parametrize("path", ["small", "large"])
def test_gpu_precisions_and_paths(path, precision, monkeypatch):
    _check_vs_fp64(33, 1000, 127, torch.float32, precision=precision, path=path, monkeypatch=monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_precision_follows_torch(restore_matmul_precision):
    p = [t.cuda() for t in mlp_head_params(20, 1024, 128, seed=3)]
    ref = mlp_head_reference(*[t.double() for t in p])
    torch.set_float32_matmul_precision("highest")
    err_highest = (fused_mlp_head(*p).double() - ref).abs().max().item()
    torch.set_float32_matmul_precision("high")
    err_high = (fused_mlp_head(*p).double() - ref).abs().max().item()
    # "high" resolves to TF32, which runs the 3xTF32 kernels for now (ops._RUNS_AS): the same numbers, fp32-level error
    assert ops.resolve_precision(None) == "tf32" and ops.kernel_precision(None) == "tf32x3"
    assert err_high == err_highest and err_highest < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 17, 33, 65])
def test_gpu_config_sweep(M, monkeypatch):
    """Every BLOCK_M and the smallest/largest BLOCK_H, plus forced split-K (fp32; 16-bit shares the tiling)."""
    _check_vs_fp64(M, 768, 16, torch.float32)
    _check_vs_fp64(M, 768, 256, torch.float16)  # BLOCK_H=256: the small path's limit for 16-bit inputs
    monkeypatch.setenv("PTFAST_MLP_HEAD_SPLIT_K", "5")
    _check_vs_fp64(M, 768, 300, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_split_k_bit_identical():
    """The ticket reduction sums partials in a fixed order: identical bits across runs on real hardware."""
    p = [t.cuda().requires_grad_() for t in mlp_head_params(20, 4096, 1024, seed=4)]
    outs = []
    for _ in range(3):
        y = fused_mlp_head(*p)
        y.backward(torch.ones_like(y))
        outs.append([y.detach().clone()] + [t.grad.clone() for t in p])
        for t in p:
            t.grad = None
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_torch_compile_fullgraph():
    p = [t.cuda().requires_grad_() for t in mlp_head_params(20, 1024, 128)]
    f = torch.compile(lambda *a: fused_mlp_head(*a), fullgraph=True)
    y = f(*p)
    y.sum().backward()
    torch.testing.assert_close(y, mlp_head_reference(*p), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.timeout(120)
def test_gpu_one_launch_kernels_with_another_stream_busy():
    """The one-launch kernels wait at grid barriers, so all their programs must be resident: launched cooperatively,
    they start when every program fits. With matmuls filling the GPU from another stream they still finish (a
    deadlock fails through the timeout), and give the right numbers."""
    from ptfast.kernels import mlp_head as k

    assert len(k.forward_plan(20, 1024, 128, dtype=torch.float32, precision="tf32x3")) == 1
    side = torch.cuda.Stream()
    big = torch.randn(4096, 4096, device="cuda")
    with torch.cuda.stream(side):
        for _ in range(20):
            big = torch.tanh(big @ big) * 0.01
    _check_vs_fp64(20, 1024, 128, torch.float32)
    _check_vs_fp64(20, 1024, 128, torch.bfloat16)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M,D,H", [(20, 1024, 128), (20, 4096, 4096)])
def test_gpu_kernels_replay_in_a_cuda_graph(M, D, H):
    """Forward and backward captured in a CUDA graph give eager's bits replay after replay: counters, barrier
    counters and scratch are left as they were found by every launch, and kept alive for the graph."""
    from ptfast.kernels import mlp_head as k

    p = [t.cuda() for t in mlp_head_params(M, D, H, seed=8)]
    x = p[0].clone()
    go = torch.randn(M, D, device="cuda")

    def step():
        out, h1, h2 = k.mlp_head_forward(x, *p[1:], precision="tf32x3")
        grads = k.mlp_head_backward(go, x, p[1], p[3], p[5], h1, h2, precision="tf32x3")
        return (out,) + tuple(grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(M, D, device="cuda", generator=gen))
        go.copy_(torch.randn(M, D, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_compiled_kernels_take_the_direct_c_launch():
    """On the GPU's own Triton, the one-launch kernels go straight to Triton's C launcher after warm-up (the host
    path measured on CPU); a Triton whose launcher does not qualify would silently fall back to ``kernel.run``."""
    import triton

    from ptfast.kernels import mlp_head as k

    p = [t.cuda() for t in mlp_head_params(20, 1024, 128, seed=9)]
    out, h1, h2 = k.mlp_head_forward(*p, precision="tf32x3")
    k.mlp_head_backward(torch.randn_like(out), p[0], p[1], p[3], p[5], h1, h2, precision="tf32x3")
    k.mlp_head_forward(*p, precision="tf32x3")
    torch.cuda.synchronize()
    binaries = [b for run in k._RUNS.values() if run.fused for l in run.launchers for b in l.compiled.values()]
    assert binaries, "no compiled kernel was kept"
    assert all(b.c_launch is not None for b in binaries), f"Triton {triton.__version__}: kernel.run fallback"


def test_precision_reader_is_marked_constant_for_dynamo_without_importing_it():
    """ops/mlp_head.py marks its flag reader the way torch.compiler.assume_constant_result does, by hand, so that
    `import ptfast` does not import torch._dynamo (seconds). If torch changes the decorator, this fails."""
    code = (
        "import sys, ptfast; assert 'torch._dynamo' not in sys.modules, 'import ptfast imported torch._dynamo'; "
        "import torch\n"
        "def f(): return 1\n"
        "marked = torch.compiler.assume_constant_result(f)\n"
        "assert marked is f and f.__dict__ == {'_dynamo_marked_constant': True}, f.__dict__\n"
        "from ptfast.ops import mlp_head\n"
        "assert mlp_head._torch_allows_tf32._dynamo_marked_constant is True"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_tf32_requests_run_the_3xtf32_kernels():
    assert ops.kernel_precision("tf32") == ops.kernel_precision("high") == "tf32x3"
    assert ops.kernel_precision("ieee") == "ieee" and ops.kernel_precision("tf32", torch.bfloat16) == "ieee"
