"""Static cost model of the MLP-head kernels on sm_90, without a GPU.

    python -m ptfast.kernels.audit [--json OUT] [--cc 90] [--shapes 20x1024x128,...]

For every launch the dispatcher plans (``forward_plan`` / ``backward_plan``) at the benchmark shapes, in fp32
(tf32x3: PyTorch's "highest"; tf32: "high"), bf16 and fp16, it compiles the kernel for ``GPUTarget("cuda", cc, 32)``
(Triton's on-disk cache makes repeats cheap), reads registers / shared memory / local memory from the cubin,
disassembles it with the ``cuobjdump`` shipped in Triton's wheel and counts, in the main loop (the backward
branch whose body holds the most MMA + FFMA instructions), the MMA, FFMA and shared-memory load instructions.

The model (per launch; stated, simple, unverified on a GPU) takes the largest of
  * DRAM:    compulsory bytes / (3.0 TB/s x min(1, programs / SMs)); operands reread by several programs (A, h1,
             w2 in the fused kernel, split-K partials) are counted once: they are L2 hits
  * issue:   programs per SM x (iterations x loop instructions + other instructions) x warps / 4 schedulers / clock
  * shared:  programs per SM x iterations x shared-memory wavefronts per loop (LDS.32 = 1, .64 = 2, .128 = 4,
             LDSM.x4 = 4; bank conflicts are *not* derived: the ncu step of benchmarks/gpu_check.sh measures them)
  * tensor:  executed MACs x 2 (x3 for tf32x3) / (peak x min(1, programs / SMs)), or FFMA peak without MMA
and adds a fixed 2.0 us per launch (GPU-side kernel boundary; the CPU-side Python dispatch is not included).
A sensitivity column ("+lat") also takes a DRAM-latency chain into the max: (iterations / (stages - 1) + 2) round
trips of 0.6 us per wave of resident programs, which dominates the tiny seed-shape launches.
"""

from __future__ import annotations

import argparse
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

HW = dict(name="H100 SXM (model)", sms=132, clock_hz=1.755e9, hbm_bytes_per_s=3.0e12, dram_latency_s=0.6e-6,
          launch_s=2.0e-6, regs_per_sm=65536, smem_per_sm=228 * 1024, max_warps_per_sm=64,
          tc_flops={"bf16": 800e12, "fp16": 800e12, "tf32": 400e12}, ffma_flops=67e12)
SHAPES = ((20, 1024, 128), (20, 4096, 4096), (100, 4096, 1024), (20, 8192, 8192))
# (dtype, kernel precision): what ptfast.ops.mlp_head.resolve_precision picks for fp32 under PyTorch's "highest"
# (tf32x3) and "high" (tf32), and for 16-bit inputs. Kernels never import the op layer, so the names are restated.
CASES = (("fp32", "tf32x3"), ("fp32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee"))
# Pointer arguments that are not of the tensors' dtype; integer arguments not marked divisible by 16 ("div16").
PTR_TYPES = {"ws_ptr": "fp32", "cnt_ptr": "i32"}
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


def compile_kernel(fn, constexprs, dtype, cc, num_warps, num_stages, *, variant="div16", ptr_types=None,
                   div16_args=None, align_ptrs=True):
    """``triton.compile`` for ``GPUTarget("cuda", cc, 32)``. Pointers are ``dtype`` unless ``ptr_types`` says
    otherwise, and 16-byte aligned; integers are i32, marked divisible by 16 in the "div16" variant (all but
    ``ROW_ARGS``, or exactly ``div16_args``) as Triton does at launch for such values."""
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
            wanted = p.name not in ROW_ARGS if div16_args is None else p.name in div16_args
            if variant == "div16" and wanted:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn, signature, consts, attrs)
    except TypeError:  # older triton
        src = ASTSource(fn, signature, consts)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


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
    return dict(total_instrs=whole["instrs"], loop=loop, work_loops=work_loops, part_other=part_other,
                spill_stores=sum(op.startswith("STL") for op in ops), spill_loads=sum(op.startswith("LDL") for op in ops))


def analyze(compiled) -> dict:
    with tempfile.TemporaryDirectory() as td:
        cubin = os.path.join(td, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
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


def estimate(launch, a, precision, dtype, hw=HW) -> dict:
    """Seconds for one launch under the module docstring's model, with each term. A launch with ``parts`` (programs
    of two plans in one grid) runs each part's main loop (the binary's loops with MMA/FFMA, in code order) for that
    part's programs; their issue slots and wavefronts add up over the SMs the grid covers."""
    sms, clk = hw["sms"], hw["clock_hz"]
    ctas, warps = launch.ctas, launch.num_warps
    regs = max(a["reg"], 1)
    occ = max(1, min(hw["regs_per_sm"] // (regs * 32 * warps), hw["smem_per_sm"] // (a["smem"] + 1024),
                     hw["max_warps_per_sm"] // warps, 32))
    used = min(ctas, sms) / sms
    parts = launch.parts or (launch,)
    loops = a["work_loops"] if launch.parts and len(a["work_loops"]) == len(parts) else [a["loop"]] * len(parts)
    other = max(a["total_instrs"] - sum(lp["instrs"] for lp in loops[:len(parts)]), 0)
    others = a.get("part_other") if launch.parts and a.get("part_other") else [other] * len(parts)
    if launch.parts:  # programs spread evenly over the SMs the grid covers
        issue = sum(p.ctas * (p.iters * lp["instrs"] + o) for p, lp, o in zip(parts, loops, others)) / min(ctas, sms)
        waves = sum(p.ctas * p.iters * lp["lds_wavefronts"] for p, lp in zip(parts, loops)) / min(ctas, sms)
    else:
        per_sm = math.ceil(ctas / sms)
        issue = per_sm * (launch.iters * loops[0]["instrs"] + other)
        waves = per_sm * launch.iters * loops[0]["lds_wavefronts"]
    t_issue = issue * warps / 4 / clk
    t_smem = waves * warps / clk
    t_hbm = launch.hbm_bytes / (hw["hbm_bytes_per_s"] * used)
    if a["loop"]["mma"]:
        kind = "tf32" if dtype == "fp32" else dtype
        t_tc = 2 * launch.macs * (3 if precision == "tf32x3" else 1) / (hw["tc_flops"][kind] * used)
    else:
        t_tc = 2 * launch.macs / (hw["ffma_flops"] * used)
    t_lat = sum(  # each part's chain, for the waves its programs take
        (math.ceil(p.iters / max(1, launch.num_stages - 1)) + 2) * hw["dram_latency_s"] * p.ctas / (sms * occ)
        for p in parts) if launch.parts else (math.ceil(launch.iters / max(1, launch.num_stages - 1)) + 2) * hw[
        "dram_latency_s"] * math.ceil(ctas / (sms * occ))
    terms = dict(hbm=t_hbm, issue=t_issue, smem=t_smem, tensor=t_tc)
    bound = max(terms, key=terms.get)
    return dict(terms, latency=t_lat, bound=bound, occupancy=occ, total=hw["launch_s"] + terms[bound],
                total_lat=hw["launch_s"] + max(terms[bound], t_lat))


def floor_s(M, D, H, dtype, hw=HW) -> float:
    es = 4 if dtype == "fp32" else 2
    return es * (H * D + H + H * H + H + D * H + D + 2 * M * D) / hw["hbm_bytes_per_s"]


def run(shapes=SHAPES, cases=CASES, cc=90, workers=2) -> list:
    from ptfast.kernels.mlp_head import backward_plan, forward_plan

    rows, jobs = [], {}
    for M, D, H in shapes:
        for dt, prec in cases:
            p = prec
            for phase, planner in (("fwd", forward_plan), ("bwd", backward_plan)):
                for launch in planner(M, D, H, dtype=_torch_dtype(dt), precision=p):
                    key = (launch.kernel, tuple(sorted(launch.constexprs.items())), dt, cc, launch.num_warps,
                           launch.num_stages)
                    jobs.setdefault(key, (launch.kernel, launch.constexprs, dt, cc, launch.num_warps, launch.num_stages))
                    rows.append(dict(shape=(M, D, H), dtype=dt, precision=prec, kernel_precision=p,
                                     phase=phase, launch=launch, key=key))
    keys = list(jobs)
    with ProcessPoolExecutor(max_workers=workers) as ex:
        results = dict(zip(keys, ex.map(_job, [jobs[k] for k in keys])))
    for r in rows:
        a = results[r["key"]]
        launch = r.pop("launch")
        r.pop("key")
        r.update(kernel=launch.kernel.split(".")[-1], grid=list(launch.grid), ctas=launch.ctas,
                 num_warps=launch.num_warps, num_stages=launch.num_stages, iters=launch.iters,
                 hbm_bytes=launch.hbm_bytes, macs=launch.macs, useful_macs=launch.useful_macs,
                 real_row_macs=_real_row_macs(launch, r["shape"][0]),
                 config={k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK")},
                 reg=a["reg"], smem=a["smem"], spill_stores=a["spill_stores"], spill_loads=a["spill_loads"],
                 local=a["local"], stack=a["stack"], loop=a["loop"], work_loops=a["work_loops"],
                 estimate=estimate(launch, a, r["kernel_precision"], r["dtype"]))
    return rows


def _real_row_macs(launch, M) -> int:
    """MACs on the M real token rows (padding rows of the last tile excluded); forward launches only."""
    if launch.parts or "head23" not in launch.kernel and len(launch.grid) < 3:
        return launch.macs
    grid_m = launch.grid[0 if "head23" in launch.kernel else 1]
    return launch.macs * M // (grid_m * launch.constexprs["BLOCK_M"])


def summarize(rows) -> list:
    out = {}
    for r in rows:
        k = (r["shape"], r["dtype"], r["precision"])
        s = out.setdefault(k, dict(shape=r["shape"], dtype=r["dtype"], precision=r["precision"],
                                   kernel_precision=r["kernel_precision"], fwd_launches=0, bwd_launches=0,
                                   fwd_s=0.0, bwd_s=0.0, fwd_lat_s=0.0, bwd_lat_s=0.0, fwd_macs=0,
                                   fwd_real_row_macs=0, useful_macs=0))
        s[f"{r['phase']}_launches"] += 1
        s[f"{r['phase']}_s"] += r["estimate"]["total"]
        s[f"{r['phase']}_lat_s"] += r["estimate"]["total_lat"]
        if r["phase"] == "fwd":
            s["fwd_macs"] += r["macs"]
            s["fwd_real_row_macs"] += r["real_row_macs"]
            s["useful_macs"] += r["useful_macs"]
    for s in out.values():
        s["floor_s"] = floor_s(*s["shape"], s["dtype"])
        s["fwd_over_floor"] = s["fwd_s"] / s["floor_s"]
    return list(out.values())


def format_tables(rows, summary) -> str:
    lines = ["| shape | dtype | prec | phase | kernel | grid | warps/stages | reg | smem KB | spills | loop: MMA / FFMA / "
             "LDS (wavefronts) / instrs | iters | HBM MB | bound | est us | +lat us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lp, e = r["loop"], r["estimate"]
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['kernel_precision']} | {r['phase']} | "
            f"{r['kernel']} | {'x'.join(map(str, r['grid']))} ({r['ctas']}) | {r['num_warps']}/{r['num_stages']} | "
            f"{r['reg']} | {r['smem'] / 1024:.0f} | {r['spill_stores'] + r['spill_loads']} | {lp['mma']} / {lp['ffma']} / "
            f"{lp['lds']} ({lp['lds_wavefronts']}) / {lp['instrs']} | {r['iters']} | {r['hbm_bytes'] / 1e6:.2f} | "
            f"{e['bound']} | {e['total'] * 1e6:.1f} | {e['total_lat'] * 1e6:.1f} |")
    lines += ["", "| shape | dtype | precision | launches fwd/bwd | fwd est us | HBM floor us | fwd/floor | "
              "fwd MACs / useful (real rows; with padding) | bwd est us | fwd+bwd est us | fwd+bwd +lat us |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {'x'.join(map(str, s['shape']))} | {s['dtype']} | {s['kernel_precision']} | "
            f"{s['fwd_launches']}/{s['bwd_launches']} | {s['fwd_s'] * 1e6:.1f} | {s['floor_s'] * 1e6:.1f} | "
            f"{s['fwd_over_floor']:.2f}x | {s['fwd_real_row_macs'] / s['useful_macs']:.2f}x; "
            f"{s['fwd_macs'] / s['useful_macs']:.2f}x | {s['bwd_s'] * 1e6:.1f} | {(s['fwd_s'] + s['bwd_s']) * 1e6:.1f} | "
            f"{(s['fwd_lat_s'] + s['bwd_lat_s']) * 1e6:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptfast.kernels.audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write rows and summary here")
    ap.add_argument("--cc", type=int, default=90)
    ap.add_argument("--shapes", help="MxDxH,... (default: the benchmark shapes)")
    ap.add_argument("--workers", type=int, default=_env.compile_workers())
    args = ap.parse_args(argv)
    if "triton" in sys.modules and _env.interpreting():  # too late: triton was imported in interpreter mode
        print("audit: run in a process where TRITON_INTERPRET is not set", file=sys.stderr)
        return 3
    _env.stop_interpreting()  # a process that has not imported triton yet compiles for real
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = run(shapes, cc=args.cc, workers=args.workers)
    summary = summarize(rows)
    print(f"# ptfast kernel audit: sm_{args.cc}, model {HW['name']}: {HW['sms']} SMs, "
          f"{HW['hbm_bytes_per_s'] / 1e12:.1f} TB/s, {HW['clock_hz'] / 1e9:.3f} GHz, {HW['launch_s'] * 1e6:.1f} us/launch")
    print(format_tables(rows, summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(hw=HW, rows=rows, summary=summary), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
