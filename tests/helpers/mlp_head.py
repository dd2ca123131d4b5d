"""Random MLP-head inputs shared by the eager, interpreter and GPU tests of fused_mlp_head."""

import torch


def mlp_head_params(M, D, H, seed=0, dtype=torch.float32, device="cpu", lead=None):
    """x (M, D) (or (*lead, D)), then w1, b1, w2, b2, w3, b3 in nn.Linear layout, scaled to keep values O(1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (M, D) if lead is None else (*lead, D)
    ps = [
        torch.randn(shape, generator=g),
        torch.randn(H, D, generator=g) / D**0.5,
        torch.randn(H, generator=g) * 0.1,
        torch.randn(H, H, generator=g) / H**0.5,
        torch.randn(H, generator=g) * 0.1,
        torch.randn(D, H, generator=g) / H**0.5,
        torch.randn(D, generator=g) * 0.1,
    ]
    return [p.to(device=device, dtype=dtype) for p in ps]
