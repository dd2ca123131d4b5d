"""The sdist: it carries what the tests need (tests/ is a package with conftest.py and helpers/, benchmarks/ has its
own conftest.py), the C++ sources and the license, and its test suite collects when unpacked."""

import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

build = pytest.importorskip("build", reason="the sdist is built with `build` (pip install build; in the test extra)")


def _setuptools_too_old():
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("setuptools")) < Version("77")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(the unpacked sdist's root, the names in the archive relative to it, the build's output)."""
    if _setuptools_too_old():
        pytest.skip("pyproject.toml needs setuptools>=77 (SPDX license), and the build runs without isolation")
    out = tmp_path_factory.mktemp("sdist")
    # No isolation: offline and fast (~1 s); it uses this environment's setuptools.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), REPO],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (archive,) = out.glob("ptfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(out, filter="data")
        else:  # pragma: no cover
            tar.extractall(out)
    top = names[0].split("/")[0]
    rel = {n[len(top) + 1 :] for n in names if n.startswith(top + "/")}
    return out / top, rel, proc.stdout + proc.stderr


def _repo_files(*dirs):
    for d in dirs:
        for root, subdirs, files in os.walk(os.path.join(REPO, d)):
            subdirs[:] = [s for s in subdirs if s != "__pycache__" and not s.startswith(".")]
            for f in files:
                if not f.endswith((".pyc", ".so")):
                    yield os.path.relpath(os.path.join(root, f), REPO).replace(os.sep, "/")


def test_sdist_carries_tests_benchmarks_sources_and_license(sdist):
    _, names, log = sdist
    for needed in (
        "tests/__init__.py",
        "tests/conftest.py",
        "tests/helpers/__init__.py",
        "tests/helpers/models.py",
        "benchmarks/conftest.py",
        "csrc/prepend_prompts.cpp",
        "LICENSE",
        "setup.py",
        "ptfast/_native_spec.py",
    ):
        assert needed in names, needed
    missing = sorted(set(_repo_files("tests", "benchmarks", "csrc", "tests_vllm", "docs")) - names)
    assert not missing, f"in the tree but not in the sdist (MANIFEST.in): {missing}"
    assert not [n for n in names if n.endswith((".so", ".pyc"))]
    assert "SetuptoolsDeprecationWarning" not in log, log  # e.g. the TOML-table form of project.license


def test_sdist_metadata_declares_the_license(sdist):
    root, _, _ = sdist
    text = (root / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    meta = (root / "PKG-INFO").read_text()
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert "License-File: LICENSE" in meta.splitlines()


@pytest.mark.slow
def test_unpacked_sdist_collects_its_tests(sdist):
    """`pytest` in the unpacked sdist, on its own ptfast: every test module imports (what failed before)."""
    root, _, _ = sdist
    code = (
        "import sys, pytest, ptfast; "
        f"assert ptfast.__file__.startswith({str(root)!r}), ptfast.__file__; "
        "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests', 'benchmarks']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1], proc.stdout[-3000:]
