"""Triton kernels and their launchers (no torch.nn, no autograd)."""
