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


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """``--threads`` sets torch's process-wide thread count: put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--device",
        "--grid",
        "--shapes",
        "--dtype",
        "--repeats",
        "--out",
        "--batch",
        "--modes",
        "ptfast-cached",
        "peft-graph",
    ):
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
    assert "ptfast-cached" in out and "peft-inference" in out
    # 6 table rows; timings: infer and prompt have 4 providers (peft, peft-inference, ptfast, ptfast-cached),
    # train 2 (no no-grad provider) -> 20.
    assert re.search(r"^timed 6 cases \(the table's rows\), 20 timings \(case x provider\), in ", out, re.M), out
    assert re.search(r"^timed .*; 2 rounds each, median per call$", out, re.M), out
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
        assert row.count(" us") + row.count(" ms") == 4, row  # peft, peft-inference, ptfast, ptfast-cached


def test_cuda_without_cuda_fails_clearly(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "ptfast: error:" in err and "CUDA" in err and "--device cpu" in err


def test_cuda_without_cuda_subprocess_no_traceback():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    proc = subprocess.run(
        [sys.executable, "-m", "ptfast", "--device", "cuda"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "CUDA" in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--shapes", "20x1024"],
        ["--dtype", "fp8"],
        ["--modes", "decode"],
        ["--batch", "0"],
        ["--batch", "abc"],
        ["--providers", "nope"],
        ["--repeats", "0"],
        ["--threads", "-1"],
    ],
    ids=["shape", "dtype", "mode", "batch", "batch-text", "provider", "repeats", "threads"],
)
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq-len", "0"], "ptfast: error: --seq-len must be >= 1, got 0"),
        (["--min-round-ms", "-1"], "ptfast: error: --min-round-ms must be > 0, got -1"),
        (["--min-round-ms", "0"], "ptfast: error: --min-round-ms must be > 0, got 0"),
        (["--min-round-ms", "nan"], "ptfast: error: --min-round-ms must be > 0, got nan"),
        (["--time-budget", "0"], "ptfast: error: --time-budget must be > 0, got 0"),
        (["--time-budget", "-5"], "ptfast: error: --time-budget must be > 0, got -5"),
        (["--repeats", "-2"], "ptfast: error: --repeats must be >= 1, got -2"),
    ],
    ids=[
        "seq-len-0",
        "min-round-negative",
        "min-round-0",
        "min-round-nan",
        "budget-0",
        "budget-negative",
        "repeats-negative",
    ],
)
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


@pytest.mark.parametrize("name", ["sub/x", "../up", ".hidden", "", "a b", "x" * 101])
def test_a_name_that_is_not_a_file_name_exits_2_before_timing(name, tmp_path, capsys, nothing_timed):
    line = _usage_error(TINY[2:] + ["--out", str(tmp_path), "--name", name], capsys)
    assert line.startswith(f"ptfast: error: --name {name!r}: use up to 100 letters, digits")
    assert list(tmp_path.iterdir()) == []


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
    assert line.startswith(
        f"ptfast: error: shape 100000x100000x100000 does not fit: train B=8 fp32 needs at least {need:,} bytes"
    )
    assert f"cpu has {available:,} bytes" in line and "use smaller --shapes or --batch" in line


def test_footprint_counts_weights_gradients_and_activations():
    shape = bench.Shape(20, 4096, 4096)
    infer, train = bench.Case("infer", shape, 1), bench.Case("train", shape, 1)
    params = shape.weight_elems + 20 * 4096
    assert bench.footprint_bytes(infer, parity=False) >= 2 * params * 4  # PEFT's encoder and ptfast's copy
    assert bench.footprint_bytes(train, parity=False) >= 2 * bench.footprint_bytes(infer, parity=False)
    assert bench.footprint_bytes(infer) >= 2 * params * 8  # the float64 parity copy and its gradients
    assert bench.footprint_bytes(bench.Case("infer", shape, 1, "bf16"), parity=False) < bench.footprint_bytes(
        infer, parity=False
    )


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
    assert providers == {"peft", "peft-inference", "ptfast", "ptfast-cached"}
    for r in data["results"]:
        assert r["median_s"] > 0 and r["speedup_vs_peft"] > 0 and r["loops"] >= 1
        assert r["speedup_vs_peft_inference"] > 0
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.png"]  # no temporary files left


def test_out_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert (
        main(TINY + ["--modes", "infer", "--batch", "1", "--no-parity", "--out", str(tmp_path), "--name", "nomp"]) == 0
    )
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
    assert main(TINY + ["--modes", "infer", "--no-parity", "--out", str(tmp_path), "--name", "cut"]) == 130
    out = capsys.readouterr()
    assert "ptfast: interrupted: reporting the rows measured so far" in out.err.splitlines()
    assert "Traceback" not in out.err
    data = json.loads((tmp_path / "cut.json").read_text())
    assert {r["batch"] for r in data["results"]} == {1} and "interrupted" in data["skipped"] and data["interrupted"]


def test_git_commit_only_from_ptfast_own_checkout(tmp_path):
    # An installed copy inside some other repository (e.g. a venv in a project folder) must not record its HEAD.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    site = tmp_path / "venv" / "site-packages"
    site.mkdir(parents=True)
    assert bench.git_commit(str(site)) is None
    assert (
        bench.git_commit(str(tmp_path)).split("+")[0]
        == subprocess.run(
            ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    assert bench.git_commit(str(tmp_path.parent)) is None  # not a git work tree at all (tmp is outside the repo)


def test_benchmark_flags_read_through_env_switchboard(monkeypatch):
    from ptfast import _env

    for name in ("GRID", "REPEATS", "COMPILE", "DEVICE", "THREADS", "RESULTS"):
        monkeypatch.delenv(f"PTFAST_BENCH_{name}", raising=False)
    assert (
        _env.bench_grid(),
        _env.bench_repeats(),
        _env.bench_compile(),
        _env.bench_device(),
        _env.bench_threads(),
        _env.bench_results_dir(),
    ) == (None, 7, "auto", "auto", None, None)
    monkeypatch.setenv("PTFAST_BENCH_GRID", "Quick")
    monkeypatch.setenv("PTFAST_BENCH_REPEATS", "3")
    assert (_env.bench_grid(), _env.bench_repeats()) == ("quick", 3)
    monkeypatch.setenv("PTFAST_BENCH_THREADS", "0")
    with pytest.raises(ValueError, match="PTFAST_BENCH_THREADS must be a positive int"):
        _env.bench_threads()
    monkeypatch.setenv("PTFAST_BENCH_COMPILE", "maybe")
    with pytest.raises(ValueError, match="PTFAST_BENCH_COMPILE must be one of auto, on, off"):
        _env.bench_compile()


# ------------------------------------------------------------------------------------------------ Ctrl-C, --out


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("step", ["require_peft", "machine_info", "parity", "run_providers", "format_table"])
def test_ctrl_c_at_any_step_prints_one_line_and_exits_130(step, capsys, monkeypatch):
    monkeypatch.setattr(bench, step, _interrupt)
    code = main(TINY + ["--modes", "infer", "--batch", "1"])
    err = capsys.readouterr().err
    assert code == 130
    interrupted = [line for line in err.splitlines() if "interrupted" in line]
    # During the timing the rows measured so far are reported, and that is said; anywhere else, only that it was.
    assert interrupted == [
        "ptfast: interrupted: reporting the rows measured so far" if step == "run_providers" else "ptfast: interrupted"
    ], err


def _previous_run(out, name):
    (out / f"{name}.json").write_text('{"previous": true}\n')
    (out / f"{name}.png").write_bytes(b"previous png")


@pytest.mark.parametrize("step", ["plot", "write_json"])
def test_ctrl_c_while_writing_out_leaves_the_previous_pair(step, tmp_path, capsys, monkeypatch):
    _previous_run(tmp_path, "run")
    real = getattr(bench, step)

    def write_then_interrupt(*args, **kwargs):  # the new file partly written, then Ctrl-C
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, step, write_then_interrupt)
    assert (
        main(TINY + ["--modes", "infer", "--batch", "1", "--no-parity", "--out", str(tmp_path), "--name", "run"]) == 130
    )
    assert "ptfast: interrupted" in capsys.readouterr().err.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.png"]  # no temporary files left
    assert (tmp_path / "run.json").read_text() == '{"previous": true}\n'
    assert (tmp_path / "run.png").read_bytes() == b"previous png"


def test_ctrl_c_between_the_renames_still_gives_the_new_pair(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import signal

    _previous_run(tmp_path, "run")
    real_replace = os.replace
    renamed = []

    def replace_then_sigint(src, dst):  # a real SIGINT right after the JSON's rename, before the PNG's
        real_replace(src, dst)
        renamed.append(os.path.basename(dst))
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_sigint)
    assert (
        main(TINY + ["--modes", "infer", "--batch", "1", "--no-parity", "--out", str(tmp_path), "--name", "run"]) == 130
    )
    assert renamed == ["run.json", "run.png"]  # the signal waited for the second rename
    assert "previous" not in (tmp_path / "run.json").read_text()
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.png"]
    assert "ptfast: interrupted" in capsys.readouterr().err.splitlines()


def test_out_replaces_json_and_png_together(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _previous_run(tmp_path, "run")
    assert (
        main(TINY + ["--modes", "infer", "--batch", "1", "--no-parity", "--out", str(tmp_path), "--name", "run"]) == 0
    )
    assert "previous" not in (tmp_path / "run.json").read_text()
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_plot_the_previous_png_is_removed(tmp_path, capsys, monkeypatch):
    # A new JSON must not sit beside the previous run's PNG: without matplotlib there is no new one, so no PNG.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _previous_run(tmp_path, "run")
    assert (
        main(TINY + ["--modes", "infer", "--batch", "1", "--no-parity", "--out", str(tmp_path), "--name", "run"]) == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    assert "previous" not in (tmp_path / "run.json").read_text()
    err = capsys.readouterr().err
    assert "pip install 'ptfast[bench]'" in err and f"removed the previous run's {tmp_path / 'run.png'}" in err


@pytest.mark.slow
def test_real_sigint_during_timing_exits_130_with_both_files(tmp_path):
    pytest.importorskip("matplotlib")
    import signal

    # About 4 s per case: the signal lands inside the second case's timing, with the first one's rows measured.
    argv = [
        sys.executable,
        "-m",
        "ptfast",
        "--shapes",
        "4x16x8",
        "--batch",
        "1,2,3",
        "--modes",
        "infer",
        "--repeats",
        "50",
        "--min-round-ms",
        "20",
        "--device",
        "cpu",
        "--no-parity",
        "--out",
        str(tmp_path),
        "--name",
        "sig",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err_lines = []
        for line in proc.stderr:
            err_lines.append(line)
            if line.startswith("[2/"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(err_lines) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "ptfast: interrupted: reporting the rows measured so far" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sig.json", "sig.png"]
    data = json.loads((tmp_path / "sig.json").read_text())
    assert data["interrupted"] is True and {r["batch"] for r in data["results"]} == {1}


def test_real_sigint_before_timing_exits_130_without_traceback():
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "ptfast"] + TINY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        first = proc.stderr.readline()  # printed by main() before torch is imported: the signal comes during that
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first == "ptfast: loading torch\n", first
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if "interrupted" in line] in (
        ["ptfast: interrupted"],
        ["ptfast: interrupted: reporting the rows measured so far"],
    ), err


@pytest.mark.parametrize("target", ["devnull", "file"])
def test_out_that_is_not_a_directory_exits_2(target, tmp_path, capsys, nothing_timed):
    if target == "devnull":
        if not os.path.exists(os.devnull):
            pytest.skip("no /dev/null here")
        out = os.devnull
    else:
        out = str(tmp_path / "results.txt")
        (tmp_path / "results.txt").write_text("keep me")
    assert _usage_error(TINY[2:] + ["--out", out], capsys) == f"ptfast: error: --out {out} is not a directory"
    if target == "file":
        assert (tmp_path / "results.txt").read_text() == "keep me"


def test_import_ptfast_imports_no_torch():
    """`import ptfast` is cheap (its names load on first use), so `python -m ptfast` speaks and answers Ctrl-C
    before the seconds of `import torch`; the names are all there when asked for."""
    code = (
        "import sys, ptfast; assert 'torch' not in sys.modules, 'import ptfast imported torch'; "
        "from ptfast import PromptEncoder, PromptBank, patch; import ptfast.serving; "
        "assert set(ptfast.__all__) <= set(dir(ptfast)); "
        "assert all(getattr(ptfast, n) is not None for n in ptfast.__all__); print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_one_round_and_one_timing_are_singular(capsys):
    assert main(TINY + ["--modes", "train", "--batch", "1", "--repeats", "1", "--no-parity", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split(" | ")[0].endswith(", 1 torch thread)"), out
    assert re.search(
        r"^timed 1 case \(the table's rows\), 2 timings \(case x provider\), in [0-9.]+s; "
        r"1 round each, median per call$",
        out,
        re.M,
    ), out


# ------------------------------------------------------------------------------------------------ progress, load


def test_first_line_comes_before_the_slow_steps_and_every_case_is_shown(capsys, monkeypatch):
    seen = {}
    real_require = bench.require_peft

    def require_peft(import_it=True):
        if import_it:  # the import that takes seconds
            seen["before peft import"] = capsys.readouterr().err
        return real_require(import_it)

    monkeypatch.setattr(bench, "require_peft", require_peft)
    assert main(TINY + ["--modes", "infer,train", "--batch", "1"]) == 0
    assert seen["before peft import"].splitlines() == [  # torch is loaded here already: no "loading torch" line
        "ptfast: a parity check, then 2 cases (6 timings, 2 rounds each) on cpu; progress below"
    ]
    err = capsys.readouterr().err
    # A line per case, however few (the default run has 8), before each is timed.
    assert re.findall(r"^\[(\d)/2 +\d+s\] (\S+):", err, re.M) == [
        ("1", "infer-M4-D16-H8-B1-fp32"),
        ("2", "train-M4-D16-H8-B1-fp32"),
    ], err


def _info_with_load(monkeypatch, load):
    real = bench.machine_info

    def machine_info(device):
        info = real(device)
        info.update(loadavg_1m=load, cpu_count=2, torch_threads=2)
        return info

    monkeypatch.setattr(bench, "machine_info", machine_info)


@pytest.mark.parametrize(
    "load, threads, expect",
    [
        (1.0, None, None),  # half the cores busy: quiet enough
        (1.6, None, "threads"),  # most cores busy, torch's default threads: suggest --threads 1
        (3.5, ["--threads", "1"], "busy"),  # --threads given: only say the timings will be noisy
    ],
)
def test_busy_machine_hint(load, threads, expect, capsys, monkeypatch):
    _info_with_load(monkeypatch, load)
    assert main(TINY + ["--modes", "train", "--batch", "1", "--repeats", "1", "--no-parity"] + (threads or [])) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: this machine is busy")]
    if expect is None:
        assert notes == []
        return
    assert len(notes) == 1 and f"1-minute load average {load:g} on 2 cores" in notes[0]
    assert ("try --threads 1" in notes[0]) == (expect == "threads"), notes


# ------------------------------------------------------------------------------------------------ peft-inference


def test_peft_inference_provider_is_pefts_loaded_adapter_path():
    pytest.importorskip("transformers")
    shape = bench.Shape(4, 16, 8)
    model = bench.tiny_peft_model(shape, "fp32", "cpu")
    for mode in ("infer", "prompt", "model"):
        case = bench.Case(mode, shape, 3, seq_len=5)
        peft_enc = (
            model.prompt_encoder[model.active_adapter] if mode == "model" else bench.encoders(shape, "fp32", "cpu")[0]
        )
        with torch.no_grad():
            table = peft_enc(torch.arange(4).unsqueeze(0))[0]  # what PEFT saves: the MLP's output
        assert "peft-inference" in bench.providers_for(case, "cpu")
        with torch.no_grad():
            got = bench.make_bench(case, "peft-inference", "cpu").fn()
            want = bench.make_bench(case, "peft", "cpu").fn()
        assert got.shape == want.shape == ((3, 4, 16) if mode == "infer" else (3, 9, 16))
        assert torch.equal(got[:, :4], table.expand(3, -1, -1))  # the saved table, bitwise, no MLP run
        torch.testing.assert_close(got, want)  # the same prompts (and embeddings) as the training configuration
    assert "peft-inference" not in bench.providers_for(bench.Case("train", shape, 1), "cpu")
    with pytest.raises(bench.Unavailable, match="no-grad"):
        bench.make_bench(bench.Case("train", shape, 1), "peft-inference", "cpu")


def test_peft_inference_model_row_is_loaded_by_from_pretrained(monkeypatch):
    pytest.importorskip("transformers")
    from peft import PeftModel

    loaded = []
    real = PeftModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loaded.append(real(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(from_pretrained))
    bench.make_bench(bench.Case("model", bench.Shape(4, 16, 8), 2, seq_len=5), "peft-inference", "cpu")
    model = loaded[0]
    assert model.active_peft_config.inference_mode  # from_pretrained's default
    encoder = model.prompt_encoder[model.active_adapter]
    assert not hasattr(encoder, "mlp_head")  # PEFT's get_prompt returns its embedding table


def test_table_compares_cached_with_peft_inference():
    case = bench.Case("infer", bench.Shape(4, 16, 8), 1)
    rows = bench.add_speedups(
        [
            bench.result_row(case, "peft", "cpu", 100e-6),
            bench.result_row(case, "peft-inference", "cpu", 8e-6),
            bench.result_row(case, "ptfast-cached", "cpu", 4e-6),
        ]
    )
    cached = next(r for r in rows if r["provider"] == "ptfast-cached")
    assert cached["speedup_vs_peft"] == pytest.approx(25) and cached["speedup_vs_peft_inference"] == pytest.approx(2)
    table = bench.format_table(rows)
    header, _, row = table.splitlines()[:3]
    assert header.split()[-4:] == ["ptfast-cached", "cached", "vs", "peft-inference"]
    assert row.endswith("4.0 us (25x)                     2.00x"), row
    assert "hold for models in\ntheir training configuration" in table
