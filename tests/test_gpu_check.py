"""benchmarks/gpu_check.sh on CPU (GPU_CHECK_DRY_RUN=1): both calls run their steps on tiny stand-ins, and each
leaves exactly one archive in $OUT (the GPU run may bring back at most 8 files)."""

import os
import subprocess
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_step_caps_fit_the_deadline():
    """The GPU steps' caps of each mode fit the script's default deadline (a parameter, GPU_CHECK_DEADLINE_S), less
    the 15 s each step keeps back."""
    import re

    text = open(SCRIPT).read()
    deadline = int(re.search(r"GPU_CHECK_DEADLINE_S:-(\d+)", text).group(1))
    for mode in ("correctness", "speed"):
        body = text.split('if [ "$MODE" = correctness ]; then')[1]
        part = body.split("# ---- speed")[0 if mode == "correctness" else 1]
        caps = [int(c) for c in re.findall(r"step \w+ (\d+) ", part)]
        gpu_caps = caps[-1:] if mode == "correctness" else caps  # correctness: the non-dry branch is the last
        assert sum(gpu_caps) <= deadline - 15, (mode, caps, deadline)


@pytest.mark.parametrize("mode", ["correctness", "speed"])
@pytest.mark.slow
def test_dry_run_writes_one_archive(mode, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), PYTHON=os.environ.get("PYTHON", "python"), GPU_CHECK_DEADLINE_S="200"
    )
    import sys

    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", SCRIPT, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = os.listdir(tmp_path)
    assert files == [f"gpu_check-{mode}.tar.gz"], files
    with tarfile.open(tmp_path / files[0]) as tar:
        names = tar.getnames()
    assert any(n.endswith("machine.log") for n in names)
    assert any(n.endswith("gpu_tests.log" if mode == "correctness" else "grid.json") for n in names), names
