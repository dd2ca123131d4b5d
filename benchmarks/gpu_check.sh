#!/usr/bin/env bash
# GPU check in two short calls (each <= 5 minutes, so both fit one ~15-minute lease with the machine's start):
#
#   bash benchmarks/gpu_check.sh correctness   # GPU-marked tests (fp64 references, NaN-poisoned outputs)
#   bash benchmarks/gpu_check.sh speed         # benchmark grid vs PEFT (+ CUDA graph), ncu bank conflicts
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh correctness|speed   # CPU stand-ins (tests/test_gpu_check.py)
#
# Each call writes ONE archive to $OUT (or benchmarks/results/): gpu_check-<mode>.tar.gz with every log and JSON,
# and prints a short summary last. Every step has a timeout taken from one deadline (GPU_CHECK_DEADLINE_S,
# default 280 s); the step caps of a mode add up to less than it. A failed step does not stop the later ones:
# the exit code is that of the first failure. The interpreter is python3 (PYTHON overrides).
# Run once on an H200 (benchmarks/NOTES.md); the dry run is what CI runs.
set -u -o pipefail

MODE=${1:-correctness}
case "$MODE" in correctness|speed) ;; *) echo "usage: $0 correctness|speed" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$SECONDS
DEADLINE=${GPU_CHECK_DEADLINE_S:-280}
DRY=${GPU_CHECK_DRY_RUN:-0}
OUTDIR=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
RESULTS=$WORK/gpu_check-$MODE
mkdir -p "$RESULTS"
STATUS=0
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # no pip install: saves its ~20 s and touches nothing
export TRITON_DEFAULT_FP_FUSION=1
export PTFAST_BENCH_RESULTS="$RESULTS"

left() { echo $(( DEADLINE - (SECONDS - START) )); }
# step NAME CAP_SECONDS CMD...: run CMD with a timeout of min(CAP, time left - 15 s), log to $RESULTS/NAME.log
step() {
    local name=$1 cap=$2; shift 2
    local budget; budget=$(left); budget=$(( budget - 15 ))
    [ "$budget" -gt "$cap" ] && budget=$cap
    if [ "$budget" -lt 10 ]; then
        echo "=== $name: SKIPPED (no time left)"; return 0
    fi
    echo "=== $name (timeout ${budget}s, t=$((SECONDS - START))s): $*"
    timeout --signal=INT --kill-after=5 "$budget" "$@" >"$RESULTS/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$RESULTS/$name.log"
    if [ "$rc" -ne 0 ]; then
        echo "=== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"
        [ "$STATUS" -eq 0 ] && STATUS=$rc
    fi
    return 0
}

finish() {
    echo "=== done in $((SECONDS - START))s, exit $STATUS"
    tar -C "$WORK" -czf "$OUTDIR/gpu_check-$MODE.tar.gz" "gpu_check-$MODE"
    echo "archive: $OUTDIR/gpu_check-$MODE.tar.gz ($(ls "$RESULTS" | wc -l) files)"
    rm -rf "$WORK"
    exit $STATUS
}

echo "=== machine ($MODE)"
{
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
    $PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
for m in ("triton", "peft", "transformers", "pytest_benchmark", "ptfast"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as exc:
        print(m, "unavailable:", exc)
EOF
    git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$RESULTS/machine.log"

if [ "$MODE" = correctness ]; then
    if [ "$DRY" = 1 ]; then
        step gpu_tests 60 $PY -m pytest -q -p no:cacheprovider tests/test_mlp_head.py -k "precision or launch_counts"
    else
        # GPU-marked tests: each compiles only the configs its shapes reach (about 40 kernel variants in all).
        step gpu_tests 250 $PY -m pytest -m gpu tests/ -q -p no:cacheprovider -x --durations=15
    fi
    finish
fi

# ---- speed
if [ "$DRY" = 1 ]; then
    DEVICE=cpu; GRID_BACKEND=auto; GRID_ARGS="--shapes 4x16x8 --batch 1 --repeats 3 --min-round-ms 2 --time-budget 30"
else
    DEVICE=cuda; GRID_BACKEND=triton; GRID_ARGS="--shapes 20x1024x128,20x4096x4096,100x4096x1024 --batch 1 --dtype fp32,bf16 --repeats 7 --time-budget 120"
fi
# 1. ptfast vs eager PEFT and PEFT replayed from a CUDA graph: infer and train, batch 1 (no torch.compile: its
#    compile time does not fit this call). The kernels are what is measured: `auto` keeps the head eager on CUDA.
PTFAST_BACKEND=$GRID_BACKEND step grid 150 $PY -m ptfast --device $DEVICE $GRID_ARGS --modes infer,train --compile off --out "$RESULTS" --name grid
# 2. ncu, where it exists: shared-memory bank conflicts, wavefronts, DRAM bytes and duration of one launch of every
#    kernel at the seed and 4096 shapes (fp32 "highest", bf16), forward and backward.
if [ "$DRY" != 1 ] && command -v ncu >/dev/null; then
    cat >"$RESULTS/ncu_probe.py" <<'EOF'
import torch
from ptfast.ops.mlp_head import fused_mlp_head
for (M, D, H) in ((20, 1024, 128), (20, 4096, 4096)):
    for dt, prec in ((torch.float32, "highest"), (torch.bfloat16, None)):  # "high" runs the same 3xTF32 kernels
        g = torch.Generator(device="cuda").manual_seed(0)
        ps = [torch.randn(s, device="cuda", generator=g).to(dt) * 0.05 for s in ((M, D), (H, D), (H,), (H, H), (H,), (D, H), (D,))]
        ps = [p.requires_grad_() for p in ps]
        fused_mlp_head(*ps, precision=prec).backward(torch.ones(M, D, device="cuda", dtype=dt))
torch.cuda.synchronize()
EOF
    step ncu 110 ncu --target-processes all --csv --kernel-name regex:"_linear_kernel|_head23_kernel|_bwd_kernel" \
        --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        $PY "$RESULTS/ncu_probe.py"
else
    echo "=== ncu: not run ($([ "$DRY" = 1 ] && echo dry run || echo 'ncu not found'))"
fi

echo "=== summary (t=$((SECONDS - START))s)"
$PY - "$RESULTS" <<'EOF' 2>&1 | tee "$RESULTS/summary.log"
import json, os, sys
from ptfast import bench
results = sys.argv[1]
path = os.path.join(results, "grid.json")
if os.path.exists(path):
    data = json.load(open(path))
    rows = [r for r in data["results"] if r["batch"] == 1]
    bench.add_speedups(rows)
    print(bench.format_table(rows, data["machine"]))
else:
    print(f"missing: {path}")
log = os.path.join(results, "ncu.log")
if os.path.exists(log):
    print("ncu (kernel, metric, value):")
    for line in open(log):
        f = [c.strip('"') for c in line.rstrip().split('","')]
        if len(f) > 14 and ("bank_conflicts" in line or "gpu__time" in line):
            print(" ", f[4][:40], f[-3], f[-1])
EOF
finish
