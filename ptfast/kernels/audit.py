"""Static cost model of the MLP-head kernels on sm_90 (H100 / H200), without a GPU, calibrated against ncu.

    python -m ptfast.kernels.audit [--json OUT] [--cc 90] [--shapes 20x1024x128,...] [--gpu h100|h200]
                                   [--clock base|boost]
    python -m ptfast.kernels.audit --calibrate benchmarks/results/cuda-nvidia-h200-ncu.csv [--json OUT]

What it reads. For every launch the dispatcher plans (``forward_plan`` / ``backward_plan``) at the benchmark shapes,
in fp32 (tf32x3: PyTorch's "highest"; tf32: "high"), bf16 and fp16, it compiles the kernel for
``GPUTarget("cuda", cc, 32)`` (Triton's on-disk cache makes repeats cheap), reads registers / shared memory / local
memory from the cubin, disassembles it with the ``cuobjdump`` shipped in Triton's wheel and counts, per main loop
(a backward branch whose body holds MMA or FFMA instructions), its instructions, MMAs and shared-memory loads, plus
the straight-line instructions outside the loops and the unroll of the split-K reduce loop.

The model, per launch (constants: ``HARDWARE`` per GPU, ``MODEL`` for the calibrated ones):

    time = launch + max(programs, dram, tensor, smem)

* launch: ``MODEL["launch_s"]``, a kernel boundary as ncu's gpu__time_duration sees it (grid launch, CTA dispatch,
  the drain of the last stores).
* programs: the SMs' time, max(the longest program's chain, the chains of all programs / the resident slots), with
  slots = SMs x programs resident per SM (registers, shared memory, warps; at most ceil(programs / SMs)). One
  program's chain:
    - first tile: one DRAM round trip (``dram_latency_s``), nothing to overlap it with;
    - K loop: iterations x max(loop issue, dram_latency / (stages - 1)): the pipeline keeps only stages - 1 tiles in
      flight, and with one program per SM no other program hides the round trips;
    - loop issue: loop instructions x max(``lone_warp_cpi``, w) cycles: a warp alone waits on its own MMA,
      shared-memory and barrier latencies, so it issues once every lone_warp_cpi cycles, and w warps per scheduler
      (4 per SM) share one issue slot per cycle;
    - straight-line code (prologue, epilogue): its instructions x max(1, w) cycles: independent address arithmetic
      issues about once a cycle (a static count: branches not taken count too);
    - split-K ticket (splits > 1): (2 + ceil(splits / unroll)) L2 round trips (``l2_latency_s``): the partials'
      stores must be acknowledged (MEMBAR.GPU) before the ticket atomic, whose answer the program waits for, and the
      last program then rereads the partials ``unroll`` splits at a time (the reduce loop's unroll in the SASS).
* dram: compulsory bytes / (``dram_efficiency`` x HBM bandwidth); operands reread by several programs are L2 hits.
* tensor: executed MACs x 2 (x3 for 3xTF32) / tensor-core peak at the clock (FFMA peak without MMA).
* smem: shared-memory wavefronts per SM / clock (LDS.32 = 1, .64 = 2, .128 = 4, LDSM.x4 = 4; bank conflicts are not
  derived: the ncu step of benchmarks/gpu_check.sh measures them).

A ``Launch`` with ``parts`` is one of two kinds, told apart by its grid:
* side by side (``_bwd_kernel``: the grid is exactly the parts' programs): one launch whose programs are the parts',
  each part's chain from its own main loop in the binary (the loops in code order);
* phases (a persistent grid that runs each part's tiles in turn, a grid barrier between: any other grid): launch +
  the sum of the phases' times + (phases - 1) x ``barrier_s``. Each phase is costed as its part's own launch
  (its kernel compiled with its constants, warps and stages; side-by-side parts again where it has them) without the
  launch term, its tiles spread over the persistent grid's programs, one per SM.

Calibration (``--calibrate CSV``): the CSV is ``ncu --csv`` output of benchmarks/gpu_check.sh (gpu__time_duration
and DRAM bytes per launch). Its launches are matched in order to the per-layer launches of the kernels it names
(``measured_plans``: what the dispatcher ran when it was taken) at ``--shapes``, the precision of each group chosen
by kernel, grid, block and DRAM bytes; each launch is then predicted and the ratio printed, for the model and for the
model without each of its terms. ncu locks the SM clock to base unless told otherwise (``--clock-control base``), so
the calibration predicts at the base clock; the CSV records no clock metric, so that clock is an assumption
(``HARDWARE``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from .. import _env

# Datasheet figures (none measured by us). H200 = the H100 SXM5's GH100 die (132 SMs, 50 MB L2, same clocks) with
# six stacks of HBM3e instead of five of HBM3. The base clock is what ncu locks to by default; 1.59 GHz is the H100
# SXM5's, assumed for the H200 too (the committed CSV records no clock). Tensor and FFMA peaks are quoted at boost
# (dense), and scaled to the clock in use.
HARDWARE = {
    "h100": dict(
        name="H100 SXM5",
        sms=132,
        base_clock_hz=1.59e9,
        boost_clock_hz=1.98e9,
        hbm_bytes_per_s=3.35e12,
        regs_per_sm=65536,
        smem_per_sm=228 * 1024,
        max_warps_per_sm=64,
        tc_flops={"bf16": 989e12, "fp16": 989e12, "tf32": 494e12},
        ffma_flops=67e12,
    ),
    "h200": dict(
        name="H200 SXM",
        sms=132,
        base_clock_hz=1.59e9,
        boost_clock_hz=1.98e9,
        hbm_bytes_per_s=4.8e12,
        regs_per_sm=65536,
        smem_per_sm=228 * 1024,
        max_warps_per_sm=64,
        tc_flops={"bf16": 989e12, "fp16": 989e12, "tf32": 494e12},
        ffma_flops=67e12,
    ),
}
# The model's own constants: the first four fitted (on a coarse grid, worst ratio first) to
# benchmarks/results/cuda-nvidia-h200-ncu.csv (benchmarks/NOTES.md, "Calibrated audit"); barrier_s is assumed
# (nothing measured has a grid barrier); dram_efficiency is the usual streaming fraction of the datasheet
# bandwidth, not fitted.
MODEL = dict(
    launch_s=2.5e-6,  # kernel boundary under ncu
    dram_latency_s=1.0e-6,  # one DRAM round trip, an SM's load to its use (under load; absorbs per-program costs)
    l2_latency_s=0.3e-6,  # one L2 round trip (atomic, .cg load, store acknowledgement)
    lone_warp_cpi=8.0,  # cycles between a lone warp's issues in the MMA main loops
    barrier_s=1.5e-6,  # a grid barrier: the last arrival's atomic, the pollers seeing it, the CTA barriers
    dram_efficiency=0.8,  # achievable fraction of the HBM datasheet bandwidth
)
# The terms the calibration table removes one at a time (model overrides), to show what each contributes.
ABLATIONS = {
    "launch": dict(launch_s=0.0),
    "latency": dict(dram_latency_s=0.0),
    "few-warps": dict(lone_warp_cpi=1.0),
    "split-ticket": dict(l2_latency_s=0.0),
    "base-clock": dict(clock="boost"),
}
HW = HARDWARE["h100"]  # the default target of the audit's tables
SHAPES = ((20, 1024, 128), (20, 4096, 4096), (100, 4096, 1024), (20, 8192, 8192))
# (dtype, kernel precision): what ptfast.ops.mlp_head.resolve_precision picks for fp32 under PyTorch's "highest"
# (tf32x3) and "high" (tf32), and for 16-bit inputs. Kernels never import the op layer, so the names are restated.
CASES = (("fp32", "tf32x3"), ("fp32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee"))
# What a measured launch group can be ("high" runs 3xTF32 too); ties (bf16 / fp16 run identical grids) go to the first.
MATCH_CASES = (("fp32", "tf32x3"), ("bf16", "ieee"), ("fp16", "ieee"))
# Pointer arguments that are not of the tensors' dtype; integer arguments not marked divisible by 16 ("div16").
PTR_TYPES = {"ws_ptr": "fp32", "cnt_ptr": "i32", "bar_ptr": "i32"}
ROW_ARGS = {"M", "N_SPLIT"}


def _torch_dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def kernel_fn(name: str):
    """``"linear._linear_kernel"`` -> the JITFunction in ``ptfast.kernels.linear``."""
    mod, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"ptfast.kernels.{mod}"), attr)


def compile_kernel(
    fn,
    constexprs,
    dtype,
    cc,
    num_warps,
    num_stages,
    *,
    variant="div16",
    ptr_types=None,
    div16_args=None,
    align_ptrs=True,
):
    """``triton.compile`` for ``GPUTarget("cuda", cc, 32)``. Pointers are ``dtype`` unless ``ptr_types`` says
    otherwise, and 16-byte aligned; integers are i32, marked divisible by 16 in the "div16" variant (all but
    ``ROW_ARGS`` and the kernel's ``do_not_specialize`` arguments, or exactly ``div16_args``) as Triton does at
    launch for such values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = fn if hasattr(fn, "params") else getattr(fn, "fn", fn)
    ptr_types = {**PTR_TYPES, **(ptr_types or {})}
    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            consts[p.name] = constexprs[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*" + ptr_types.get(p.name, dtype)
            if align_ptrs:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "i32"
            if div16_args is None:
                wanted = p.name not in ROW_ARGS and not getattr(p, "do_not_specialize", False)
            else:
                wanted = p.name in div16_args
            if variant == "div16" and wanted:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn, signature, consts, attrs)
    except TypeError:  # older triton
        src = ASTSource(fn, signature, consts)
    return triton.compile(
        src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_WAVEFRONTS = {"128": 4, "64": 2}


def _lds_wavefronts(op: str) -> int:
    if op.startswith("LDSM"):
        return 4 if op.endswith(".4") else (2 if op.endswith(".2") else 1)
    return _WAVEFRONTS.get(op.rsplit(".", 1)[-1], 1)


def analyze_sass(text: str) -> dict:
    """Instruction counts of the whole kernel and of its main loop (see the module docstring)."""
    instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _INSTR.finditer(text)]
    loops, forward = [], []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))
            elif t:
                forward.append((addr, int(t.group(1), 16)))

    def counts(lo, hi):
        body = [(op) for a, op, _ in instrs if lo <= a <= hi]
        return dict(
            instrs=len(body),
            mma=sum(op.startswith(("HMMA", "HGMMA")) for op in body),
            hgmma=sum(op.startswith("HGMMA") for op in body),
            ffma=sum(op.startswith("FFMA") for op in body),
            lds=sum(op.startswith("LDS") for op in body),
            lds_wavefronts=sum(_lds_wavefronts(op) for op in body if op.startswith("LDS")),
            ldg=sum(op.startswith(("LDG", "LDGSTS")) for op in body) + sum(op.startswith("UTMALDG") for op in body),
        )

    whole = counts(0, 1 << 62)
    work = [(lo, hi) for lo, hi in sorted(loops) if (lambda c: c["mma"] + c["ffma"])(counts(lo, hi))]
    work_loops = [counts(lo, hi) for lo, hi in work]
    # Two-part kernels (``if pid < n: part 0 else: part 1``): part 1 starts at the target of the branch taken before
    # the first work loop that lands between the two work loops; each part's straight-line instructions are its own.
    part_other = None
    if len(work) == 2:
        cut = [t for a, t in forward if a < work[0][0] and work[0][1] < t <= work[1][0]]
        if cut:
            n0 = counts(0, cut[0] - 1)["instrs"] - work_loops[0]["instrs"]
            part_other = [n0, whole["instrs"] - n0 - work_loops[0]["instrs"] - work_loops[1]["instrs"]]
    best = None
    for lo, hi in loops:
        c = counts(lo, hi)
        key = (c["mma"] + c["ffma"], -c["instrs"])
        if best is None or key > best[0]:
            best = (key, c)
    loop = best[1] if best else dict(whole, instrs=0, mma=0, hgmma=0, ffma=0, lds=0, lds_wavefronts=0, ldg=0)
    ops = [op for _, op, _ in instrs]
    # The split-K reduce loop (no MMA, L2 loads ".STRONG.GPU"): unrolled into one loop that loads `unroll` splits per
    # pass and a remainder loop that loads one; the ratio of their loads is how many splits share a round trip.
    strong = [
        n
        for n in (
            sum(op.startswith("LDG") and ".STRONG.GPU" in op for a, op, _ in instrs if lo <= a <= hi)
            for lo, hi in loops
            if not (lambda c: c["mma"] + c["ffma"])(counts(lo, hi))
        )
        if n
    ]
    return dict(
        total_instrs=whole["instrs"],
        loop=loop,
        work_loops=work_loops,
        part_other=part_other,
        reduce_unroll=max(strong) // min(strong) if strong else 1,
        spill_stores=sum(op.startswith("STL") for op in ops),
        spill_loads=sum(op.startswith("LDL") for op in ops),
    )


def analyze(compiled) -> dict:
    with tempfile.TemporaryDirectory() as td:
        cubin = os.path.join(td, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        text = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    rec = analyze_sass(text)
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", usage)
        rec[key.lower()] = int(m.group(1)) if m else 0
    rec["smem"] = int(compiled.metadata.shared) + rec["shared"]
    return rec


def _job(args):
    name, constexprs, dtype, cc, warps, stages = args
    return analyze(compile_kernel(kernel_fn(name), constexprs, dtype, cc, warps, stages))


# ------------------------------------------------------------------------------------------------ the model
def hardware(gpu: str = "h100", clock: str = "base") -> dict:
    """``HARDWARE[gpu]`` with ``clock_hz`` set to its base (what ncu locks to) or boost clock."""
    if gpu not in HARDWARE:
        raise ValueError(f"audit: unknown gpu {gpu!r}; known: {sorted(HARDWARE)}")
    if clock not in ("base", "boost"):
        raise ValueError(f"audit: clock must be 'base' or 'boost', got {clock!r}")
    return dict(HARDWARE[gpu], gpu=gpu, clock=clock, clock_hz=HARDWARE[gpu][f"{clock}_clock_hz"])


def is_phased(launch) -> bool:
    """Parts that run one after another on a persistent grid (a grid barrier between), rather than side by side:
    side-by-side parts have exactly one program per tile, so their programs add up to the grid."""
    return bool(launch.parts) and sum(p.ctas for p in launch.parts) != launch.ctas


def compile_key(launch, dtype: str, cc: int) -> tuple:
    return (launch.kernel, tuple(sorted(launch.constexprs.items())), dtype, cc, launch.num_warps, launch.num_stages)


def compile_jobs(launch, dtype: str, cc: int) -> dict:
    """{compile_key: _job arguments} of every binary costing ``launch`` needs: its own, and each phase's."""
    jobs = {
        compile_key(launch, dtype, cc): (
            launch.kernel,
            launch.constexprs,
            dtype,
            cc,
            launch.num_warps,
            launch.num_stages,
        )
    }
    if is_phased(launch):
        for part in launch.parts:
            jobs.update(compile_jobs(part, dtype, cc))
    return jobs


def analyze_all(jobs: dict, workers: int) -> dict:
    keys = list(jobs)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as ex:
        return dict(zip(keys, ex.map(_job, [jobs[k] for k in keys])))


def occupancy(a, num_warps, hw) -> int:
    """Programs of this binary one SM holds at once (registers are allocated 8 per thread at a time)."""
    regs = -(-max(a["reg"], 1) // 8) * 8
    return max(
        1,
        min(
            hw["regs_per_sm"] // (regs * 32 * num_warps),
            hw["smem_per_sm"] // (a["smem"] + 1024),
            hw["max_warps_per_sm"] // num_warps,
            32,
        ),
    )


def _splits(launch) -> int:
    """K splits of a ``_linear_kernel`` plan (its grid is (N tiles, M tiles, splits)); 1 for anything else."""
    return launch.grid[2] if launch.kernel.endswith("_linear_kernel") and len(launch.grid) == 3 else 1


def _chains(launch, a, hw, model, w) -> list:
    """(programs, seconds of one program's chain) per part (the launch itself when it has none)."""
    clk = hw["clock_hz"]
    parts = launch.parts or (launch,)
    loops = a["work_loops"] if launch.parts and len(a["work_loops"]) == len(parts) else [a["loop"]] * len(parts)
    if launch.parts and a.get("part_other") and len(a["part_other"]) == len(parts):
        others = a["part_other"]
    else:
        others = [max(a["total_instrs"] - sum(lp["instrs"] for lp in loops), 0)] * len(parts)
    dram, l2 = model["dram_latency_s"], model["l2_latency_s"]
    out = []
    for part, lp, other in zip(parts, loops, others):
        issue_iter = lp["instrs"] * max(model["lone_warp_cpi"], w) / clk
        t = dram + part.iters * max(issue_iter, dram / max(1, launch.num_stages - 1)) + other * max(1.0, w) / clk
        split = _splits(part)
        if split > 1:
            t += (2 + math.ceil(split / max(1, a.get("reduce_unroll", 1)))) * l2
        out.append((part.ctas, t))
    return out


def _terms(launch, a, precision, dtype, hw, model, slots=None) -> dict:
    """The throughput terms of one (unphased) launch, and its occupancy. ``slots``: programs running at once when a
    persistent grid runs the tiles (one per SM); by default SMs x resident programs per SM."""
    sms, clk = hw["sms"], hw["clock_hz"]
    ctas, warps = launch.ctas, launch.num_warps
    occ = occupancy(a, warps, hw)
    resident = 1 if slots else min(occ, math.ceil(ctas / sms))
    slots = slots or sms * resident
    chains = _chains(launch, a, hw, model, resident * warps / 4)
    t_programs = max(max(t for _, t in chains), sum(n * t for n, t in chains) / slots)
    covered = min(1.0, min(ctas, slots) / sms)  # fraction of the SMs (tensor cores) the programs reach
    parts = launch.parts or (launch,)
    loops = a["work_loops"] if launch.parts and len(a["work_loops"]) == len(parts) else [a["loop"]] * len(parts)
    waves = sum(p.ctas * p.iters * lp["lds_wavefronts"] for p, lp in zip(parts, loops)) / min(ctas, sms)
    scale = clk / hw["boost_clock_hz"]
    if a["loop"]["mma"]:
        kind = "tf32" if dtype == "fp32" else dtype
        t_tc = 2 * launch.macs * (3 if precision == "tf32x3" else 1) / (hw["tc_flops"][kind] * scale * covered)
    else:
        t_tc = 2 * launch.macs / (hw["ffma_flops"] * scale * covered)
    return dict(
        programs=t_programs,
        dram=launch.hbm_bytes / (model["dram_efficiency"] * hw["hbm_bytes_per_s"]),
        tensor=t_tc,
        smem=waves * warps / clk,
        occupancy=occ,
    )


def estimate(launch, analyses: dict, precision: str, dtype: str, hw=None, model=None, cc: int = 90) -> dict:
    """Seconds for one launch under the module docstring's model, with its terms. ``analyses`` maps
    ``compile_key`` to ``analyze`` results for every binary ``compile_jobs`` names."""
    hw = hw or hardware()
    model = {**MODEL, **(model or {})}
    a = analyses[compile_key(launch, dtype, cc)]
    if is_phased(launch):
        slots = min(launch.ctas, hw["sms"])
        phases = []
        for part in launch.parts:
            terms = _terms(part, analyses[compile_key(part, dtype, cc)], precision, dtype, hw, model, slots)
            terms.pop("occupancy")
            phases.append(max(terms.values()))
        barriers = (len(phases) - 1) * model["barrier_s"]
        return dict(
            phases=phases,
            barriers=barriers,
            bound="phases",
            occupancy=1,
            total=model["launch_s"] + sum(phases) + barriers,
        )
    terms = _terms(launch, a, precision, dtype, hw, model)
    occ = terms.pop("occupancy")
    bound = max(terms, key=terms.get)
    return dict(terms, bound=bound, occupancy=occ, total=model["launch_s"] + terms[bound])


def forward_floor_s(M, D, H, dtype, hw=None) -> float:
    """The forward's compulsory DRAM bytes (weights, biases, x and out once) at the card's bandwidth."""
    hw = hw or hardware()
    es = 4 if dtype == "fp32" else 2
    return es * (H * D + H + H * H + H + D * H + D + 2 * M * D) / hw["hbm_bytes_per_s"]


# ------------------------------------------------------------------------------------------------ plans
def _compiled_precision(dtype: str, precision: str) -> str:
    from .mlp_head import compiled_precision

    return compiled_precision(_torch_dtype(dtype), precision)


def dispatcher_plans(M, D, H, dtype, precision, sms=132) -> list:
    """[(phase, Launch)]: what ``forward_plan`` / ``backward_plan`` return today."""
    from ptfast.kernels.mlp_head import backward_plan, forward_plan

    td = _torch_dtype(dtype)
    return [("fwd", l) for l in forward_plan(M, D, H, dtype=td, precision=precision, sms=sms)] + [
        ("bwd", l) for l in backward_plan(M, D, H, dtype=td, precision=precision, sms=sms)
    ]


def measured_plans(M, D, H, dtype, precision, sms=132) -> list:
    """[(phase, Launch)]: the per-layer launches the committed ncu CSV measured (forward: ``_linear_kernel`` for
    layer 1, then ``_head23_kernel`` for layers 2+3 when H fits on chip, else two more ``_linear_kernel``; backward:
    one ``_bwd_kernel`` per layer), built from the kernels' own plan functions, whatever the dispatcher runs now."""
    from ptfast.kernels.common import FWD_HIDDEN, FWD_OUT
    from ptfast.kernels.linear import linear_dw_plan, linear_plan
    from ptfast.kernels.mlp_head_small import head23_plan, small_max_h

    td, p = _torch_dtype(dtype), _compiled_precision(dtype, precision)
    fwd = [linear_plan(M, H, D, w_t=False, epilogue=FWD_HIDDEN[1], dtype=td, precision=p, sms=sms)]
    if H <= small_max_h(td, p):
        fwd.append(head23_plan(M, D, H, dtype=td, precision=p))
    else:
        fwd += [
            linear_plan(M, H, H, w_t=False, epilogue=FWD_HIDDEN[1], dtype=td, precision=p, sms=sms),
            linear_plan(M, D, H, w_t=False, epilogue=FWD_OUT[1], dtype=td, precision=p, sms=sms),
        ]
    bwd = [
        linear_dw_plan(M, H, D, mask=True, dtype=td, precision=p, sms=sms),
        linear_dw_plan(M, H, H, mask=True, dtype=td, precision=p, sms=sms),
        linear_dw_plan(M, D, H, mask=False, dtype=td, precision=p, sms=sms),
    ]
    return [("fwd", l) for l in fwd] + [("bwd", l) for l in bwd]


def run(shapes=SHAPES, cases=CASES, cc=90, workers=2, hw=None, planner=dispatcher_plans) -> list:
    hw = hw or hardware()
    rows, jobs = [], {}
    for M, D, H in shapes:
        for dt, prec in cases:
            for phase, launch in planner(M, D, H, dt, prec, sms=hw["sms"]):
                jobs.update(compile_jobs(launch, dt, cc))
                rows.append(
                    dict(shape=(M, D, H), dtype=dt, precision=prec, kernel_precision=prec, phase=phase, launch=launch)
                )
    analyses = analyze_all(jobs, workers)
    for r in rows:
        launch = r.pop("launch")
        a = analyses[compile_key(launch, r["dtype"], cc)]
        r.update(
            kernel=launch.kernel.split(".")[-1],
            grid=list(launch.grid),
            ctas=launch.ctas,
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
            iters=launch.iters,
            phases=len(launch.parts) if is_phased(launch) else 1,
            hbm_bytes=launch.hbm_bytes,
            macs=launch.macs,
            useful_macs=launch.useful_macs,
            real_row_macs=_real_row_macs(launch, r["shape"][0]),
            config={k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK")},
            reg=a["reg"],
            smem=a["smem"],
            spill_stores=a["spill_stores"],
            spill_loads=a["spill_loads"],
            local=a["local"],
            stack=a["stack"],
            loop=a["loop"],
            work_loops=a["work_loops"],
            estimate=estimate(launch, analyses, r["kernel_precision"], r["dtype"], hw, cc=cc),
        )
    return rows


def _real_row_macs(launch, M) -> int:
    """MACs on the M real token rows (padding rows of the last tile excluded); forward launches only."""
    if is_phased(launch):
        return sum(_real_row_macs(p, M) for p in launch.parts)
    if launch.parts or "head23" not in launch.kernel and len(launch.grid) < 3:
        return launch.macs
    grid_m = launch.grid[0 if "head23" in launch.kernel else 1]
    return launch.macs * M // (grid_m * launch.constexprs["BLOCK_M"])


def summarize(rows, hw=None) -> list:
    hw = hw or hardware()
    out = {}
    for r in rows:
        k = (r["shape"], r["dtype"], r["precision"])
        s = out.setdefault(
            k,
            dict(
                shape=r["shape"],
                dtype=r["dtype"],
                precision=r["precision"],
                kernel_precision=r["kernel_precision"],
                fwd_launches=0,
                bwd_launches=0,
                fwd_s=0.0,
                bwd_s=0.0,
                fwd_macs=0,
                fwd_real_row_macs=0,
                useful_macs=0,
            ),
        )
        s[f"{r['phase']}_launches"] += 1
        s[f"{r['phase']}_s"] += r["estimate"]["total"]
        if r["phase"] == "fwd":
            s["fwd_macs"] += r["macs"]
            s["fwd_real_row_macs"] += r["real_row_macs"]
            s["useful_macs"] += r["useful_macs"]
    for s in out.values():
        s["floor_s"] = forward_floor_s(*s["shape"], s["dtype"], hw)
        s["fwd_over_floor"] = s["fwd_s"] / s["floor_s"]
    return list(out.values())


def _bound_text(e) -> str:
    if e["bound"] == "phases":
        return "phases " + " + ".join(f"{t * 1e6:.1f}" for t in e["phases"]) + f" + barriers {e['barriers'] * 1e6:.1f}"
    return f"{e['bound']} (programs {e['programs'] * 1e6:.1f}, dram {e['dram'] * 1e6:.1f})"


def format_tables(rows, summary) -> str:
    lines = [
        "| shape | dtype | prec | phase | kernel | grid | warps/stages | reg | smem KB | spills | loop: MMA / FFMA / "
        "LDS (wavefronts) / instrs | iters | HBM MB | bound (us) | est us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lp, e = r["loop"], r["estimate"]
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['kernel_precision']} | {r['phase']} | "
            f"{r['kernel']} | {'x'.join(map(str, r['grid']))} ({r['ctas']}) | {r['num_warps']}/{r['num_stages']} | "
            f"{r['reg']} | {r['smem'] / 1024:.0f} | {r['spill_stores'] + r['spill_loads']} | "
            f"{lp['mma']} / {lp['ffma']} / "
            f"{lp['lds']} ({lp['lds_wavefronts']}) / {lp['instrs']} | {r['iters']} | {r['hbm_bytes'] / 1e6:.2f} | "
            f"{_bound_text(e)} | {e['total'] * 1e6:.1f} |"
        )
    lines += [
        "",
        "| shape | dtype | precision | launches fwd/bwd | fwd est us | HBM floor us | fwd/floor | "
        "fwd MACs / useful (real rows; with padding) | bwd est us | fwd+bwd est us |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {'x'.join(map(str, s['shape']))} | {s['dtype']} | {s['kernel_precision']} | "
            f"{s['fwd_launches']}/{s['bwd_launches']} | {s['fwd_s'] * 1e6:.1f} | {s['floor_s'] * 1e6:.1f} | "
            f"{s['fwd_over_floor']:.2f}x | {s['fwd_real_row_macs'] / s['useful_macs']:.2f}x; "
            f"{s['fwd_macs'] / s['useful_macs']:.2f}x | {s['bwd_s'] * 1e6:.1f} | "
            f"{(s['fwd_s'] + s['bwd_s']) * 1e6:.1f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ calibration
_TIME_UNITS = {
    "ns": 1e-9,
    "nsecond": 1e-9,
    "us": 1e-6,
    "usecond": 1e-6,
    "ms": 1e-3,
    "msecond": 1e-3,
    "s": 1.0,
    "second": 1.0,
}
_BYTE_UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}
_NCU_COLUMNS = ("ID", "Kernel Name", "Block Size", "Grid Size", "Metric Name", "Metric Unit", "Metric Value")


def _dims(text: str) -> tuple:
    return tuple(int(v) for v in re.findall(r"\d+", text))


def read_ncu_csv(path: str) -> list:
    """Launches of an ``ncu --csv`` metrics file, in order: dict(id, kernel, block, grid, time_s, dram_bytes)
    (``dram_bytes``: read + write, None when not recorded). ncu's own log lines ("==PROF==") are skipped."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    table = list(csv.reader(lines))
    if not table or any(c not in table[0] for c in _NCU_COLUMNS):
        raise ValueError(f"{path}: not an ncu --csv metrics file (needs the columns {', '.join(_NCU_COLUMNS)})")
    col = {name: table[0].index(name) for name in _NCU_COLUMNS}
    launches = {}
    for row in table[1:]:
        lid = row[col["ID"]]
        rec = launches.setdefault(
            lid,
            dict(
                id=int(lid),
                kernel=row[col["Kernel Name"]],
                block=_dims(row[col["Block Size"]]),
                grid=_dims(row[col["Grid Size"]]),
                metrics={},
            ),
        )
        name, unit, value = row[col["Metric Name"]], row[col["Metric Unit"]], row[col["Metric Value"]]
        try:
            number = float(value.replace(",", ""))
        except ValueError:
            raise ValueError(f"{path}: launch {lid}: {name} = {value!r} is not a number") from None
        scale = _TIME_UNITS.get(unit) if name.startswith("gpu__time_duration") else _BYTE_UNITS.get(unit, 1)
        if scale is None:
            raise ValueError(f"{path}: launch {lid}: {name} in unknown time unit {unit!r}")
        rec["metrics"][name] = number * scale
    out = []
    for rec in launches.values():
        m = rec.pop("metrics")
        if "gpu__time_duration.sum" not in m:
            raise ValueError(f"{path}: launch {rec['id']} ({rec['kernel']}) has no gpu__time_duration.sum")
        rw = [m.get("dram__bytes_read.sum"), m.get("dram__bytes_write.sum")]
        rec.update(time_s=m["gpu__time_duration.sum"], dram_bytes=None if None in rw else sum(rw))
        out.append(rec)
    return out


def _matches(measured, launch) -> bool:
    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    return (
        measured["kernel"] == launch.kernel.split(".")[-1]
        and tuple(measured["grid"]) == grid
        and measured["block"][0] == 32 * launch.num_warps
    )


def match_launches(launches, shapes, sms=132, planner=measured_plans, source="ncu CSV") -> list:
    """Pair measured launches, in order, with planned ones. Per shape (in order), each group of launches is the
    forward and backward of one case of ``MATCH_CASES``: the one whose kernels, grids and block sizes match, and
    among those whose planned DRAM bytes are nearest the measured ones. Every launch must be matched."""
    out, i = [], 0
    for M, D, H in shapes:
        while i < len(launches):
            best = None
            for dt, prec in MATCH_CASES:
                seq = planner(M, D, H, dt, prec, sms=sms)
                window = launches[i : i + len(seq)]
                if len(window) < len(seq) or not all(_matches(m, l) for m, (_, l) in zip(window, seq)):
                    continue
                miss = sum(
                    abs(math.log(max(m["dram_bytes"], 1) / max(l.hbm_bytes, 1)))
                    for m, (_, l) in zip(window, seq)
                    if m["dram_bytes"] is not None
                )
                if best is None or miss < best[0] - 1e-9:
                    best = (miss, dt, prec, seq)
            if best is None:
                break
            _, dt, prec, seq = best
            for m, (phase, launch) in zip(launches[i : i + len(seq)], seq):
                out.append(dict(shape=(M, D, H), dtype=dt, precision=prec, phase=phase, launch=launch, measured=m))
            i += len(seq)
    if i < len(launches):
        m = launches[i]
        raise ValueError(
            f"{source}: launch {m['id']} ({m['kernel']}, grid {m['grid']}, block {m['block']}) matches no planned "
            f"per-layer launch at shapes {list(shapes)} in {[c for c in MATCH_CASES]} (after {i} matched launches)"
        )
    return out


def calibrate(csv_path, shapes=SHAPES, gpu="h200", cc=90, workers=2) -> dict:
    """Predicted / measured per launch of the CSV, for the model at the base clock and without each term."""
    hw = hardware(gpu, "base")
    matched = match_launches(read_ncu_csv(csv_path), shapes, hw["sms"], source=csv_path)
    jobs = {}
    for r in matched:
        jobs.update(compile_jobs(r["launch"], r["dtype"], cc))
    analyses = analyze_all(jobs, workers)

    def predict(r, overrides):
        model = {k: v for k, v in overrides.items() if k != "clock"}
        h = hardware(gpu, overrides.get("clock", "base"))
        return estimate(
            r["launch"], analyses, _compiled_precision(r["dtype"], r["precision"]), r["dtype"], h, model, cc
        )

    rows = []
    for r in matched:
        e = predict(r, {})
        launch, m = r["launch"], r["measured"]
        rows.append(
            dict(
                id=m["id"],
                shape=r["shape"],
                dtype=r["dtype"],
                precision=r["precision"],
                phase=r["phase"],
                kernel=launch.kernel.split(".")[-1],
                grid=list(launch.grid),
                measured_s=m["time_s"],
                measured_dram_bytes=m["dram_bytes"],
                planned_hbm_bytes=launch.hbm_bytes,
                predicted_s=e["total"],
                ratio=e["total"] / m["time_s"],
                estimate=e,
            )
        )
    fits = {"model": fit_stats([r["ratio"] for r in rows])}
    for name, overrides in ABLATIONS.items():
        fits[f"without {name}"] = fit_stats([predict(r, overrides)["total"] / r["measured"]["time_s"] for r in matched])
    return dict(csv=csv_path, hw=hw, model=MODEL, rows=rows, fits=fits)


def fit_stats(ratios) -> dict:
    logs = [math.log(q) for q in ratios]
    return dict(
        worst=max(max(ratios), 1 / min(ratios)),
        within_1_5=sum(1 / 1.5 <= q <= 1.5 for q in ratios),
        n=len(ratios),
        rms_log=math.sqrt(sum(v * v for v in logs) / len(logs)),
        mean_log=sum(logs) / len(logs),
    )


def format_calibration(cal) -> str:
    hw = cal["hw"]
    lines = [
        f"# calibration against {cal['csv']}: model {hw['name']}, {hw['sms']} SMs, "
        f"{hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s, {hw['clock_hz'] / 1e9:.2f} GHz ({hw['clock']} clock: ncu's "
        f"default lock); " + ", ".join(f"{k}={v:g}" for k, v in cal["model"].items()),
        "",
        "| # | shape | dtype (kernel precision) | phase | kernel | grid | measured us | predicted us | ratio | bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cal["rows"]:
        lines.append(
            f"| {r['id']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} ({r['precision']}) | {r['phase']} | "
            f"{r['kernel']} | {'x'.join(map(str, r['grid']))} | {r['measured_s'] * 1e6:.1f} | "
            f"{r['predicted_s'] * 1e6:.1f} | {r['ratio']:.2f} | {_bound_text(r['estimate'])} |"
        )
    lines += [
        "",
        "| model | worst ratio (either way) | launches within 1.5x | rms of log ratio | mean log ratio |",
        "|---|---|---|---|---|",
    ]
    for name, f in cal["fits"].items():
        lines.append(
            f"| {name} | {f['worst']:.2f}x | {f['within_1_5']}/{f['n']} | {f['rms_log']:.3f} | {f['mean_log']:+.3f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def _shapes(text):
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes must be MxDxH[,MxDxH...] of positive integers, got {text!r}")
    return shapes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptfast.kernels.audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows and summary (or the calibration) here")
    ap.add_argument("--cc", type=int, default=90)
    ap.add_argument("--shapes", type=_shapes, help="MxDxH,... (default: the benchmark shapes)")
    ap.add_argument("--workers", type=int, default=_env.compile_workers())
    ap.add_argument(
        "--gpu", choices=sorted(HARDWARE), default=None, help="hardware constants (default h100; h200 with --calibrate)"
    )
    ap.add_argument(
        "--clock",
        choices=("base", "boost"),
        default="base",
        help="SM clock of the estimate (default base: what ncu locks to, and what the model is fitted at)",
    )
    ap.add_argument(
        "--per-layer",
        action="store_true",
        help="cost the per-layer launches the ncu CSV measured (measured_plans), not the dispatcher's",
    )
    ap.add_argument("--calibrate", metavar="CSV", help="predict every launch of an ncu --csv file and compare")
    args = ap.parse_args(argv)
    if "triton" in sys.modules and _env.interpreting():  # too late: triton was imported in interpreter mode
        print("audit: run in a process where TRITON_INTERPRET is not set", file=sys.stderr)
        return 3
    _env.stop_interpreting()  # a process that has not imported triton yet compiles for real
    shapes = args.shapes or SHAPES
    if args.calibrate:
        cal = calibrate(args.calibrate, shapes, gpu=args.gpu or "h200", cc=args.cc, workers=args.workers)
        print(format_calibration(cal))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(cal, f, indent=1, default=str)
        return 0
    hw = hardware(args.gpu or "h100", args.clock)
    rows = run(
        shapes, cc=args.cc, workers=args.workers, hw=hw, planner=measured_plans if args.per_layer else dispatcher_plans
    )
    summary = summarize(rows, hw)
    print(
        f"# ptfast kernel audit: sm_{args.cc}, {'per-layer launches' if args.per_layer else 'dispatcher plans'}, "
        f"model {hw['name']}: {hw['sms']} SMs, {hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"{hw['clock_hz'] / 1e9:.2f} GHz ({hw['clock']}); " + ", ".join(f"{k}={v:g}" for k, v in MODEL.items())
    )
    print(format_tables(rows, summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(hw=hw, model=MODEL, rows=rows, summary=summary), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
