"""Launch helpers shared by the kernel modules."""

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Make ``t``'s CUDA device current: Triton launches on the current device, not on the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
