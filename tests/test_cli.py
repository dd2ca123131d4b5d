"""Fast tests of ``python -m ptfast`` (ptfast/__main__.py) and the shared ptfast.bench helpers it uses."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ptfast import bench
from ptfast.__main__ import main

TINY = ["--shapes", "4x16x8", "--batch", "1,3", "--repeats", "2", "--min-round-ms", "1", "--device", "cpu"]


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--device", "--grid", "--shapes", "--dtype", "--repeats", "--out", "--batch", "--modes",
                 "ptfast-cached", "peft-graph"):
        assert flag in out


def test_tiny_run_prints_parity_and_table(capsys):
    assert main(TINY + ["--modes", "infer,train,prompt"]) == 0
    out = capsys.readouterr().out
    assert out.count("| torch ") == 1 and "| ptfast " in out  # the machine line, once
    # PeftModel.get_prompt's (1, M) call: ptfast runs PEFT's own F.linear chain on the same rows, bit for bit.
    assert "parity 4x16x8 fp32, (1, 4) arange call: forward 0.0e+00, cached 0.0e+00: bitwise equal" in out
    batch_line = next(line for line in out.splitlines() if line.startswith("parity 4x16x8 fp32, B=2: forward"))
    assert "within fp32 rounding (tolerance" in batch_line  # grads always round differently (B*M vs M rows)
    lines = [line for line in out.splitlines() if line.startswith(("infer", "train", "prompt"))]
    assert len(lines) == 6, out
    assert all("4x16x8" in line for line in lines)
    assert "x)" in out  # speedups
    assert "ptfast-cached" in out
    # 6 table rows; timings: infer and prompt have 3 providers, train 2 (no cached provider) -> 16.
    assert re.search(r"^timed 6 cases \(the table's rows\), 16 timings \(case x provider\), in ", out, re.M), out
    assert "goal" not in out and "target" not in out  # measurements only


def test_parity_bitwise_single_row_call_and_dtype_tolerance_for_batches():
    r = bench.parity(bench.Shape(5, 24, 12), "fp32", "cpu", batch=3)
    assert r["batch"] == 3
    # Exact only where it is the same op on the same shapes: the (1, M) arange call on CPU.
    assert r["single_fwd_max_abs_err"] == 0.0 and r["single_cached_max_abs_err"] == 0.0 and r["single_bitwise"]
    # B > 1: PEFT's head runs on B*M rows, ptfast's on M (a BLAS such as MKL rounds differently, ~3e-8).
    eps = torch.finfo(torch.float32).eps
    assert r["fwd_tol"] == pytest.approx(2 * r["peft_vs_fp64_max_abs_err"] + eps * r["out_max_abs"])
    assert r["grad_tol"] == pytest.approx(2 * r["peft_grad_vs_fp64_max_abs_err"] + eps * r["grad_max_abs"])
    assert 0 < r["fwd_tol"] < 1e-5 and 0 < r["grad_tol"] < 1e-4  # the scale of fp32 rounding, not a loose bound
    assert r["fwd_max_abs_err"] <= r["fwd_tol"] and r["cached_max_abs_err"] <= r["fwd_tol"]
    assert r["grad_max_abs_err"] <= r["grad_tol"]
    assert r["within_tol"] and r["finite"]


def test_model_row_through_peft_model(capsys):
    pytest.importorskip("transformers")
    assert main(TINY + ["--modes", "model", "--batch", "2", "--no-parity"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("model"))
    try:
        import ptfast.integrations.peft  # noqa: F401
    except ImportError:
        assert "skipped" in out
    else:
        assert row.count(" us") + row.count(" ms") == 3, row  # peft, ptfast, ptfast-cached


def test_cuda_without_cuda_fails_clearly(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "ptfast: error:" in err and "CUDA" in err and "--device cpu" in err


def test_cuda_without_cuda_subprocess_no_traceback():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    proc = subprocess.run([sys.executable, "-m", "ptfast", "--device", "cuda"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "CUDA" in proc.stderr


@pytest.mark.parametrize("argv", [["--shapes", "20x1024"], ["--dtype", "fp8"], ["--modes", "decode"],
                                  ["--batch", "0"], ["--batch", "abc"], ["--providers", "nope"], ["--repeats", "0"],
                                  ["--threads", "-1"]],
                         ids=["shape", "dtype", "mode", "batch", "batch-text", "provider", "repeats", "threads"])
def test_bad_arguments_exit_2(argv, capsys):
    assert main(["--device", "cpu"] + argv) == 2
    assert "ptfast: error:" in capsys.readouterr().err


@pytest.fixture
def nothing_timed(monkeypatch):
    """Fail the test if the CLI gets as far as the parity check or the timing."""
    def boom(*args, **kwargs):
        raise AssertionError("timed something before checking its arguments")

    monkeypatch.setattr(bench, "parity", boom)
    monkeypatch.setattr(bench, "run_providers", boom)


def _usage_error(argv, capsys) -> str:
    assert main(["--device", "cpu"] + argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # not even the machine line: checks come first
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptfast: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "ptfast: error: --seq-len must be >= 1, got 0"),
    (["--min-round-ms", "-1"], "ptfast: error: --min-round-ms must be > 0, got -1"),
    (["--min-round-ms", "0"], "ptfast: error: --min-round-ms must be > 0, got 0"),
    (["--min-round-ms", "nan"], "ptfast: error: --min-round-ms must be > 0, got nan"),
    (["--time-budget", "0"], "ptfast: error: --time-budget must be > 0, got 0"),
    (["--time-budget", "-5"], "ptfast: error: --time-budget must be > 0, got -5"),
    (["--repeats", "-2"], "ptfast: error: --repeats must be >= 1, got -2"),
], ids=["seq-len-0", "min-round-negative", "min-round-0", "min-round-nan", "budget-0", "budget-negative",
        "repeats-negative"])
def test_non_positive_counts_and_budgets_exit_2(argv, message, capsys, nothing_timed):
    assert _usage_error(argv, capsys) == message


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_unwritable_out_exits_2_before_timing(where, tmp_path, capsys, nothing_timed):
    if where == "proc":
        if not os.path.isdir("/proc"):
            pytest.skip("no /proc here")
        out = "/proc/nope"
    else:
        (tmp_path / "file").write_text("")
        out = str(tmp_path / "file" / "results")
    line = _usage_error(TINY[2:] + ["--out", out], capsys)
    assert line.startswith(f"ptfast: error: --out {out}: cannot write there (")


def test_writable_out_is_created_up_front(tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "results"
    seen = []
    monkeypatch.setattr(bench, "parity", lambda *a, **k: seen.append(out.is_dir()) or pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception, match="stop here"):
        main(TINY + ["--out", str(out)])
    assert seen == [True] and list(out.iterdir()) == []  # created and checked, the probe file removed


def test_shapes_that_cannot_be_allocated_exit_2(capsys, nothing_timed):
    line = _usage_error(["--shapes", "100000x100000x100000"], capsys)
    need = bench.footprint_bytes(bench.Case("train", bench.Shape(100000, 100000, 100000), 8))
    available, _ = bench.available_memory("cpu")
    assert line.startswith("ptfast: error: shape 100000x100000x100000 does not fit: train B=8 fp32 needs at least "
                           f"{need:,} bytes")
    assert f"cpu has {available:,} bytes" in line and "use smaller --shapes or --batch" in line


def test_footprint_counts_weights_gradients_and_activations():
    shape = bench.Shape(20, 4096, 4096)
    infer, train = bench.Case("infer", shape, 1), bench.Case("train", shape, 1)
    params = shape.weight_elems + 20 * 4096
    assert bench.footprint_bytes(infer, parity=False) >= 2 * params * 4  # PEFT's encoder and ptfast's copy
    assert bench.footprint_bytes(train, parity=False) >= 2 * bench.footprint_bytes(infer, parity=False)
    assert bench.footprint_bytes(infer) >= 2 * params * 8  # the float64 parity copy and its gradients
    assert bench.footprint_bytes(bench.Case("infer", shape, 1, "bf16"), parity=False) < \
        bench.footprint_bytes(infer, parity=False)


def test_without_peft_the_hint_names_the_readme_extras(capsys, monkeypatch, nothing_timed):
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import peft...` raises ImportError
    monkeypatch.setitem(sys.modules, "peft", None)
    line = _usage_error(TINY[2:], capsys)
    assert "peft" in line and line.endswith("pip install 'ptfast[peft,bench]'")


def test_out_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(TINY + ["--modes", "infer", "--out", str(tmp_path), "--name", "tiny"]) == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["machine"]["torch"] == torch.__version__
    assert {"device_name", "triton", "ptfast", "git_commit"} <= set(data["machine"])
    p = data["parity"][0]
    assert p["single_fwd_max_abs_err"] == 0.0 and p["batch"] == 2  # bitwise at (1, M); B=2 within rounding:
    assert p["fwd_max_abs_err"] <= p["fwd_tol"] and p["grad_max_abs_err"] <= p["grad_tol"] and p["within_tol"]
    providers = {r["provider"] for r in data["results"]}
    assert providers == {"peft", "ptfast", "ptfast-cached"}
    for r in data["results"]:
        assert r["median_s"] > 0 and r["speedup_vs_peft"] > 0 and r["loops"] >= 1
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(TINY + ["--modes", "infer", "--batch", "1", "--no-parity", "--out", str(tmp_path),
                        "--name", "nomp"]) == 0
    assert (tmp_path / "nomp.json").exists() and not (tmp_path / "nomp.png").exists()
    assert "pip install 'ptfast[bench]'" in capsys.readouterr().err


def test_grid_and_floor_helpers():
    assert bench.Shape.parse("20x1024x128") == bench.SEED_SHAPE
    quick = bench.grid("quick", "cpu")
    assert {c.shape for c in quick} == {bench.SEED_SHAPE} and {c.batch for c in quick} == {1, 8}
    full_cuda = bench.grid("full", "cuda")
    assert {c.dtype for c in full_cuda} == {"fp32", "bf16"} and len({c.shape for c in full_cuda}) == 4
    case = bench.Case("infer", bench.Shape(20, 4096, 4096), 1)
    nbytes, flops = bench.work(case)
    assert nbytes == 4 * (3 * 4096 * 4096 + 2 * 4096 + 4096 + 2 * 20 * 4096)
    assert flops == 2 * 20 * 3 * 4096 * 4096
    assert bench.floor_s(case) == pytest.approx(nbytes / bench.hbm_bytes_per_s())  # memory bound
    assert "peft-graph" not in bench.providers_for(case, "cpu")
    assert "compile-mat" in bench.providers_for(case, "cuda")


def test_floor_figures_are_h100_sxm_datasheet_unless_overridden(monkeypatch):
    monkeypatch.delenv("PTFAST_HBM_BW", raising=False)
    assert bench.hbm_bytes_per_s() == 3.35e12  # HBM3, H100 SXM datasheet
    case = bench.Case("infer", bench.Shape(20, 4096, 4096), 1)
    monkeypatch.setenv("PTFAST_HBM_BW", "1e12")  # read at call time, through ptfast._env
    assert bench.hbm_bytes_per_s() == 1e12
    assert bench.floor_s(case) == pytest.approx(bench.work(case)[0] / 1e12)
    for bad in ("0", "-3e12", "fast", "nan"):
        monkeypatch.setenv("PTFAST_HBM_BW", bad)
        with pytest.raises(ValueError, match="PTFAST_HBM_BW must be a positive"):
            bench.floor_s(case)


def test_round_target_syncs_once_per_round(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    target = bench.round_target(lambda: calls.append("call"), 3, "cuda")
    for _ in range(6):
        target()
    assert calls == ["call", "call", "call", "sync"] * 2
    assert bench.round_target(len, 3, "cpu") is len  # nothing added on CPU


def test_time_budget_and_interrupt_keep_measured_rows(capsys, monkeypatch, tmp_path):
    assert main(TINY + ["--modes", "infer", "--no-parity", "--time-budget", "1e-9"]) == 0
    out = capsys.readouterr().out
    assert "skipped (--time-budget 1e-09s spent)" in out and "timed 0 cases" in out

    real = bench.run_providers
    calls = []

    def flaky(*args, **kwargs):  # the second case is "interrupted" (gpu_check.sh's timeout sends SIGINT)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_providers", flaky)
    assert main(TINY + ["--modes", "infer", "--no-parity", "--out", str(tmp_path), "--name", "cut"]) == 0
    out = capsys.readouterr()
    assert "interrupted" in out.err
    data = json.loads((tmp_path / "cut.json").read_text())
    assert {r["batch"] for r in data["results"]} == {1} and "interrupted" in data["skipped"]


def test_git_commit_only_from_ptfast_own_checkout(tmp_path):
    # An installed copy inside some other repository (e.g. a venv in a project folder) must not record its HEAD.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    site = tmp_path / "venv" / "site-packages"
    site.mkdir(parents=True)
    assert bench.git_commit(str(site)) is None
    assert bench.git_commit(str(tmp_path)).split("+")[0] == subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert bench.git_commit(str(tmp_path.parent)) is None  # not a git work tree at all (tmp is outside the repo)


def test_benchmark_flags_read_through_env_switchboard(monkeypatch):
    from ptfast import _env

    for name in ("GRID", "REPEATS", "COMPILE", "DEVICE", "THREADS", "RESULTS"):
        monkeypatch.delenv(f"PTFAST_BENCH_{name}", raising=False)
    assert (_env.bench_grid(), _env.bench_repeats(), _env.bench_compile(), _env.bench_device(),
            _env.bench_threads(), _env.bench_results_dir()) == (None, 7, "auto", "auto", None, None)
    monkeypatch.setenv("PTFAST_BENCH_GRID", "Quick")
    monkeypatch.setenv("PTFAST_BENCH_REPEATS", "3")
    assert (_env.bench_grid(), _env.bench_repeats()) == ("quick", 3)
    monkeypatch.setenv("PTFAST_BENCH_THREADS", "0")
    with pytest.raises(ValueError, match="PTFAST_BENCH_THREADS must be a positive int"):
        _env.bench_threads()
    monkeypatch.setenv("PTFAST_BENCH_COMPILE", "maybe")
    with pytest.raises(ValueError, match="PTFAST_BENCH_COMPILE must be one of auto, on, off"):
        _env.bench_compile()
