"""Shared test setup.

Without CUDA, Triton kernels run under the interpreter. TRITON_INTERPRET must be set before triton is imported
(peft and transformers import it), so it is set here, at the top of the first module pytest loads.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import settings as fp32_settings  # noqa: E402

# The backends the MLP head can run on for the CPU tensors of the cache tests: Triton needs the interpreter there
# (on a CUDA machine it is off, and the encoder's CUDA path has its own gpu tests).
BACKENDS = ["eager"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test once per MLP-head backend (``PTFAST_BACKEND``)."""
    monkeypatch.setenv("PTFAST_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """A fixed seed; afterwards, the fp32 precision settings as the test found them."""
    torch.manual_seed(0)
    before, saved = fp32_settings.read(), fp32_settings.save()
    yield
    after = fp32_settings.read()
    if after != before:  # put them back, so that this test fails and the next ones do not
        fp32_settings.restore(saved)
        pytest.fail(f"the test left PyTorch's fp32 precision settings changed: {before} -> {after}")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def native_check_module(monkeypatch):
    """The C++ extension's cache check module (``csrc/table_check.cpp``), built if needed, and made the one the
    cache uses. Where no C++ toolchain is found and not in CI, the test is skipped (ptfast then checks in Python)."""
    from ptfast import native

    monkeypatch.delenv("PTFAST_NO_NATIVE", raising=False)
    if not native.native_available():
        if os.environ.get("CI"):
            pytest.fail(f"the C++ extension must build in CI: {native.native_status()}")
        pytest.skip(f"no C++ extension here: {native.native_status()['error']}")
    module = native.table_check_module()
    assert module is not None, native.native_status()
    monkeypatch.setattr(native, "table_check_module", lambda: module)
    return module


@pytest.fixture(params=["python", "native"])
def hit_check(request, monkeypatch):
    """Runs a test once with the cache's hit check in Python only and once with the C++ one, which must decide as
    the Python reading does."""
    if request.param == "python":
        from ptfast import native

        monkeypatch.setattr(native, "table_check_module", lambda: None)
    else:
        request.getfixturevalue("native_check_module")
    return request.param
