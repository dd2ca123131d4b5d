"""PyTorch's fp32 precision settings, which some tests change: how to read them all and put them all back.

They are process-wide, so a test that restores one badly changes what every later test computes. Restoring takes
care: the legacy switches (``torch.set_float32_matmul_precision``, ``torch.backends.cudnn.allow_tf32``) and the
per-backend levels (``torch.backends.<path>``) write each other, and restoring only the levels after a legacy call
leaves PyTorch in its "mix of the legacy and new APIs" state, where every later TF32 query raises. So the legacy
switches are restored first, then every level.
"""

from __future__ import annotations

import contextlib

import torch

# Every fp32 precision level (torch.backends.<path>; cudnn's are the ("cuda", conv/rnn) levels of the getter).
PRECISIONS = (
    "fp32_precision",
    "cuda.matmul.fp32_precision",
    "cudnn.fp32_precision",
    "cudnn.conv.fp32_precision",
    "cudnn.rnn.fp32_precision",
    "mkldnn.fp32_precision",
    "mkldnn.matmul.fp32_precision",
    "mkldnn.conv.fp32_precision",
    "mkldnn.rnn.fp32_precision",
)


def setting(path: str) -> tuple:
    """(owner, attribute name) of ``torch.backends.<path>``."""
    owner = torch.backends
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


def _legacy() -> tuple:
    return torch.get_float32_matmul_precision(), torch._C._get_cudnn_allow_tf32()


def read():
    """Every setting as PyTorch reports it, or the error it raises when asked."""
    try:
        return [getattr(*setting(p)) for p in PRECISIONS], torch._C._get_cublas_allow_tf32(), _legacy()
    except RuntimeError as err:
        return f"raises: {err}"


def save() -> tuple:
    """What ``restore`` puts back. The settings must be consistent: in PyTorch's mixed state nothing can be read."""
    try:
        return _legacy(), [(*setting(p), getattr(*setting(p))) for p in PRECISIONS]
    except RuntimeError as err:
        raise RuntimeError(f"PyTorch's fp32 precision settings were already mixed before this test: {err}") from err


def restore(saved: tuple) -> None:
    (matmul, cudnn_tf32), levels = saved
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    for owner, name, value in levels:
        setattr(owner, name, value)


@contextlib.contextmanager
def fp32_settings_restored():
    """Every fp32 precision setting as it was, whatever the body changes."""
    saved = save()
    try:
        yield
    finally:
        restore(saved)
