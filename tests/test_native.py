"""The C++ extension: really built and used, bit-exact with eager, safe concurrent first use, clean fallback."""

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ptfast import _native_spec as _spec
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
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


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
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.complex64]
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
    path, reasons = native._try_prebuilt(expected)
    assert path is None  # stale: skipped unread; broken: load fails, skipped
    assert "does not match" in reasons[0] and "does not load" in reasons[1], reasons


def test_stamp_verifies_against_torch_without_sources():
    """The stamp's source digest lets a library's id be checked against this torch when the sources are gone."""
    src = native.source_dir()
    digest = _spec.source_digest(src)
    here, other = torch.__version__, "1.0.0+other"
    ok = _spec.Stamp(_spec.build_id(digest, here), digest, here)
    assert ok.build_id == native.source_hash(src)
    assert _spec.unverified_reason(ok, here, None) is None
    assert _spec.unverified_reason(ok, here, ok.build_id) is None
    old = _spec.Stamp(ok.build_id, None, None)  # a library stamped by an older ptfast: id only
    assert _spec.unverified_reason(old, here, ok.build_id) is None  # with the sources, the id alone suffices
    assert "cannot be verified" in _spec.unverified_reason(old, here, None)
    foreign = _spec.Stamp(_spec.build_id(digest, other), digest, other)
    assert f"built for torch {other}, this is torch {here}" in _spec.unverified_reason(foreign, here, None)
    assert f"built for torch {other}" in _spec.unverified_reason(foreign, here, ok.build_id)
    forged = _spec.Stamp(foreign.build_id, digest, here)  # claims this torch, but its id says otherwise
    assert "does not match" in _spec.unverified_reason(forged, here, None)
    assert "no ptfast build id" in _spec.unverified_reason(None, here, None)


_FALLBACK_CHILD = """
    import json, warnings, torch
    from ptfast import native
    from ptfast.ops.prepend import prepend_prompts, prepend_prompts_reference
    installed_prebuilt = native._prebuilt_candidates
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
    """Run the child above with ``patch`` (statements, any indentation) applied after ``import ptfast``; its JSON,
    plus ``stderr``: the lines of its stderr that mention ptfast (warnings are recorded, not printed)."""
    proc = _run(textwrap.dedent(_FALLBACK_CHILD).format(patch=textwrap.dedent(patch).strip()), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["stderr"] = [line for line in proc.stderr.splitlines() if "ptfast" in line]
    return res


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
@pytest.mark.slow
def test_build_failure_falls_back_with_one_warning_naming_the_cause(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in native.SOURCES:
        (src / name).write_text("this is not C++;\n")
    patch = f"native.source_dir = lambda: {str(src)!r}"
    res = _child(patch, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert res["available"] is False and res["equal"] is True and res["registered"] is False
    assert len(res["warnings"]) == 1, res["warnings"]
    assert "building the C++ extension failed" in res["warnings"][0]


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ toolchain")
@pytest.mark.slow
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
    env = dict(
        os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    env.pop("PTFAST_NO_NATIVE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(3)
    ]
    results, said = [], []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
        said += [line for line in err.splitlines() if line.startswith("ptfast: compiling")]
    assert all(r["ok"] and r["source"] == "jit" for r in results), results
    assert sum(r["built"] for r in results) == 1, results  # one compiled, the others loaded its result
    assert len(said) == 1, said  # and only the one that compiled said so
    assert not (build_dir / "lock").exists()


# ------------------------------------------------------------------------------------------------ JIT cache, stderr
# Each test runs its own processes on its own TORCH_EXTENSIONS_DIR (the shared cache is never touched); the one
# compile of the module is shared through this fixture (tests that change the cache work on a copy).
AOT_COMMAND = "PTFAST_BUILD_EXT=1 pip install --no-build-isolation -e ."


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
    """A JIT cache holding one fresh build: (its root, the JSON of the process that compiled it)."""
    if not HAS_TOOLCHAIN:
        pytest.skip("needs a C++ toolchain")
    root = tmp_path_factory.mktemp("ext")
    first = _child("", {"TORCH_EXTENSIONS_DIR": str(root)})
    assert first["available"] and first["status"]["source"] == "jit", first
    assert first["status"]["build_seconds"] is not None, first
    return root, first


def _stamp_bytes(data: bytes) -> bytes:
    m = _spec.STAMP_RE.search(data)
    assert m is not None and m.group(2), "the library carries no full stamp"
    return m.group(0)


@pytest.mark.slow
def test_first_compile_says_so_in_one_line_and_a_cached_load_says_nothing(jit_cache):
    root, first = jit_cache
    build_dir = os.path.dirname(first["status"]["path"])
    assert len(first["stderr"]) == 1, first["stderr"]
    line = first["stderr"][0]
    assert line.startswith("ptfast: compiling its C++ extension"), line
    assert build_dir in line and AOT_COMMAND in line, line
    again = _child("", {"TORCH_EXTENSIONS_DIR": str(root)})
    assert again["available"] and again["status"]["source"] == "jit", again
    assert again["status"]["build_seconds"] is None  # loaded from the cache
    assert again["stderr"] == [] and again["warnings"] == [], again


@pytest.mark.slow
def test_the_cache_check_loads_from_the_jit_cache_without_a_compile(jit_cache):
    """A process whose first native use is a cached table finds the library an earlier process built, loads it
    without a compile, and checks hits with it (``native.table_check_module``)."""
    root, _ = jit_cache
    code = """
        import json, torch
        from ptfast import PromptEncoder, PromptEncoderConfig, native
        native._prebuilt_candidates = lambda: []
        enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=5, token_dim=12, encoder_hidden_size=7))
        with torch.no_grad():
            outs = [enc(torch.arange(5).unsqueeze(0)) for _ in range(3)]
        print(json.dumps(dict(status=native._status, entry_native=enc._cache.entry.native is not None,
                              same=all(o.data_ptr() == outs[0].data_ptr() for o in outs))))
    """
    proc = _run(code, {"TORCH_EXTENSIONS_DIR": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["status"]["source"] == "jit" and res["status"]["build_seconds"] is None, res
    assert res["entry_native"] and res["same"], res
    assert "ptfast" not in proc.stderr, proc.stderr


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ toolchain")
@pytest.mark.slow
def test_corrupt_cached_library_with_the_right_id_is_rebuilt(jit_cache, tmp_path):
    """A cached .so whose stamp matches but which does not load (a corrupt file, an interrupted link that already
    wrote the stamp) is removed and rebuilt by the next process, which then uses it."""
    root, first = jit_cache
    ext = tmp_path / "ext"
    shutil.copytree(root, ext)
    so = ext / os.path.relpath(first["status"]["path"], root)
    so.write_bytes(b"\x7fELF cut short\0" + _stamp_bytes(so.read_bytes()) + b"\0garbage")
    assert native.read_build_id(str(so)) == native.source_hash(native.source_dir())
    res = _child("", {"TORCH_EXTENSIONS_DIR": str(ext)})
    assert res["available"] and res["registered"] and res["equal"] and res["warnings"] == [], res
    assert res["status"]["source"] == "jit" and res["status"]["build_seconds"] is not None, res
    assert len(res["stderr"]) == 1 and res["stderr"][0].startswith("ptfast: rebuilding"), res["stderr"]
    assert "does not load" in res["stderr"][0] and AOT_COMMAND in res["stderr"][0]
    assert native.read_build_id(str(so)) == native.source_hash(native.source_dir()) and so.stat().st_size > 10_000


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ toolchain")
@pytest.mark.slow
def test_a_rebuild_that_does_not_load_either_falls_back_naming_the_cause(tmp_path):
    """The rebuild is tried once: if its library does not load either, one warning names that (no compile here:
    torch's builder is replaced by one that links garbage with the right stamp)."""
    src = native.source_dir()
    build_id = native.source_hash(src)
    name = f"ptfast_native_{build_id[:16]}"
    (tmp_path / name).mkdir()
    stamp = _spec.stamp_define(src, torch.__version__).split("=", 1)[1]
    (tmp_path / name / f"{name}.so").write_bytes(b"garbage PTFAST_SRC_SHA256=" + stamp.encode() + b";")
    patch = """
        import os
        import torch.utils.cpp_extension as cpp_extension
        builds = []
        def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose, is_python_module):
            assert not builds, "built twice"
            builds.append(name)
            stamp = [f for f in extra_cflags if f.startswith("-DPTFAST_SOURCE_HASH=")][0].split("=", 1)[1]
            path = os.path.join(build_directory, name + ".so")
            with open(path, "wb") as f:
                f.write(b"still garbage PTFAST_SRC_SHA256=" + stamp.encode() + b";")
            torch.ops.load_library(path)  # what torch's load does after linking
        cpp_extension.load = fake_load
    """
    res = _child(patch, {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert res["available"] is False and res["registered"] is False and res["equal"] is True, res
    assert len(res["warnings"]) == 1, res["warnings"]
    assert "freshly built" in res["warnings"][0] and "does not load either" in res["warnings"][0], res["warnings"]
    assert "invalid ELF header" in res["warnings"][0] or "file too short" in res["warnings"][0], res["warnings"]
    assert [line.split(",")[0] for line in res["stderr"]] == [
        f"ptfast: rebuilding its C++ extension in {tmp_path / name}"
    ], res["stderr"]


def _fake_package(tmp_path, libraries: dict) -> str:
    """A ``ptfast`` package directory without C++ sources, holding prebuilt libraries ``{suffix index: bytes}``."""
    pkg = tmp_path / "site" / "ptfast"
    pkg.mkdir(parents=True)
    for i, data in libraries.items():
        (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[i])).write_bytes(data)
    return f"native._PKG_DIR = {str(pkg)!r}; native._prebuilt_candidates = installed_prebuilt"


def test_without_sources_an_unverifiable_prebuilt_is_not_loaded(jit_cache, tmp_path):
    """No sources: two real, loadable libraries are installed as ptfast._C, one stamped for another torch, one with
    an id alone (as an older ptfast stamped it, not checkable without the sources). Neither is loaded (the op
    stays unregistered); one warning says why."""
    root, first = jit_cache
    real = open(first["status"]["path"], "rb").read()
    stamp = _spec.read_stamp(first["status"]["path"])
    here = torch.__version__
    other = ("1" if here[0] != "1" else "3") + here[1:]  # same length: the file is patched in place
    foreign = (
        f"PTFAST_SRC_SHA256={_spec.build_id(stamp.digest, other)}_{stamp.digest}_{other.encode().hex()};"
    ).encode()
    marker = _stamp_bytes(real)
    id_only = f"PTFAST_SRC_SHA256={stamp.build_id};".encode()
    patch = _fake_package(
        tmp_path,
        {
            0: real.replace(marker, foreign),
            1: real.replace(marker, id_only + b"\0" * (len(marker) - len(id_only))),
        },
    )
    res = _child(patch, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert res["available"] is False and res["registered"] is False and res["equal"] is True, res
    assert len(res["warnings"]) == 1, res["warnings"]
    warning = res["warnings"][0]
    assert "C++ sources were not found" in warning, warning
    assert f"built for torch {other}, this is torch {here}" in warning, warning
    assert "cannot be verified without the C++ sources" in warning, warning
    assert not (tmp_path / "ext").exists()  # and no build was tried


def test_without_sources_a_verified_prebuilt_is_loaded(jit_cache, tmp_path):
    root, first = jit_cache
    patch = _fake_package(tmp_path, {0: open(first["status"]["path"], "rb").read()})
    res = _child(patch, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert res["available"] and res["registered"] and res["equal"] and res["warnings"] == [], res
    assert res["status"]["source"] == "prebuilt" and res["status"]["path"].startswith(str(tmp_path)), res
