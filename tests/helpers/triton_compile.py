"""Compile every selectable fused_mlp_head kernel/config for real GPU targets, without a GPU.

Run as a script (``python -m tests.helpers.triton_compile [--json OUT]``) in a process where
TRITON_INTERPRET is NOT set (an InterpretedFunction cannot be compiled). For each kernel x config x
dtype x target it calls ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, then
reads the cubin's resource usage with the ``cuobjdump`` shipped in Triton's wheel and the spill
counts from ``ptxas -v`` on the generated PTX. Prints one JSON record per compile.

Exit codes: 0 ok, 3 API unavailable (the test skips), anything else = failure.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Integer-argument specialization variants compiled per job. At launch Triton marks an int argument
# divisible by 16 with tt.divisibility=16 and compiles a different binary, so we check both extremes:
#   "i32":   no integer argument specialized (odd feature dims, e.g. D=1000, H=129)
#   "div16": every integer argument except the row counts (ROW_ARGS) marked divisible by 16 (the
#            common case: D/H/N/K = 768, 1024, ... with an arbitrary token count M such as 20).
ROW_ARGS = {"M"}
# PTFAST_COMPILE_VARIANTS=i32 (or div16) restricts the run to one variant (debugging).
VARIANTS = tuple(v for v in os.environ.get("PTFAST_COMPILE_VARIANTS", "i32,div16").split(",") if v)

# Max dynamic+static shared memory per block (bytes): sm_80 163 KB (A100 opt-in), sm_90 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _jobs():
    import torch

    from ptfast.kernels import mlp_head as k

    TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    jobs = []
    for cc in (90, 80):
        for dt in DTYPES:
            precs = ("ieee", "tf32") if dt == "fp32" else ("ieee",)
            for prec in precs:
                for bh in k.SMALL_BLOCK_H_CHOICES:
                    cfg = k.small_fwd_config(bh, TORCH_DTYPES[dt], prec)
                    assert cfg["BLOCK_H"] == bh
                    jobs.append(("_fused_small_fwd_kernel", cc, dt, prec, cfg))
                tdt = TORCH_DTYPES[dt]
                for m in (16, 32, 64):
                    cfg = k.ws_config(m, tdt, prec)
                    for w_t, has_bias, relu, has_ref, split in k.WS_EPILOGUES:
                        c = dict(cfg, W_T=w_t, HAS_BIAS=has_bias, RELU=relu, HAS_REF=has_ref, SPLIT=split)
                        jobs.append(("_ws_linear_kernel", cc, dt, prec, c))
                jobs.append(("_dw_kernel", cc, dt, prec, k.dw_config(tdt, prec)))
            for has_bias, relu, has_ref in k.EPI_VARIANTS:
                c = dict(k.epilogue_config(), HAS_BIAS=has_bias, RELU=relu, HAS_REF=has_ref)
                jobs.append(("_splitk_epilogue_kernel", cc, dt, None, c))
    return [j + (v,) for j in jobs for v in VARIANTS]


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ptfast.kernels import mlp_head as k

    name, cc, dt, prec, cfg, variant = job
    fn = getattr(k, name)
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps")
    num_stages = cfg.pop("num_stages")
    if prec is not None:
        cfg["PRECISION"] = prec
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = cfg[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*fp32" if p.name == "ws_ptr" else "*" + DTYPES[dt]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "i32"
            if variant == "div16" and p.name not in ROW_ARGS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.time()
    try:
        src = ASTSource(fn, signature, constexprs, attrs)
    except TypeError:
        src = ASTSource(fn, signature, constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    secs = time.time() - t0
    rec = dict(kernel=name, cc=cc, dtype=dt, precision=prec, variant=variant,
               div16_args=sorted(fn.params[i[0]].name for i in attrs if not fn.params[i[0]].name.endswith("_ptr")),
               num_warps=num_warps, num_stages=num_stages,
               config={kk: v for kk, v in cfg.items() if kk != "PRECISION"}, compile_s=round(secs, 2),
               dyn_shared=int(compiled.metadata.shared))
    with tempfile.TemporaryDirectory() as td:
        cubin = os.path.join(td, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        for key in ("REG", "STACK", "SHARED", "LOCAL"):
            m = re.search(rf"\b{key}:(\d+)", usage)
            rec[key.lower()] = int(m.group(1)) if m else None
        ptx = os.path.join(td, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        txt = ""
        for tool in ("ptxas-blackwell", "ptxas"):  # the newer one understands newer PTX versions
            if not os.path.exists(_tool(tool)):
                continue
            out = subprocess.run([_tool(tool), f"-arch=sm_{cc}{'a' if cc == 90 else ''}", "-v", ptx,
                                  "-o", os.path.join(td, "v.cubin")], capture_output=True, text=True)
            txt = out.stdout + out.stderr
            if out.returncode == 0:
                break
        st = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
        rec["spill_stores"] = sum(int(a) for a, _ in st) if st else None
        rec["spill_loads"] = sum(int(b) for _, b in st) if st else None
    rec["smem_total"] = rec["dyn_shared"] + (rec["shared"] or 0)
    rec["smem_limit"] = SMEM_LIMIT[cc]
    problems = []
    if rec["spill_stores"] or rec["spill_loads"]:
        problems.append("register spills")
    if rec["local"] or rec["stack"]:
        problems.append("local memory / stack use")
    if rec["smem_total"] > SMEM_LIMIT[cc]:
        problems.append("shared memory over limit")
    rec["problems"] = problems
    return rec


def main(argv):
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # pragma: no cover
        print(f"triton compile API unavailable: {e!r}", file=sys.stderr)
        return 3
    if not os.path.exists(_tool("cuobjdump")) or not os.path.exists(_tool("ptxas")):
        print("cuobjdump/ptxas not shipped with this triton", file=sys.stderr)
        return 3
    jobs = _jobs()
    workers = int(os.environ.get("PTFAST_COMPILE_WORKERS", "2"))
    failed = False
    records = []
    with ProcessPoolExecutor(max_workers=workers) as ex:
        futs = [ex.submit(_compile_one, j) for j in jobs]
        for j, fu in zip(jobs, futs):
            try:
                rec = fu.result()
            except Exception as e:
                rec = dict(kernel=j[0], cc=j[1], dtype=j[2], precision=j[3], config=j[4], variant=j[5],
                           problems=[f"compile error: {type(e).__name__}: {e}"[:2000]])
            if rec["problems"]:
                failed = True
            records.append(rec)
            print(json.dumps(rec, default=str), flush=True)
    if len(argv) > 2 and argv[1] == "--json":
        with open(argv[2], "w") as f:
            json.dump(records, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
