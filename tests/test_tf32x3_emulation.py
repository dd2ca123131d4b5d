"""The numerics of precision="tf32x3" (the default for fp32 under "highest"), emulated exactly in PyTorch.

The interpreter computes every fp32 ``tl.dot`` exactly, so it cannot show what 3xTF32 does on a GPU. Triton 3.9
rewrites ``tl.dot(a, b, acc, input_precision="tf32x3")`` (TritonGPU pass F32DotTC; seen in the TTGIR of a
compile for sm_90) into

    a_big = cvt.rna.tf32(a); a_small = a - a_big;  b_big, b_small likewise
    small = dot_tf32(a_small, b_big, 0); small = dot_tf32(a_big, b_small, small); small = NaN ? 0 : small
    acc   = acc + dot_tf32(a_big, b_big, small)

where dot_tf32 is the tensor-core MMA: operands truncated to TF32 (the hardware ignores the low 13 mantissa
bits), products exact in fp32, the K=8 chunks of each mma.m16n8k8 added to an fp32 accumulator in turn. That is
what ``emulate_dot`` does (the MMA's internal rounding of each 8-term sum is modelled as one fp32 rounding of the
exact sum: NVIDIA does not document it). The test runs the whole MLP-head forward with it, at the K tiling of each
path (the three-launch large path, and the small path whose head23 kernel does layer 2 in one dot over the hidden
tile and layer 3 over BLOCK_J chunks), and asserts its error against float64 stays within 2x of PyTorch's fp32
``F.linear`` error, over seeds, odd sizes and large magnitudes. Plain TF32 through the same emulator is ~1000x
worse: the check can fail.
"""

import pytest
import torch

from ptfast.kernels.mlp_head_small import head23_config
from tests.helpers.mlp_head import mlp_head_params

_LOW13 = ~0x1FFF  # int32 mask keeping sign, exponent and the 10 TF32 mantissa bits


def rna_tf32(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero (on the magnitude bits)."""
    return ((x.view(torch.int32) + 0x1000) & _LOW13).view(torch.float32)


def trunc_tf32(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & _LOW13).view(torch.float32)


def _mma_chain(a, b, acc):
    """acc (m, n) fp32 += a (m, k) @ b (k, n) through TF32 MMAs, one K=8 chunk at a time."""
    a, b = trunc_tf32(a).double(), trunc_tf32(b).double()
    k = a.shape[1]
    chunks = torch.einsum(
        "mck,ckn->cmn",
        torch.nn.functional.pad(a, (0, -k % 8)).unflatten(1, (-1, 8)),
        torch.nn.functional.pad(b, (0, 0, 0, -k % 8)).unflatten(0, (-1, 8)),
    )  # exact 8-term sums
    for c in chunks:
        acc = (acc.double() + c).float()
    return acc


def emulate_dot(a, b, acc, precision):
    """One ``tl.dot(a, b, acc, input_precision=precision)`` for fp32 a (m, k), b (k, n)."""
    zero = torch.zeros(a.shape[0], b.shape[1])
    if precision == "tf32":
        return acc + _mma_chain(a, b, zero)
    a_big, b_big = rna_tf32(a), rna_tf32(b)
    a_small, b_small = a - a_big, b - b_big
    small = _mma_chain(a_big, b_small, _mma_chain(a_small, b_big, zero))
    small = torch.where(torch.isnan(small), zero, small)
    return acc + _mma_chain(a_big, b_big, small)


def emulate_linear(x, w, b, relu, precision, block_k=32, split=1):
    """``_linear_kernel`` on fp32: K tiles of block_k per split, splits summed in order, then the epilogue."""
    K = x.shape[1]
    per = -(-K // block_k // split) * block_k
    parts = []
    for k_start in range(0, K, per):
        acc = torch.zeros(x.shape[0], w.shape[0])
        for k0 in range(k_start, min(k_start + per, K), block_k):
            acc = emulate_dot(x[:, k0 : k0 + block_k], w[:, k0 : k0 + block_k].T, acc, precision)
        parts.append(acc)
    acc = parts[0]
    for p in parts[1:]:
        acc = acc + p
    acc = acc + b
    return torch.relu(acc) if relu else acc


def emulate_head(x, w1, b1, w2, b2, w3, b3, precision, path="large", split=4):
    """Large path: three ``_linear_kernel`` launches. Small path: layer 1 the same, then ``_head23_kernel``: layer 2
    in one dot over the whole hidden tile (K = BLOCK_H), layer 3 summed over BLOCK_J chunks of layer 2's output."""
    h = emulate_linear(x, w1, b1, True, precision, split=split)
    if path == "large":
        h = emulate_linear(h, w2, b2, True, precision)
        return emulate_linear(h, w3, b3, False, precision)
    cfg = head23_config(x.shape[0], w2.shape[0], torch.float32, precision)
    h = emulate_linear(h, w2, b2, True, precision, block_k=cfg["BLOCK_H"])
    return emulate_linear(h, w3, b3, False, precision, block_k=cfg["BLOCK_J"])


def _errors(M, D, H, seed, scale, precision, path="large"):
    p = mlp_head_params(M, D, H, seed=seed)
    p[0] = p[0] * scale
    ref = torch.nn.functional.linear
    r = [t.double() for t in p]
    exact = ref(torch.relu(ref(torch.relu(ref(r[0], r[1], r[2])), r[3], r[4])), r[5], r[6])
    torch_fp32 = ref(torch.relu(ref(torch.relu(ref(p[0], p[1], p[2])), p[3], p[4])), p[5], p[6])
    emu = emulate_head(*p, precision=precision, path=path)
    return (emu.double() - exact).abs().max().item(), (torch_fp32.double() - exact).abs().max().item()


@pytest.mark.parametrize(
    "M,D,H,path",
    [
        (20, 1000, 129, "large"),
        (33, 777, 64, "large"),
        (33, 777, 64, "small"),
        (20, 1000, 29, "small"),
        (7, 300, 127, "small"),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["x1", "x1e4"])
def test_tf32x3_error_within_2x_of_fp32(M, D, H, path, scale):
    worst = 0.0
    for seed in range(4):
        err, err_fp32 = _errors(M, D, H, seed, scale, "tf32x3", path)
        worst = max(worst, err / err_fp32)
        assert err <= 2 * err_fp32, f"seed {seed}: tf32x3 {err:.3e} vs fp32 {err_fp32:.3e}"
    print(f"worst tf32x3/fp32 error ratio {worst:.2f}")


@pytest.mark.parametrize("H,path", [(129, "large"), (29, "small")])
def test_plain_tf32_fails_the_same_check(H, path):
    err, err_fp32 = _errors(20, 1000, H, 0, 1.0, "tf32", path)
    assert err > 50 * err_fp32


def test_rounding_helpers():
    x = torch.tensor([1.0 + 2**-11, 1.0 + 2**-11 + 2**-20, -(1.0 + 2**-11), 1.0 + 2**-12], dtype=torch.float32)
    assert rna_tf32(x).tolist() == [1.0 + 2**-10, 1.0 + 2**-10, -(1.0 + 2**-10), 1.0]  # ties away from zero
    assert trunc_tf32(x).tolist() == [1.0, 1.0, -1.0, 1.0]
