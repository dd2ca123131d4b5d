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
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
