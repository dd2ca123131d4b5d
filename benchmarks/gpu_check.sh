#!/usr/bin/env bash
# One GPU run (<= 10 minutes): install, versions, GPU tests, benchmark grid with torch.compile and CUDA-graph
# baselines, % of the floor / of 3.0 TB/s for every shape, results under $OUT (or benchmarks/results/),
# a short table last.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from anywhere in the repo
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # on a CPU box: the same steps on tiny CPU shapes
#
# Every step has a timeout computed from one deadline (GPU_CHECK_DEADLINE_S, default 570 s), and a failed step
# does not stop the later ones: the exit code is that of the first failure. UNVERIFIED ON A GPU so far (see
# benchmarks/NOTES.md); the dry run is what has been run.
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$SECONDS
DEADLINE=${GPU_CHECK_DEADLINE_S:-570}
DRY=${GPU_CHECK_DRY_RUN:-0}
RESULTS=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$RESULTS"
STATUS=0

PY=${PYTHON:-python}
if [ "$DRY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi

left() { echo $(( DEADLINE - (SECONDS - START) )); }
# step NAME CAP_SECONDS CMD...: run CMD with a timeout of min(CAP, time left - 20 s), log to $RESULTS/NAME.log
step() {
    local name=$1 cap=$2; shift 2
    local budget; budget=$(left); budget=$(( budget - 20 ))
    [ "$budget" -gt "$cap" ] && budget=$cap
    if [ "$budget" -lt 15 ]; then
        echo "=== $name: SKIPPED (no time left)"; return 0
    fi
    echo "=== $name (timeout ${budget}s, t=$((SECONDS - START))s): $*"
    timeout --signal=INT --kill-after=10 "$budget" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "=== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"
        [ "$STATUS" -eq 0 ] && STATUS=$rc
    fi
    return 0
}

echo "=== install"
if ! $PY -m pip install --no-deps --no-build-isolation -e . >"$RESULTS/install.log" 2>&1; then
    echo "pip install failed (see install.log); using PYTHONPATH=$ROOT"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "=== machine"
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
$PY - <<'EOF'
import torch, importlib
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

SLUG=$($PY -c "from ptfast import bench; print(bench.device_slug(bench.resolve_device('$DEVICE')))") || {
    echo "cannot resolve device $DEVICE"; exit 2; }
echo "results -> $RESULTS (device $SLUG)"

if [ "$DRY" = 1 ]; then
    # Tiny CPU stand-ins for each step, to exercise the plumbing without a GPU.
    step gpu_tests 120 $PY -m pytest -q tests/test_cli.py
    step grid 120 $PY -m ptfast --device cpu --shapes 4x16x8,8x32x16 --batch 1,2 --repeats 3 --min-round-ms 2 \
        --compile off --time-budget 60 --out "$RESULTS" --name "$SLUG-grid"
    step compile 200 $PY -m ptfast --device cpu --shapes 4x16x8 --batch 1 --modes infer --repeats 3 \
        --min-round-ms 2 --compile on --no-parity --providers ptfast,compile --time-budget 60 \
        --out "$RESULTS" --name "$SLUG-compile"
    step pytest_bench 120 $PY -m pytest benchmarks/ --benchmark-only -q -k "M20-D1024-H128-B1" \
        --ptfast-grid quick --ptfast-compile off --ptfast-repeats 3 --benchmark-json "$RESULTS/$SLUG.pytest.json"
else
    # 1. Correctness on the GPU: the GPU-marked tests (float64 references, NaN-poisoned outputs).
    step gpu_tests 150 $PY -m pytest -m gpu tests/ -q -p no:cacheprovider
    # 2. The whole grid (4 shapes x B 1,8 x fp32,bf16 x infer/train/prompt, model at the seed shape) against eager
    #    PEFT and eager PEFT replayed from a CUDA graph (peft-graph); no compile here, it is step 3.
    step grid 170 $PY -m ptfast --device cuda --grid full --compile off --repeats 7 --time-budget 140 \
        --out "$RESULTS" --name "$SLUG-grid"
    # 3. torch.compile baselines (default and max-autotune-no-cudagraphs), batch 1: the compile time of each is in
    #    the JSON (setup_s / note). Seed shape first, then the large weight-bound shape.
    step compile 200 $PY -m ptfast --device cuda --shapes 20x1024x128,20x4096x4096 --batch 1 --modes infer,train \
        --dtype bf16,fp32 --compile on --providers ptfast,compile,compile-mat --repeats 7 --time-budget 150 \
        --no-parity --out "$RESULTS" --name "$SLUG-compile"
    # 4. The pytest-benchmark suite (pytest-benchmark's own statistics, CUDA-synchronised rounds), quick grid.
    step pytest_bench 100 $PY -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --ptfast-grid quick --ptfast-compile off --benchmark-json "$RESULTS/$SLUG.pytest.json"
fi

echo "=== summary (t=$((SECONDS - START))s)"
$PY - "$RESULTS" "$SLUG" <<'EOF'
import json, os, sys
from ptfast import bench
results, slug = sys.argv[1], sys.argv[2]
rows, info = [], None
for suffix in ("grid", "compile"):
    path = os.path.join(results, f"{slug}-{suffix}.json")
    if not os.path.exists(path):
        print(f"missing: {path}")
        continue
    data = json.load(open(path))
    info = info or data["machine"]
    for r in data["results"]:
        if suffix == "compile" and r["provider"] in ("peft", "ptfast"):
            continue  # the grid run has these
        rows.append(r)
    for p in data.get("parity", []):
        print(f"parity {p['shape']} {p['dtype']}: fwd {p['fwd_max_abs_err']:.1e} cached {p['cached_max_abs_err']:.1e}"
              f" grads {p['grad_max_abs_err']:.1e} (PEFT vs fp64 {p['peft_vs_fp64_max_abs_err']:.1e})"
              + ("" if p["finite"] else " NON-FINITE"))
# Short table: batch 1, infer and train, every shape and dtype.
short = [r for r in rows if r["batch"] == 1 and r["mode"] in ("infer", "train")]
bench.add_speedups(short)
if short:
    print(bench.format_table(short, info))
    print(f"%floor = max(bytes/{bench.HBM_BYTES_PER_S/1e12:.1f} TB/s, flops/peak) / time;"
          " %HBM = bytes/time / HBM bandwidth (ptfast, uncached)")
EOF
echo "=== done in $((SECONDS - START))s, exit $STATUS; files in $RESULTS:"
ls -1 "$RESULTS"
exit $STATUS
