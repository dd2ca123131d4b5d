"""The host path of the Triton kernels, over the stand-in CUDA driver (ptfast.bench.stub_driver).

These run in subprocesses without TRITON_INTERPRET (this process has the interpreter on when there is no GPU):
Triton compiles the kernels for sm_90 with the wheel's ptxas and launches them through its real C launcher into a
stub ``cuLaunchKernelEx`` that counts. Nothing is computed, so what is checked is what the host does: how many
launches, which aten ops, that compiled kernels are launched without ``JITFunction.run``, and loose bounds on the
host cost relative to a cached call (the benchmark's goals are tighter; CI machines are busy).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.test_native import MUST_BUILD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # compiles for sm_90 in subprocesses


def _run(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _stub_or_skip():
    pytest.importorskip("triton")
    r = _run(
        "from ptfast.bench import stub_driver; import sys; "
        "sys.exit(0 if stub_driver.available() else print(stub_driver.unavailable_reason()) or 3)"
    )
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("hit_check", ["native", "python"])
def test_host_cost_benchmark(tmp_path, hit_check):
    """python -m ptfast.bench.host_cost: one launch per uncached forward (cooperative), two per train step, no aten
    op that computes in a train step, and the host cost within loose multiples of a cached call and the floors."""
    _stub_or_skip()
    if hit_check == "native" and not MUST_BUILD:
        pytest.skip("no C++ toolchain and not CI")
    out = tmp_path / "host.json"
    r = _run(f"""
        import sys
        from ptfast.bench.host_cost import main
        sys.exit(main(["--rounds", "3", "--calls", "20", "--hit-check", {hit_check!r}, "--json", {str(out)!r}]))
    """)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["launches"] == {"uncached forward": 1, "train step": 2}, result["launches"]
    assert result["forward last launch"]["cooperative"] is True
    assert result["forward last launch"]["grid"][0] <= 132
    assert result["train step aten ops"] == {}, result["train step aten ops"]
    assert result["hit check"] == hit_check
    ratios = result["ratios"]
    # Goals (benchmarks/NOTES.md): uncached <= 3x a cached hit, a cached hit <= 1.5x the floor. Here: 4x and 2x the
    # goals, for loaded CI machines. (The train goal, 10x a cached hit, is below autograd's own cost since the hit
    # got cheaper: it is bounded against that below.)
    assert ratios["uncached"] <= 12, ratios
    if hit_check == "native":
        assert result["times_us"]["cached"] <= 3 * result["times_us"]["floor"], result["times_us"]
    # against PyTorch's autograd alone (the same step through a Function that launches nothing): a load-robust
    # bound on what ptfast adds to a train step (measured values: benchmarks/NOTES.md, "Host cost")
    assert result["times_us"]["train"] <= 5 * result["times_us"]["train floor"], result["times_us"]


def test_compiled_kernels_launch_without_the_jit():
    """After a warm-up, the MLP head's forward and backward, prepend_prompts and the prefix head launch with
    JITFunction.run and Triton's Python launcher wrapper (CudaLauncher.__call__) disabled, straight into the C
    launcher, which receives the tensors' addresses as integers; a view at an unaligned offset, which needs
    another binary, goes back to the JIT (and so raises here)."""
    _stub_or_skip()
    r = _run("""
        import os, torch, triton
        os.environ["PTFAST_BACKEND"] = "triton"
        from ptfast.bench import stub_driver
        from ptfast import PromptEncoder, PromptEncoderConfig, fused_prefix_head, prepend_prompts

        enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=20, token_dim=1024, encoder_hidden_size=128))
        idx = torch.arange(20).unsqueeze(0)
        ids, we = torch.randint(0, 50, (2, 7)), torch.randn(50, 1024)
        tables, aidx = torch.randn(3, 20, 1024), torch.tensor([0, 2])
        prefix = [t.requires_grad_() for t in (torch.randn(20, 256), torch.randn(256, 256), torch.randn(256),
                                               torch.randn(2048, 256), torch.randn(2048))]
        with stub_driver.active() as launches:
            def step():
                for p in enc.parameters():
                    p.grad = None
                enc(idx).backward(torch.randn(1, 20, 1024))
                with torch.no_grad():
                    enc.invalidate_cache()
                    enc(idx)
                prepend_prompts(ids, we, tables, aidx)
                fused_prefix_head(*prefix).backward(torch.randn(20, 2048))
            step()
            def refuse(*args, **kwargs):
                raise AssertionError("JITFunction.run called after warm-up")
            triton.runtime.jit.JITFunction.run = refuse
            from triton.backends.nvidia.driver import CudaLauncher
            CudaLauncher.__call__ = refuse
            before = launches.count
            step()
            # train step 2, cached-miss forward 1, prepend 1, prefix head forward 2 + backward 2
            assert launches.count - before == 8, launches.count - before
            prepend_prompts(ids, we, tables, aidx)
            assert launches.last_first_pointer() == ids.data_ptr(), (launches.last_first_pointer(), ids.data_ptr())
            with torch.no_grad():
                enc.invalidate_cache()
                enc(idx)
            weight = enc.embedding.weight.data_ptr()
            assert launches.last_first_pointer() == weight, (launches.last_first_pointer(), weight)
            # a no-grad forward (one launch) allocates only its output: h1 / h2 stay in per-stream scratch
            from ptfast.kernels import common
            made = []
            for name in ("alloc", "alloc_like"):
                real = getattr(common, name)
                setattr(common, name, lambda *a, real=real: made.append(a) or real(*a))
            with torch.no_grad():
                enc.invalidate_cache()
                enc(idx)
            assert len(made) == 1, made
            unaligned = torch.randn(50 * 1024 + 1)[1:].view(50, 1024)
            try:
                prepend_prompts(ids, unaligned, tables, aidx)
            except AssertionError as e:
                assert "after warm-up" in str(e)
            else:
                raise SystemExit("an unaligned tensor was launched with a binary compiled for aligned ones")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_direct_launch_passes_what_triton_would():
    """The direct launch (``launch._Binary``) hands Triton's C launcher the same call as Triton's own launch path:
    the same grid, stream, function, flags, metadata, annotations and signature, and the same kernel arguments with
    every tensor replaced by its address; for the MLP head's forward and backward and for prepend_prompts. When the
    C launcher refuses the call (a Triton with another argument layout), that binary falls back to ``kernel.run``."""
    _stub_or_skip()
    r = _run("""
        import os, torch
        os.environ["PTFAST_BACKEND"] = "triton"
        from ptfast.bench import stub_driver
        from ptfast.kernels import launch as L
        from ptfast.kernels import mlp_head as k
        from ptfast import prepend_prompts

        x, w1, b1, w2, b2, w3, b3 = (torch.randn(s) for s in ((20, 1024), (128, 1024), (128,), (128, 128), (128,),
                                                              (1024, 128), (1024,)))
        dy = torch.randn(20, 1024)
        ids, we = torch.randint(0, 50, (2, 7)), torch.randn(50, 1024)
        tables, aidx = torch.randn(3, 20, 1024), torch.tensor([0, 2])

        def calls():
            out, h1, h2 = k.mlp_head_forward(x, w1, b1, w2, b2, w3, b3, precision="tf32x3")
            k.mlp_head_backward(dy, x, w1, w2, w3, h1, h2, precision="tf32x3")
            prepend_prompts(ids, we, tables, aidx)

        def as_values(args):
            return [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]

        with stub_driver.active() as launches:
            calls()  # compiles; the per-stream scratch now exists, so the next calls pass the same buffers
            binaries = [b for r in k._RUNS.values() for l in r.launchers for b in l.compiled.values()]
            binaries += [b for l in __import__("ptfast.kernels.prepend", fromlist=["x"])._LAUNCHERS.values()
                         for b in l.compiled.values()]
            assert len(binaries) == 3 and all(b.c_launch is not None for b in binaries), binaries
            seen = {"direct": [], "triton": []}
            for b in binaries:
                real = b.c_launch
                b.c_launch = lambda *a, real=real: seen["direct"].append(a) or real(*a)
                launcher = b.run
                c_fn = launcher.launch
                launcher.launch = lambda *a, c_fn=c_fn: seen["triton"].append(a) or c_fn(*a)
            torch.manual_seed(0)
            calls()
            L._hooks_installed = lambda knobs: True  # every launch through JITFunction.run and kernel.run
            torch.manual_seed(0)
            calls()
            assert len(seen["direct"]) == len(seen["triton"]) == 3, {k: len(v) for k, v in seen.items()}
            for d, t in zip(seen["direct"], seen["triton"]):
                assert d[:8] == t[:8] and d[13:15] == t[13:15], (d[:8], t[:8])
                # outputs are fresh allocations in each call: compare the inputs' addresses and every scalar
                assert len(d[15]) == len(t[15]), (len(d[15]), len(t[15]))
            fwd_d, fwd_t = as_values(seen["direct"][0][15]), as_values(seen["triton"][0][15])
            for i in (0, 1, 2, 3, 4, 5, 6) + tuple(range(10, len(fwd_d))):  # x, weights; buffers, scalars, constexprs
                assert fwd_d[i] == fwd_t[i], (i, fwd_d[i], fwd_t[i])

            # a C launcher that refuses the call: the binary falls back to kernel.run, and launches
            b = binaries[0]
            def refuse(*a):
                raise TypeError("another layout")
            b.c_launch = refuse
            L._hooks_installed = lambda knobs: False
            before = launches.count
            k.mlp_head_forward(x, w1, b1, w2, b2, w3, b3, precision="tf32x3")
            assert launches.count - before == 1 and b.c_launch is None, (launches.count - before, b.c_launch)
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_refresh_launches_the_prepared_kernel():
    """After only values changed (a version bump, an optimizer step), a no-grad forward refreshes the table with the
    launch prepared when it was computed in full: one launch, nothing decided again (``mlp_head_forward``, the JIT
    and Triton's launcher wrapper all refuse here), into a new table, with every other argument what the full
    path passes. A launch hook installed since makes it take the full path instead."""
    _stub_or_skip()
    r = _run("""
        import os, torch, triton
        os.environ["PTFAST_BACKEND"] = "triton"
        from torch.autograd.graph import increment_version
        from ptfast.bench import stub_driver
        from ptfast.kernels import launch as L
        from ptfast.kernels import mlp_head as k
        from ptfast import PromptEncoder, PromptEncoderConfig

        enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=20, token_dim=1024, encoder_hidden_size=128))
        idx = torch.arange(20).unsqueeze(0)
        with stub_driver.active() as launches, torch.no_grad():
            enc(idx)  # compiles
            (binary,) = [b for r in k._RUNS.values() for l in r.launchers for b in l.compiled.values()]
            seen = []
            real = binary.c_launch
            binary.c_launch = lambda *a: seen.append(list(a[15])) or real(*a)

            def refuse(*args, **kwargs):
                raise AssertionError("the full path was taken")
            full_forward, jit_run = k.mlp_head_forward, triton.runtime.jit.JITFunction.run
            k.mlp_head_forward = triton.runtime.jit.JITFunction.run = refuse
            from triton.backends.nvidia.driver import CudaLauncher
            wrapper, CudaLauncher.__call__ = CudaLauncher.__call__, refuse

            before = launches.count
            increment_version(enc.embedding.weight)
            refreshed = enc(idx)  # prepares the launch, and makes it
            assert isinstance(enc._cache.entry.refresh.bound, k._BoundForward), enc._cache.entry.refresh.bound
            with torch.enable_grad():
                torch.optim.SGD(enc.parameters(), lr=0.1).step()  # no grads: only the step counter moves
            again = enc(idx)
            assert launches.count - before == 2, launches.count - before
            assert seen[0][7] == refreshed.data_ptr() and seen[1][7] == again.data_ptr(), (seen, refreshed.data_ptr())
            assert refreshed.data_ptr() != again.data_ptr()  # a new table each time: results may still hold the old

            k.mlp_head_forward = full_forward
            enc.invalidate_cache()
            full = enc(idx)
            assert seen[2][7] == full.data_ptr()
            assert seen[2][:7] == seen[0][:7] and seen[2][8:] == seen[0][8:], (seen[0], seen[2])

            calls = []
            k.mlp_head_forward = lambda *a, **kw: calls.append(1) or full_forward(*a, **kw)
            triton.runtime.jit.JITFunction.run, CudaLauncher.__call__ = jit_run, wrapper
            L._hooks_installed = lambda knobs: True  # a profiler's launch hook: every launch through the JIT
            increment_version(enc.embedding.weight)
            enc(idx)
            assert calls == [1] and launches.count - before == 4, (calls, launches.count - before)
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_train_step_launches_the_prepared_kernels():
    """From the third train step on, the forward and the backward are the launches prepared at earlier steps: two
    launches, nothing decided again (``mlp_head_forward``, ``mlp_head_backward``, the JIT and Triton's launcher
    wrapper all refuse here), into new outputs and gradients, with every other argument what the full path passes.
    A launch hook installed since makes the step take the full path."""
    _stub_or_skip()
    r = _run("""
        import os, torch, triton
        os.environ["PTFAST_BACKEND"] = "triton"
        from triton.backends.nvidia.driver import CudaLauncher
        from ptfast.bench import stub_driver
        from ptfast.kernels import launch as L
        from ptfast.kernels import mlp_head as k
        from ptfast import PromptEncoder, PromptEncoderConfig

        enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=20, token_dim=1024, encoder_hidden_size=128))
        idx = torch.arange(20).unsqueeze(0)
        grad = torch.randn(1, 20, 1024)
        params = list(enc.parameters())  # embedding, then w1, b1, w2, b2, w3, b3: the kernel's gradient order

        def train_step():
            for p in params:
                p.grad = None  # so the gradients the backward allocates become .grad themselves
            out = enc(idx)
            out.backward(grad)
            return out

        with stub_driver.active() as launches:
            train_step()
            train_step()  # compiled by the first step; this one prepares the launches
            binaries = [b for r in k._RUNS.values() for l in r.launchers for b in l.compiled.values()]
            assert len(binaries) == 2, binaries
            seen = []
            for b in binaries:
                real = b.c_launch
                b.c_launch = lambda *a, real=real: seen.append(list(a[15])) or real(*a)

            def refuse(*args, **kwargs):
                raise AssertionError("the full path was taken")
            full = (k.mlp_head_forward, k.mlp_head_backward, triton.runtime.jit.JITFunction.run, CudaLauncher.__call__)
            k.mlp_head_forward = k.mlp_head_backward = refuse
            triton.runtime.jit.JITFunction.run = CudaLauncher.__call__ = refuse
            before = launches.count
            out = train_step()
            assert launches.count - before == 2, launches.count - before
            fwd, bwd = seen
            assert fwd[7] == out.data_ptr(), (fwd[7], out.data_ptr())
            assert bwd[0] == grad.data_ptr()  # the [None] view's gradient: the caller's memory
            assert bwd[9:16] == [p.grad.data_ptr() for p in params], (bwd[9:16], [p.grad.data_ptr() for p in params])
            assert fwd[8:10] == bwd[5:7]  # h1, h2: saved by this forward for this backward

            k.mlp_head_forward, k.mlp_head_backward, triton.runtime.jit.JITFunction.run, CudaLauncher.__call__ = full
            enc.invalidate_cache()  # the next step records the tree again, and its first call is the full path
            train_step()
            fwd_full, bwd_full = seen[2:]
            assert fwd_full[:7] == fwd[:7] and fwd_full[10:] == fwd[10:], (fwd, fwd_full)
            assert bwd_full[1:5] == bwd[1:5] and bwd_full[7:9] == bwd[7:9] and bwd_full[16:] == bwd[16:]

            calls = []
            k.mlp_head_forward = lambda *a, **kw: calls.append("fwd") or full[0](*a, **kw)
            k.mlp_head_backward = lambda *a, **kw: calls.append("bwd") or full[1](*a, **kw)
            train_step()
            train_step()  # prepared again
            unaligned = torch.randn(20 * 1024 + 1)[1:].view(1, 20, 1024)  # 4 bytes past a 16-byte boundary
            for p in params:
                p.grad = None
            enc(idx).backward(unaligned)
            assert calls == ["bwd"], calls  # the prepared backward refuses it: its binary assumes aligned pointers
            L._hooks_installed = lambda knobs: True  # a profiler's launch hook: every launch through the JIT
            del calls[:]
            train_step()
            assert calls == ["fwd", "bwd"], calls
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
