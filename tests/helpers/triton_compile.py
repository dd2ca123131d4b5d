"""Compile ptfast's Triton kernels for real GPU targets, without a GPU: the shared harness of the compile tests.

    python -m tests.helpers.triton_compile [--set mlp_head|prepend] [--json OUT]

Run in a process where TRITON_INTERPRET is NOT set (an InterpretedFunction cannot be compiled). Each job calls
``ptfast.kernels.audit.compile_kernel`` (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``) and
``audit.analyze`` (cuobjdump from Triton's wheel: registers, shared and local memory, SASS spill instructions and
main-loop MMA / FFMA counts). Prints one JSON record per compile; ``problems`` lists what is wrong with it.

Integer-argument variants: at launch Triton marks an int argument divisible by 16 with tt.divisibility=16 and
builds another binary. "div16" marks every integer but the row counts (the common case: D, H = 768, 1024, ...
with M = 20); "i32" marks none (odd D, H such as 1000, 129). sm_90 builds both, sm_80 only "div16", and configs
whose main loop cannot differ (the epilogue variants of the smaller tiles) are built once: a few dozen compiles.

Exit codes: 0 ok, 3 API unavailable (the test skips), anything else = failure.
"""

import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

from ptfast import _env

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Max dynamic+static shared memory per block (bytes): sm_80 163 KB (A100 opt-in), sm_90 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
VARIANTS = {90: ("div16", "i32"), 80: ("div16",)}
# dtype, kernel precision: every precision the kernels take. "tf32" is not reached through fused_mlp_head now
# ("high" runs 3xTF32 since the TF32 kernels failed on an H200) but stays built for when it is re-enabled.
DTYPE_PRECISIONS = (("fp32", "tf32x3"), ("fp32", "tf32"), ("fp32", "ieee"), ("fp16", "ieee"), ("bf16", "ieee"))


def _torch_dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def mlp_head_jobs():
    """(kernel, constexprs, dtype, cc, warps, stages, variant, extra) for every config the heuristics can return.

    Pruned where the code cannot differ in what is checked: the epilogue / mask variants share the main loop (all
    are built at the largest tile, one at the others); head23 at every hidden tile (BLOCK_H_CHOICES); "i32" only
    for the largest tiles; sm_80 for all but fp32 "ieee" (a request no default makes).
    """
    from ptfast.kernels import common, linear, mlp_head, mlp_head_small

    jobs = []
    for cc, variants in VARIANTS.items():
        for dt, prec in DTYPE_PRECISIONS:
            if cc == 80 and (dt, prec) == ("fp32", "ieee"):
                continue
            tdt = _torch_dtype(dt)
            cfgs = []  # (name, constexprs with num_warps / num_stages, largest tile?)
            for bm in linear.BLOCK_M_CHOICES:
                cfg = dict(linear.linear_config(bm, tdt, prec))
                assert cfg["BLOCK_M"] == bm
                big = bm == max(linear.BLOCK_M_CHOICES)
                for w_t, epi in common.LINEAR_VARIANTS if big else common.LINEAR_VARIANTS[:1]:
                    c = dict(
                        cfg,
                        W_T=w_t,
                        HAS_BIAS=epi.bias,
                        RELU=epi.relu,
                        HAS_MASK=epi.mask,
                        TANH=epi.tanh,
                        TANH_GRAD=epi.tanh_grad,
                        PRECISION=prec,
                    )
                    cfgs.append(("linear._linear_kernel", c, big and epi.relu))
                for epi in common.BWD_EPILOGUES if big else common.BWD_EPILOGUES[:1]:
                    plan = linear.linear_dw_plan(bm, 256, 256, dtype=tdt, precision=prec, **epi)
                    c = dict(plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)
                    cfgs.append(("linear._bwd_kernel", c, big and epi["mask"]))
            for bm, bh in ((32, 16), (32, 32), (32, 64), (32, 128), (16, 128), (32, 256)):  # every BLOCK_H
                if bh > mlp_head_small.small_max_h(tdt, prec):
                    continue
                cfg = dict(mlp_head_small.head23_config(bm, bh, tdt, prec), PRECISION=prec)
                assert cfg["BLOCK_H"] == bh
                cfgs.append(("mlp_head_small._head23_kernel", cfg, bh == mlp_head_small.small_max_h(tdt, prec)))
            # The one-launch kernels run the tiles built above; what can differ is their register pressure (both
            # tiles' live ranges in one binary), highest at the largest hidden tile: built there, at every row tile,
            # "div16" only (the dispatcher runs them only where D and H are multiples of 16).
            H = mlp_head_small.small_max_h(tdt, prec)
            row_tiles = [bm for bm in linear.BLOCK_M_CHOICES if bm <= mlp_head.FUSED_MAX_M]
            for M in row_tiles:
                for plan in mlp_head.forward_plan(M, 1024, H, dtype=tdt, precision=prec) + mlp_head.backward_plan(
                    M, 1024, H, dtype=tdt, precision=prec
                ):
                    assert plan.kernel.startswith("mlp_head_fused"), plan.kernel
                    c = dict(plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)
                    cfgs.append((plan.kernel, c, False))
            for name, cfg, big in cfgs:
                cfg = dict(cfg)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                for v in variants if big else variants[:1]:
                    extra = dict(ptr_types={"bar_ptr": "i32"}) if name.startswith("mlp_head_fused") else None
                    jobs.append((name, cfg, dt, cc, warps, stages, v, extra))
    return jobs


def prepend_jobs():
    from ptfast.kernels import prepend as k

    size = {"fp32": 4, "fp16": 2, "bf16": 2, "i8": 1, "i64": 8}
    div16 = ("D", "stride_we_v", "stride_tab_a", "stride_tab_t")
    jobs = []
    for cc in (80, 90):
        for dt in ("fp32", "fp16", "bf16"):
            for cfg in k.CONFIGS[size[dt]]:
                jobs.append(
                    (
                        "prepend._prepend_kernel",
                        cfg,
                        dt,
                        cc,
                        cfg["num_warps"],
                        3,
                        "div16",
                        dict(ids="i64", aligned=True),
                    )
                )
            jobs.append(
                (
                    "prepend._prepend_kernel",
                    k.CONFIGS[size[dt]][-1],
                    dt,
                    cc,
                    k.CONFIGS[size[dt]][-1]["num_warps"],
                    3,
                    "i32",
                    dict(ids="i32", aligned=False),
                )
            )
    for dt in ("i8", "i64"):  # other dtypes are moved as same-size integers
        jobs.append(
            (
                "prepend._prepend_kernel",
                k.CONFIGS[size[dt]][-1],
                dt,
                90,
                k.CONFIGS[size[dt]][-1]["num_warps"],
                3,
                "div16",
                dict(ids="i64", aligned=True),
            )
        )
    return [
        (n, {kk: v for kk, v in c.items() if kk != "num_warps"}, dt, cc, w, s, var, dict(extra, div16=div16))
        for n, c, dt, cc, w, s, var, extra in jobs
    ]


def compile_one(job):
    from ptfast.kernels import audit

    name, cfg, dt, cc, warps, stages, variant, extra = job
    kwargs = {}
    if extra and "ptr_types" in extra:  # the one-launch kernels' barrier counters
        kwargs = dict(ptr_types=extra["ptr_types"])
    elif extra:  # prepend: index/adapter pointers and its own aligned integer arguments
        kwargs = dict(
            ptr_types={"ids_ptr": extra["ids"], "aidx_ptr": "i64"},
            div16_args=set(extra["div16"]),
            align_ptrs=extra["aligned"],
        )
    compiled = audit.compile_kernel(audit.kernel_fn(name), cfg, dt, cc, warps, stages, variant=variant, **kwargs)
    a = audit.analyze(compiled)
    rec = dict(
        kernel=name.split(".")[-1],
        cc=cc,
        dtype=dt,
        precision=cfg.get("PRECISION"),
        variant=variant,
        num_warps=warps,
        num_stages=stages,
        config={k: v for k, v in cfg.items() if k != "PRECISION"},
        reg=a["reg"],
        stack=a["stack"],
        local=a["local"],
        shared=a["shared"],
        smem_total=a["smem"],
        spill_stores=a["spill_stores"],
        spill_loads=a["spill_loads"],
        loop=a["loop"],
        vector_ld=bool(re.search(r"ld\.global(\.\w+)*\.v[248]", compiled.asm["ptx"])),
        **{k: v for k, v in (extra or {}).items() if k not in ("div16", "ptr_types")},
        **cfg,
    )
    problems = []
    if rec["spill_stores"] or rec["spill_loads"]:
        problems.append("register spills")
    if rec["local"] or rec["stack"]:
        problems.append("local memory / stack use")
    if rec["smem_total"] > SMEM_LIMIT[cc]:
        problems.append("shared memory over limit")
    if (
        name != "prepend._prepend_kernel"
        and not (dt == "fp32" and cfg.get("PRECISION") == "ieee")
        and not rec["loop"]["mma"]
    ):
        problems.append("no MMA instruction in the main loop (tensor cores intended)")
    rec["problems"] = problems
    return rec


def main(argv):
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401

        from ptfast.kernels import audit
    except Exception as e:  # pragma: no cover
        print(f"triton compile API unavailable: {e!r}", file=sys.stderr)
        return 3
    if not os.path.exists(audit.tool("cuobjdump")):
        print("cuobjdump not shipped with this triton", file=sys.stderr)
        return 3
    which = argv[argv.index("--set") + 1] if "--set" in argv else "mlp_head"
    jobs = prepend_jobs() if which == "prepend" else mlp_head_jobs()
    workers = _env.compile_workers()
    failed = False
    records = []
    with ProcessPoolExecutor(max_workers=workers) as ex:
        futs = [ex.submit(compile_one, j) for j in jobs]
        for j, fu in zip(jobs, futs):
            try:
                rec = fu.result()
            except Exception as e:
                rec = dict(
                    kernel=j[0],
                    cc=j[3],
                    dtype=j[2],
                    config=j[1],
                    variant=j[6],
                    problems=[f"compile error: {type(e).__name__}: {e}"[:2000]],
                )
            failed = failed or bool(rec["problems"])
            records.append(rec)
            print(json.dumps(rec, default=str), flush=True)
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump(records, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
