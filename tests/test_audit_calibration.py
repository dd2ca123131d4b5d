"""The kernel audit's cost model against the one GPU measurement committed (benchmarks/results/
cuda-nvidia-h200-ncu.csv), the costing of phased launches, the CSV reader and matcher, and the issue's goals.

The calibration and goal tests compile kernels for sm_90 in a subprocess (no GPU: Triton's ptxas and cuobjdump),
in a process where TRITON_INTERPRET is not set; ~15 s with Triton's cache warm, ~1 min cold on 2 cores."""

import json
import os
import subprocess
import sys

import pytest

from ptfast.kernels import audit
from ptfast.kernels.common import Launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV = os.path.join(ROOT, "benchmarks", "results", "cuda-nvidia-h200-ncu.csv")
SEED = (20, 1024, 128)


def _audit(tmp_path, *args):
    pytest.importorskip("triton")
    out = tmp_path / "audit.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run(
        [sys.executable, "-m", "ptfast.kernels.audit", *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode == 3:
        pytest.skip(r.stderr[-500:])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text()), r.stdout


@pytest.mark.slow
def test_calibration_every_launch_within_1_5x(tmp_path):
    cal, table = _audit(tmp_path, "--calibrate", CSV)
    measured = audit.read_ncu_csv(CSV)
    assert [r["id"] for r in cal["rows"]] == [m["id"] for m in measured]  # every launch matched, in order
    bad = [r for r in cal["rows"] if not 1 / 1.5 <= r["ratio"] <= 1.5]
    assert not bad, table
    fits = cal["fits"]
    # every term earns its place: removing any one (the others unchanged) fits worse
    for name in audit.ABLATIONS:
        assert fits[f"without {name}"]["worst"] > fits["model"]["worst"], (name, fits)


@pytest.mark.xfail(
    strict=True,
    reason="the issue's goals are not met: the calibrated model puts the seed forward "
    "at ~23-24 us (fp32) and forward+backward at ~46-49 us on an H100; a kernel "
    "that meets them turns this into a failure: drop the mark then",
)
@pytest.mark.slow
def test_issue_goals_seed_shape_on_h100(tmp_path):
    """Seed shape, what the dispatcher runs: forward <= 8 us of GPU time, forward + backward <= 20 us (fp32 3xTF32
    and bf16), under the calibrated model at an H100's base clock."""
    data, _ = _audit(tmp_path, "--shapes", "x".join(map(str, SEED)), "--gpu", "h100")
    summary = {(tuple(s["shape"]), s["dtype"], s["precision"]): s for s in data["summary"]}
    for case in (("fp32", "tf32x3"), ("bf16", "ieee")):
        s = summary[(SEED,) + case]
        assert s["fwd_s"] <= 8e-6 and s["fwd_s"] + s["bwd_s"] <= 20e-6, s


# ------------------------------------------------------------------------------------------------ no compiles
def _analysis(reg=64, loop_instrs=100, other=400, mma=4, work_loops=None, part_other=None, unroll=1):
    loop = dict(instrs=loop_instrs, mma=mma, hgmma=mma, ffma=0, lds=4, lds_wavefronts=4, ldg=2)
    return dict(
        reg=reg,
        smem=32 * 1024,
        total_instrs=loop_instrs * len(work_loops or [1]) + other,
        loop=loop,
        work_loops=work_loops or [loop],
        part_other=part_other,
        reduce_unroll=unroll,
        spill_stores=0,
        spill_loads=0,
        local=0,
        stack=0,
        shared=0,
    )


def _launch(kernel, grid, iters, parts=(), warps=4, stages=3, tag=0):
    return Launch(kernel, grid, dict(TAG=tag), warps, stages, 1 << 20, 1 << 20, 1 << 20, iters, tuple(parts))


def _phased_case():
    gemm = _launch("linear._linear_kernel", (2, 1, 8), 4, tag=1)
    head = _launch("mlp_head_small._head23_kernel", (1, 8), 4, warps=8, stages=2, tag=2)
    fused = _launch("mlp_head_fused._fwd_kernel", (16,), 8, parts=(gemm, head), warps=8, tag=3)
    analyses = {audit.compile_key(l, "bf16", 90): _analysis() for l in (gemm, head, fused)}
    return gemm, head, fused, analyses


def test_phased_launch_is_the_sum_of_its_phases_plus_barriers():
    gemm, head, fused, analyses = _phased_case()
    assert audit.is_phased(fused)
    e = audit.estimate(fused, analyses, "ieee", "bf16", audit.hardware("h100"))
    assert e["bound"] == "phases" and len(e["phases"]) == 2
    assert e["total"] == pytest.approx(audit.MODEL["launch_s"] + sum(e["phases"]) + audit.MODEL["barrier_s"])
    slower = audit.estimate(fused, analyses, "ieee", "bf16", audit.hardware("h100"), dict(barrier_s=3e-6))
    assert slower["total"] - e["total"] == pytest.approx(3e-6 - audit.MODEL["barrier_s"])
    # a phase costs at least what its kernel does launched alone, minus the launch: nothing overlaps phases
    for part, phase_s in zip((gemm, head), e["phases"]):
        alone = audit.estimate(part, analyses, "ieee", "bf16", audit.hardware("h100"))
        assert phase_s >= alone["total"] - audit.MODEL["launch_s"] - 1e-12
    # every binary the phases need is named for compiling
    assert set(audit.compile_jobs(fused, "bf16", 90)) == set(analyses)


def test_side_by_side_parts_are_one_phase():
    """``_bwd_kernel``: the grid is exactly the parts' programs; the chain of the longest part sets the time."""
    lin = _launch("linear._linear_kernel", (2, 1, 4), 2, tag=1)
    dw = _launch("linear._dw_tile", (4, 2), 1, tag=2)
    both = _launch("linear._bwd_kernel", (lin.ctas + dw.ctas,), 2, parts=(lin, dw), tag=3)
    assert not audit.is_phased(both)
    loops = [dict(instrs=n, mma=4, hgmma=4, ffma=0, lds=4, lds_wavefronts=4, ldg=2) for n in (300, 100)]
    analyses = {audit.compile_key(both, "bf16", 90): _analysis(work_loops=loops, part_other=[500, 200], unroll=4)}
    e = audit.estimate(both, analyses, "ieee", "bf16", audit.hardware("h100"))
    assert e["bound"] == "programs" and e["total"] > audit.MODEL["launch_s"]
    # the split-K ticket: (2 + ceil(4 splits / unroll 4)) L2 round trips on the GEMM part's chain
    no_ticket = audit.estimate(both, analyses, "ieee", "bf16", audit.hardware("h100"), dict(l2_latency_s=0.0))
    assert e["total"] - no_ticket["total"] == pytest.approx(3 * audit.MODEL["l2_latency_s"])


def test_base_clock_is_slower_than_boost_and_h200_only_changes_bandwidth():
    _, _, fused, analyses = _phased_case()
    base = audit.estimate(fused, analyses, "ieee", "bf16", audit.hardware("h100", "base"))
    boost = audit.estimate(fused, analyses, "ieee", "bf16", audit.hardware("h100", "boost"))
    assert base["total"] > boost["total"]
    h100, h200 = audit.hardware("h100"), audit.hardware("h200")
    assert {k for k in h100 if h100[k] != h200[k]} == {"name", "gpu", "hbm_bytes_per_s"}
    with pytest.raises(ValueError, match="unknown gpu"):
        audit.hardware("a100")


def _csv(tmp_path, rows, unit="ns"):
    header = '"ID","Kernel Name","Block Size","Grid Size","Metric Name","Metric Unit","Metric Value"'
    lines = ["==PROF== Connected to process 1", header]
    for lid, kernel, block, grid, t in rows:
        lines.append(f'"{lid}","{kernel}","{block}","{grid}","gpu__time_duration.sum","{unit}","{t}"')
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_ncu_csv_units_and_errors(tmp_path):
    got = audit.read_ncu_csv(_csv(tmp_path, [(0, "_linear_kernel", "(128, 1, 1)", "(2, 1, 8)", "7.42")], "usecond"))
    assert got == [
        dict(
            id=0,
            kernel="_linear_kernel",
            block=(128, 1, 1),
            grid=(2, 1, 8),
            time_s=pytest.approx(7.42e-6),
            dram_bytes=None,
        )
    ]
    with pytest.raises(ValueError, match="unknown time unit"):
        audit.read_ncu_csv(_csv(tmp_path, [(0, "_linear_kernel", "(128, 1, 1)", "(2, 1, 8)", "7")], "fortnight"))
    bad = tmp_path / "bad.csv"
    bad.write_text('"a","b"\n"1","2"\n')
    with pytest.raises(ValueError, match="not an ncu --csv metrics file"):
        audit.read_ncu_csv(str(bad))


def test_match_names_the_first_launch_no_plan_explains(tmp_path):
    plans = audit.measured_plans(*SEED, "bf16", "ieee")
    rows = [
        (
            i,
            l.kernel.split(".")[-1],
            f"({32 * l.num_warps}, 1, 1)",
            str(tuple(l.grid) + (1,) * (3 - len(l.grid))),
            "5,000",
        )
        for i, (_, l) in enumerate(plans)
    ]
    matched = audit.match_launches(audit.read_ncu_csv(_csv(tmp_path, rows)), [SEED])
    assert [(r["dtype"], r["phase"]) for r in matched] == [("bf16", p) for p, _ in plans]
    rows.append((len(rows), "_linear_kernel", "(128, 1, 1)", "(3, 1, 5)", "5,000"))  # a grid no plan has
    with pytest.raises(ValueError, match=rf"launch {len(rows) - 1} \(_linear_kernel, grid \(3, 1, 5\)"):
        audit.match_launches(audit.read_ncu_csv(_csv(tmp_path, rows)), [SEED])
