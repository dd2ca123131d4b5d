"""Triton-interpreter tests of fused_mlp_head's kernels (forward + all gradients) on CPU tensors.

Only meaningful when triton runs in interpreter mode, i.e. TRITON_INTERPRET=1 was set before triton
was imported. Otherwise every test here skips; ``tests/test_mlp_head.py::test_interpreter_suite``
then re-runs this file in a subprocess with TRITON_INTERPRET=1 and PTFAST_BACKEND=triton, so the
suite is covered whether or not conftest turns the interpreter on for the whole process.
"""

import pytest
import torch

from ptfast.ops import mlp_head as ops  # noqa: E402
from tests.helpers.mlp_head import mlp_head_params  # noqa: E402


def _interpreting() -> bool:
    try:
        from ptfast.kernels import mlp_head as k
    except Exception:
        return False
    return type(k._linear_kernel).__name__ == "InterpretedFunction"


pytestmark = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 set before triton is imported")


@pytest.fixture(autouse=True)
def _triton_backend_nan_poison(monkeypatch):
    """Force the Triton backend and NaN-poison every buffer the launchers allocate."""
    from ptfast.kernels import common

    monkeypatch.setenv("PTFAST_BACKEND", "triton")
    monkeypatch.delenv("PTFAST_MLP_HEAD_PATH", raising=False)
    monkeypatch.delenv("PTFAST_MLP_HEAD_SPLIT_K", raising=False)
    monkeypatch.setattr(
        common, "alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    monkeypatch.setattr(common, "alloc_like", lambda t: torch.full_like(t, float("nan")))
    yield


def _run(params, dtype, fn, grad_out):
    ts = [p.to(dtype).detach().requires_grad_() for p in params]
    y = fn(*ts)
    y.backward(grad_out.to(dtype))
    return [y.detach()] + [t.grad for t in ts]


NAMES = ["out", "dx", "dw1", "db1", "dw2", "db2", "dw3", "db3"]

# bf16 is not here: the interpreter's bf16 tl.dot is wrong in Triton 3.9 (triton-lang/triton#11584); bf16 runs
# on a GPU (test_gpu_shapes) and in the compile sweep.
# (M, D, H, dtype, path, split_k): covers D in {64, 1000}, H in {16, 29, 127, 129}, M in {1, 7, 9, 20, 33},
# both forward paths, fp32 + fp16, forced split-K (forward and backward) and the heuristic default.
CASES = [
    (1, 64, 16, torch.float32, "small", None),
    (7, 64, 127, torch.float32, "small", None),  # odd H at the fp32 (3xTF32) small-path limit
    (9, 64, 29, torch.float32, "small", None),  # BLOCK_H 32 with 3xTF32: the BLOCK_J = 16 tile
    (20, 1000, 16, torch.float32, "small", None),
    (33, 64, 16, torch.float32, "small", None),
    (7, 1000, 129, torch.float16, "small", None),
    (1, 64, 129, torch.float32, "large", None),
    (7, 1000, 16, torch.float32, "large", 3),
    (20, 64, 129, torch.float32, "large", 2),
    (33, 1000, 129, torch.float32, "large", None),
    (20, 1000, 129, torch.float16, "large", None),
    (33, 64, 16, torch.float16, "large", 4),
    (1, 1000, 16, torch.float16, "small", None),
    # M past one row tile (BLOCK_M <= 64): the M grid, the backward's tile decode and the split-K counters per tile
    (70, 64, 16, torch.float32, "large", 2),
    (70, 1000, 129, torch.float16, "large", None),
    (70, 64, 16, torch.float32, "small", None),
    # The one-launch kernels (M <= 32, D and H multiples of 16), run here one launch per phase: the seed shape,
    # two head23 row tiles, H below its tile, forced split-K in the forward's layer 1 and every backward layer
    (20, 1024, 128, torch.float32, "small", None),
    (17, 96, 48, torch.float32, "small", 2),
    (32, 64, 32, torch.float16, "small", 4),
]
FUSED = [(20, 1024, 128), (17, 96, 48), (32, 64, 32), (1, 64, 16), (7, 64, 16)]


def test_one_launch_cases_take_the_fused_kernels():
    """The cases above that should run the one-launch kernels do (and D = 1000 or M = 33 do not)."""
    from ptfast.kernels import mlp_head as k

    for M, D, H in FUSED:
        for plans in (
            k.forward_plan(M, D, H, dtype=torch.float32, precision="ieee"),
            k.backward_plan(M, D, H, dtype=torch.float32, precision="ieee"),
        ):
            assert len(plans) == 1 and plans[0].kernel.startswith("mlp_head_fused."), (M, D, H)
    for M, D, H in ((20, 1000, 16), (33, 64, 16), (20, 1024, 129)):
        assert len(k.forward_plan(M, D, H, dtype=torch.float32, precision="ieee")) > 1, (M, D, H)


@pytest.mark.parametrize("M,D,H", [(20, 1024, 128), (17, 96, 48)])
def test_one_program_runs_every_phase_through_its_barriers(M, D, H, monkeypatch):
    """PHASE 0 (what a GPU runs: every phase in one launch, grid barriers between) with a grid of one program, which
    the interpreter can run: it loops over every tile of every phase, passes its own barriers, and leaves the
    barrier counters at zero. Forward and backward equal the phased launches bitwise, with what only one launch
    does on a GPU: g1 / g2 in per-stream scratch, and a no-grad forward's h1 / h2 there too (NaN-poisoned when
    first allocated, so a read before the kernel's write would show)."""
    from ptfast.kernels import common
    from ptfast.kernels import mlp_head as k
    from ptfast.kernels.launch import Launcher

    monkeypatch.setenv("PTFAST_MLP_HEAD_SPLIT_K", "2")
    params = mlp_head_params(M, D, H, seed=5)
    grad_out = torch.randn(M, D, generator=torch.Generator().manual_seed(2))
    phased = _run(params, torch.float32, ops.fused_mlp_head, grad_out)
    with torch.no_grad():
        phased_no_grad = ops.fused_mlp_head(*params)
    for cls, fn in ((k._ForwardRun, k._fwd_kernel), (k._BackwardRun, k._bwd_kernel3)):
        run = k._run_for(cls, M, D, H, torch.float32, "tf32x3", torch.device("cpu"))
        assert len(run.launchers) > 1  # phased under the interpreter
        first = run.launchers[0]
        one = Launcher(
            fn,
            (1,),
            dict(first.constexprs, PHASE=0),
            num_warps=first.options["num_warps"],
            num_stages=first.options["num_stages"],
        )
        monkeypatch.setattr(run, "launchers", [one])
        monkeypatch.setattr(run, "activations_in_scratch", True)
        monkeypatch.setattr(run, "per_stream", {})
    single = _run(params, torch.float32, ops.fused_mlp_head, grad_out)
    for name, a, b in zip(NAMES, phased, single):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(ops.fused_mlp_head(*params), phased_no_grad)
    assert all(int(buf.abs().sum()) == 0 for buf in [*common._COUNTERS.values(), *common._RETIRED])


@pytest.mark.parametrize("M,D,H,dtype,path,split", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_forward_backward_vs_fp64(M, D, H, dtype, path, split, monkeypatch):
    monkeypatch.setenv("PTFAST_MLP_HEAD_PATH", path)
    if split:
        monkeypatch.setenv("PTFAST_MLP_HEAD_SPLIT_K", str(split))
    params = mlp_head_params(M, D, H, seed=M * 1000 + D + H)
    grad_out = torch.randn(M, D, generator=torch.Generator().manual_seed(7))
    ref = _run(params, torch.float64, ops.mlp_head_reference, grad_out)
    got = _run(params, dtype, ops.fused_mlp_head, grad_out)
    with monkeypatch.context() as m:
        m.setenv("PTFAST_BACKEND", "eager")
        base = _run(params, dtype, ops.mlp_head_reference, grad_out)  # torch, same dtype
    for name, r, a, b in zip(NAMES, ref, got, base):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten NaN-poisoned output?)"
        scale = r.abs().max().item()
        err = (a.double() - r).abs().max().item()
        err_torch = (b.double() - r).abs().max().item()
        if dtype == torch.float32:
            tol = 2 * err_torch + 1e-5 * scale + 1e-6
        else:
            tol = 2 * err_torch + 1e-2 * scale + 1e-3
        assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e} (torch {dtype} err {err_torch:.3e})"


def test_leading_dims_and_noncontiguous(monkeypatch):
    monkeypatch.setenv("PTFAST_MLP_HEAD_PATH", "large")
    D, H = 64, 16
    p = mlp_head_params(6, D, H, seed=3, lead=(2, 3))
    w1 = p[1].t().contiguous().t()  # same values, transposed strides
    x = p[0].transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous leading dims
    assert not x.is_contiguous()
    out = ops.fused_mlp_head(x, w1, *p[2:])
    ref = ops.mlp_head_reference(*[t.double() for t in p])
    assert out.shape == (2, 3, D)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "ieee", None])
def test_precisions_run(path, precision, monkeypatch):
    monkeypatch.setenv("PTFAST_MLP_HEAD_PATH", path)
    p = mlp_head_params(7, 64, 16, seed=11)
    out = ops.fused_mlp_head(*p, precision=precision)
    ref = ops.mlp_head_reference(*[t.double() for t in p])
    # the interpreter computes fp32 dots exactly (tests/test_tf32x3_emulation.py covers the GPU numerics)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_split_k_deterministic_and_counters_reset(monkeypatch):
    """Repeated split-K launches agree bitwise, and every counter is back to 0 after each launch (the next launch
    reuses the buffer). The interpreter runs programs one at a time in a fixed order, so "whichever program arrives
    last" is not exercised here: the GPU test ``test_gpu_split_k_bit_identical`` does that."""
    from ptfast.kernels import common, linear

    monkeypatch.setenv("PTFAST_MLP_HEAD_PATH", "large")
    monkeypatch.setenv("PTFAST_MLP_HEAD_SPLIT_K", "4")
    p = mlp_head_params(20, 1000, 16, seed=5)
    a = _run(p, torch.float32, ops.fused_mlp_head, torch.ones(20, 1000))
    b = _run(p, torch.float32, ops.fused_mlp_head, torch.ones(20, 1000))
    for name, u, v in zip(NAMES, a, b):
        assert torch.equal(u, v), name
    assert all(int(buf.abs().sum()) == 0 for buf in [*common._COUNTERS.values(), *common._RETIRED])
    # A forced 4-way split of one linear against torch's matmul (fp32 rounding apart).
    x, w = p[0], p[1]
    c = linear.linear(x, w, precision="ieee", out_dtype=torch.float32)
    plan = linear.linear_plan(
        20, 16, 1000, w_t=False, epilogue=common.Epilogue(), dtype=torch.float32, precision="ieee"
    )
    assert plan.grid[2] == 4
    assert torch.allclose(c, x @ w.T, rtol=1e-5, atol=1e-5)


def test_relu_backward_mask_matches_threshold_backward_on_nan():
    """threshold_backward(grad, h, 0) zeroes where h <= 0: NaN in the saved activation passes the gradient."""
    from ptfast.kernels import mlp_head as k

    M, D, H = 5, 64, 16
    x, w1, b1, w2, b2, w3, b3 = mlp_head_params(M, D, H, seed=21)
    h1 = torch.relu(x @ w1.T + b1)
    h2 = torch.relu(h1 @ w2.T + b2)
    h1[1, 2] = float("nan")
    h2[0, 3] = float("nan")
    h2[2, :4] = 0.0
    go = torch.randn(M, D, generator=torch.Generator().manual_seed(3))
    dx, dw1, db1, dw2, db2, dw3, db3 = k.mlp_head_backward(go, x, w1, w2, w3, h1, h2, precision="ieee")
    tb = torch.ops.aten.threshold_backward
    g2 = tb(go @ w3, h2, 0)
    g1 = tb(g2 @ w2, h1, 0)
    torch.testing.assert_close(dx, g1 @ w1, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(db2, g2.sum(0), rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(db1, g1.sum(0), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert g1[1, 2] != 0 and g2[0, 3] != 0  # the NaN positions pass the gradient (a "h > 0" mask would zero them)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("path", ["small", "large"])
def test_opcheck(path, monkeypatch):
    monkeypatch.setenv("PTFAST_MLP_HEAD_PATH", path)
    p = mlp_head_params(5, 32, 16, seed=13)
    args = [t.detach().requires_grad_() for t in p] + ["tf32x3"]
    torch.library.opcheck(torch.ops.ptfast.mlp_head_fwd.default, args)
    out, h1, h2 = torch.ops.ptfast.mlp_head_fwd(*[t.detach() for t in p], "tf32x3")
    bargs = [torch.randn(5, 32), p[0], p[1], p[3], p[5], h1, h2, "tf32x3"]
    torch.library.opcheck(torch.ops.ptfast.mlp_head_bwd.default, bargs)


def test_torch_compile_fullgraph_no_graph_break(monkeypatch):
    monkeypatch.setenv("PTFAST_MLP_HEAD_PATH", "small")

    class Head(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.ps = torch.nn.ParameterList([torch.nn.Parameter(t) for t in p[1:]])

        def forward(self, x):
            return ops.fused_mlp_head(x, *self.ps)

    p = mlp_head_params(7, 64, 16, seed=17)
    mod = Head(p)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y = compiled(p[0])
    y.sum().backward()
    ref = ops.mlp_head_reference(*[t.double() for t in p])
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in mod.ps)


@pytest.mark.parametrize("path", ["small", "large"])
def test_nan_propagates_through_relu_like_torch(path, monkeypatch):
    """torch.relu keeps NaN; a plain max (fmax) would turn it into 0 and hide an overflow."""
    monkeypatch.setenv("PTFAST_MLP_HEAD_PATH", path)
    p = mlp_head_params(7, 64, 16, seed=5)
    p[0][2, 3] = float("nan")
    with torch.no_grad():
        got = ops.fused_mlp_head(*p)
        ref = ops.mlp_head_reference(*p)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(ref[2]).all()
    torch.testing.assert_close(got[[0, 1, 3, 4, 5, 6]], ref[[0, 1, 3, 4, 5, 6]], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The prefix-tuning head (Linear-Tanh-Linear): the same GEMM family with a tanh epilogue and its backward
# ------------------------------------------------------------------------------------------------
PREFIX_NAMES = ["out", "dx", "dw1", "db1", "dw2", "db2"]


def _prefix_params(M, D, H, O, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g)
    w1 = torch.randn(H, D, generator=g) / D**0.5 * 2  # pre-activations of order 1: both tanh branches are used
    b1 = torch.randn(H, generator=g) * 0.3
    w2 = torch.randn(O, H, generator=g) / H**0.5
    b2 = torch.randn(O, generator=g) * 0.1
    return [t.to(dtype) for t in (x, w1, b1, w2, b2)]


def _prefix_run(params, dtype, fn, grad_out):
    ts = [p.to(dtype).detach().requires_grad_() for p in params]
    y = fn(*ts)
    y.backward(grad_out.to(dtype))
    return [y.detach()] + [t.grad for t in ts]


@pytest.mark.parametrize(
    "M,D,H,O,dtype,split",
    [
        (20, 64, 48, 200, torch.float32, None),
        (7, 100, 29, 130, torch.float32, 3),  # odd sizes, forced split-K in both layers and both backward launches
        (33, 64, 16, 96, torch.float16, None),  # two row tiles
        (1, 32, 16, 64, torch.float32, None),
    ],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_prefix_head_vs_fp64(M, D, H, O, dtype, split, monkeypatch):
    """Forward and every gradient of fused_prefix_head's Triton path against float64, within 2x PyTorch's own error
    at the dtype (tanh included: the kernel's tanh is a series/exp formula, not libdevice's)."""
    from ptfast.ops import prefix_head as pops

    if split:
        monkeypatch.setenv("PTFAST_MLP_HEAD_SPLIT_K", str(split))
    params = _prefix_params(M, D, H, O, seed=M + D + H + O)
    grad_out = torch.randn(M, O, generator=torch.Generator().manual_seed(3))
    ref = _prefix_run(params, torch.float64, pops.prefix_head_reference, grad_out)
    got = _prefix_run(params, dtype, pops.fused_prefix_head, grad_out)
    with monkeypatch.context() as m:
        m.setenv("PTFAST_BACKEND", "eager")
        base = _prefix_run(params, dtype, pops.fused_prefix_head, grad_out)
    for name, r, a, b in zip(PREFIX_NAMES, ref, got, base):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten NaN-poisoned output?)"
        scale = r.abs().max().item()
        err = (a.double() - r).abs().max().item()
        err_torch = (b.double() - r).abs().max().item()
        tol = 2 * err_torch + (1e-5 if dtype == torch.float32 else 1e-2) * scale + 1e-6
        assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e} (torch {dtype} err {err_torch:.3e})"


def test_prefix_head_tanh_is_accurate_and_keeps_nan():
    """The epilogue's tanh within 2 ulp of float64 over small, medium and saturating arguments (the series below
    1/4, the exp formula above), NaN kept, +-inf to +-1. The arguments come in through the bias of a layer whose
    product is exactly 0 (a zero weight), so inf and NaN reach the epilogue as themselves."""
    from ptfast.kernels import common, linear

    xs = torch.cat(
        [
            torch.linspace(-0.3, 0.3, 61),
            torch.tensor(
                [1e-30, -1e-8, 1e-4, 0.2499, 0.2501, 0.7, -3.0, 20.0, -100.0, float("inf"), -float("inf"), float("nan")]
            ),
        ]
    )
    n, K = xs.numel(), 16
    plan = linear.linear_plan(1, n, K, w_t=False, epilogue=common.FWD_TANH[1], dtype=torch.float32, precision="ieee")
    kps, split = linear.split_args(plan, K)
    out = torch.empty(1, n)
    cnt = common.split_counters(torch.device("cpu"), plan.grid[0] * plan.grid[1])
    linear._linear_kernel[plan.grid](
        torch.randn(1, K),
        torch.zeros(n, K),
        xs,
        out,
        out,
        common.no_workspace(xs.device),
        cnt,
        1,
        n,
        K,
        kps,
        split,
        **plan.constexprs,
        num_warps=plan.num_warps,
    )
    want = torch.tanh(xs.double())
    finite = torch.isfinite(xs)
    ulp = torch.finfo(torch.float32).eps * want[finite].abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((out[0][finite].double() - want[finite]).abs() <= 2 * ulp + 1e-45).all()
    assert torch.isnan(out[0][-1]) and out[0][-3] == 1 and out[0][-2] == -1


@pytest.mark.parametrize("head", ["mlp", "prefix"])
def test_second_derivative_through_the_triton_heads_raises(head):
    """The Triton backward kernels give first derivatives only. A first derivative taken with create_graph=True
    works; differentiating it again raises (``once_differentiable``, which the usual backward, run with grad mode
    off, skips) instead of returning a silently incomplete second derivative."""
    from ptfast.ops import prefix_head as pops

    if head == "mlp":
        ts = [p.detach().requires_grad_() for p in mlp_head_params(5, 32, 16, seed=3)]
        y = ops.fused_mlp_head(*ts)
    else:
        ts = [p.detach().requires_grad_() for p in _prefix_params(5, 32, 16, 48, seed=3)]
        y = pops.fused_prefix_head(*ts)
    (gx,) = torch.autograd.grad(y.square().sum(), ts[0], create_graph=True)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
