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


def test_host_cost_benchmark(tmp_path):
    """python -m ptfast.bench.host_cost: one launch per uncached forward (cooperative), two per train step, no aten
    op that computes in a train step, and the host cost within loose multiples of a cached call."""
    _stub_or_skip()
    out = tmp_path / "host.json"
    r = _run(f"""
        import sys
        from ptfast.bench.host_cost import main
        sys.exit(main(["--rounds", "3", "--calls", "20", "--json", {str(out)!r}]))
    """)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["launches"] == {"uncached forward": 1, "train step": 2}, result["launches"]
    assert result["forward last launch"]["cooperative"] is True
    assert result["forward last launch"]["grid"][0] <= 132
    assert result["train step aten ops"] == {}, result["train step aten ops"]
    ratios = result["ratios"]
    # Goals (benchmarks/NOTES.md): uncached <= 3x, train <= 10x. Here: 4x the goals, for loaded CI machines.
    assert ratios["uncached"] <= 12, ratios
    assert ratios["train"] <= 40, ratios
    # PyTorch's autograd alone (the same step through a Function that launches nothing) is about 9x a cached hit;
    # ptfast's own share of a train step measured 2.3x that floor
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
