"""The C++ extension: really built and used, bit-exact with eager, safe concurrent first use, clean fallback."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ptfast import native
from ptfast.ops.prepend import prepend_prompts, prepend_prompts_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TOOLCHAIN = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None
# In CI (or wherever a compiler and ninja exist, as here) the fallback must not be taken silently.
MUST_BUILD = bool(os.environ.get("CI")) or HAS_TOOLCHAIN


def _run(code: str, env_update: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PTFAST_NO_NATIVE", None)
    env.pop("PTFAST_BACKEND", None)
    env.update(env_update)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.skipif(not MUST_BUILD, reason="no C++ toolchain and not CI: the fallback is allowed here")
def test_extension_was_built_and_is_used(monkeypatch):
    monkeypatch.delenv("PTFAST_NO_NATIVE", raising=False)
    monkeypatch.delenv("PTFAST_BACKEND", raising=False)
    assert native.native_available(), native.native_status()
    status = native.native_status()
    assert status["source"] in ("jit", "prebuilt", "preloaded") and status["error"] is None
    if status["path"]:
        assert native.read_build_id(status["path"]) == native.source_hash(native.source_dir())
    ids = torch.randint(0, 100, (2, 5))
    we, tables, ai = torch.randn(100, 8), torch.randn(2, 3, 8), torch.tensor([1, 0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = prepend_prompts(ids, we, tables, ai)  # auto backend
    names = {e.key for e in prof.key_averages()}
    assert "ptfast::prepend_prompts" in names, sorted(names)
    assert "aten::cat" not in names and "aten::embedding" not in names  # not the eager path
    assert torch.equal(out, prepend_prompts_reference(ids, we, tables, ai))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8,
              torch.complex64]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_native_equals_eager_bitwise(dtype, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        V, D = 1000, 384  # 1.5 KiB rows, 8 x 330 rows: several parallel_for chunks
        we = (torch.randn(V, D) * 100).to(dtype)
        if dtype.is_floating_point:
            we[0, :3] = torch.tensor([float("nan"), float("-inf"), -0.0])
        tables = (torch.randn(6, 30, D) * 100).to(dtype)
        ids = torch.randint(0, V, (8, 300))
        ids[0, :4] = 0
        ai = torch.randint(0, 6, (8,))
        out = prepend_prompts(ids, we, tables, ai, backend="native")
        ref = prepend_prompts(ids, we, tables, ai, backend="eager")
        assert out.dtype == ref.dtype == dtype
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    finally:
        torch.set_num_threads(old)


def test_meta_kernel_traces_under_torch_compile():
    def f(ids, we, tables, ai):
        return torch.ops.ptfast.prepend_prompts(ids, we, tables, ai) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for B, L in ((2, 5), (3, 9)):
        ids = torch.randint(0, 50, (B, L))
        we, tables, ai = torch.randn(50, 16), torch.randn(3, 4, 16), torch.randint(0, 3, (B,))
        assert torch.equal(compiled(ids, we, tables, ai), f(ids, we, tables, ai))


def test_build_id_checks_skip_stale_or_broken_prebuilt(tmp_path, monkeypatch):
    expected = native.source_hash(native.source_dir())
    stale = tmp_path / "_C.stale.so"
    stale.write_bytes(b"\x7fELF junk PTFAST_SRC_SHA256=" + b"0" * 64 + b"; junk")
    broken = tmp_path / "_C.broken.so"
    broken.write_bytes(b"not a library PTFAST_SRC_SHA256=" + expected.encode() + b";")
    assert native.read_build_id(str(stale)) == "0" * 64
    monkeypatch.setattr(native, "_prebuilt_candidates", lambda: [str(stale), str(broken)])
    assert native._try_prebuilt(expected) is None  # stale: skipped unread; broken: load fails, skipped


_FALLBACK_CHILD = """
    import json, warnings, torch
    from ptfast import native
    from ptfast.ops.prepend import prepend_prompts, prepend_prompts_reference
    native._prebuilt_candidates = lambda: []  # an installed prebuilt _C must not mask the failure under test
    {patch}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = torch.randint(0, 10, (3, 4)); we = torch.randn(10, 6).bfloat16()
        tables = torch.randn(2, 3, 6).bfloat16(); ai = torch.tensor([1, 0, 1])
        outs = [prepend_prompts(ids, we, tables, ai) for _ in range(3)]
        avail = native.native_available()
    print(json.dumps(dict(
        available=avail,
        equal=all(torch.equal(o, prepend_prompts_reference(ids, we, tables, ai)) for o in outs),
        registered=native._op_registered(),
        warnings=[str(w.message) for w in caught if issubclass(w.category, native.NativeFallbackWarning)],
        status=native.native_status(),
    )))
"""


def _child(patch: str, env: dict) -> dict:
    proc = _run(_FALLBACK_CHILD.format(patch=patch), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forced_fallback_with_env_switch(tmp_path):
    res = _child("", {"PTFAST_NO_NATIVE": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert res["available"] is False and res["equal"] is True
    assert res["registered"] is False  # nothing was built or loaded
    assert res["warnings"] == []  # a deliberate switch is not warned about
    assert res["status"]["disabled"] is True
    assert not any(tmp_path.iterdir())  # and no build was even started


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    res = _child("", {"CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert res["available"] is False and res["equal"] is True and res["registered"] is False
    assert len(res["warnings"]) == 1, res["warnings"]
    assert "no C++ compiler" in res["warnings"][0] and "/nonexistent/c++" in res["warnings"][0]
    assert "no C++ compiler" in res["status"]["error"]


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ toolchain")
def test_build_failure_falls_back_with_one_warning_naming_the_cause(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "prepend_prompts.cpp").write_text("this is not C++;\n")
    patch = f"native.source_dir = lambda: {str(src)!r}"
    res = _child(patch, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert res["available"] is False and res["equal"] is True and res["registered"] is False
    assert len(res["warnings"]) == 1, res["warnings"]
    assert "building the C++ extension failed" in res["warnings"][0]


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ toolchain")
def test_concurrent_first_use_builds_once_and_survives_a_stale_lock(tmp_path):
    """Three processes start on an empty extensions dir holding a stale torch lock file (from a builder that was
    killed): torch's FileBaton alone would make all of them wait forever."""
    name = "ptfast_native_" + native.source_hash(native.source_dir())[:16]
    build_dir = tmp_path / name
    build_dir.mkdir()
    (build_dir / "lock").write_text("")
    code = """
        import json, time, torch
        from ptfast import native
        native._prebuilt_candidates = lambda: []
        ok = native.native_available()
        st = native.native_status()
        ids = torch.randint(0, 10, (2, 3)); we = torch.randn(10, 4); tb = torch.randn(1, 2, 4)
        out = torch.ops.ptfast.prepend_prompts(ids, we, tb, torch.zeros(2, dtype=torch.long))
        print(json.dumps(dict(ok=ok, source=st["source"], built=st["build_seconds"] is not None, err=st["error"])))
    """
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PTFAST_NO_NATIVE", None)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["ok"] and r["source"] == "jit" for r in results), results
    assert sum(r["built"] for r in results) == 1, results  # one compiled, the others loaded its result
    assert not (build_dir / "lock").exists()
