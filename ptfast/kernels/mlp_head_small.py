"""Layers 2 and 3 of the MLP head in one launch, for hidden sizes that fit on chip (H <= 256).

    out = relu(h1 @ w2.T + b2) @ w3.T + b3        h1 (M, H), w2 (H, H), w3 (D, H)

Grid (row blocks, column blocks of w3): every program reads h1 (M x H, from L2) and w2 (H x H, from L2 after the
first program), computes h2 in BLOCK_J chunks and immediately folds each chunk into its out tile, so h2 never
leaves the chip; column block 0 also writes h2 for the backward. Layer 2 is recomputed per column block, which is
why BLOCK_N is large (128): at the seed shape (M=20, D=1024, H=128) the 8 programs execute 1.41x the useful
multiply-adds of the whole head, and every weight byte is read from DRAM once. Layer 1 is the split-K GEMM in
``linear.py`` (one launch), so the small forward is two launches. Design notes: docs/design.md, "Kernels".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import Launch, cdiv, next_pow2

__all__ = ["head23_plan", "head23_config", "small_max_h", "SMALL_MAX_H", "BLOCK_H_CHOICES"]

SMALL_MAX_H = 256
SMALL_MAX_H_TF32X3 = 128  # the split operands of 3xTF32 spill at BLOCK_H = 256 (compile sweep, sm_80 and sm_90)
BLOCK_H_CHOICES = (16, 32, 64, 128, 256)


def small_max_h(dtype, precision: str) -> int:
    return SMALL_MAX_H_TF32X3 if (dtype == torch.float32 and precision == "tf32x3") else SMALL_MAX_H


@triton.jit
def _head23_tile(
    h1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    out_ptr,
    h2_ptr,
    M,
    D,
    H,
    pid_m,
    pid_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (BLOCK_M rows, BLOCK_N output columns) tile. All contiguous: h1/h2 (M, H), w2 (H, H), w3 (D, H),
    out (M, D). int64 per-program bases. h1 is read from L2 (``.cg``): in the one-launch forward another program
    wrote it moments ago, and a stale L1 line must never be used."""
    dt = out_ptr.dtype.element_ty
    h_lim = tl.where(pid_n == 0, H, 0)  # only column block 0 writes h2 (all blocks compute it)

    m0 = pid_m * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    m_mask = (m0 + rm) < M
    rh = tl.arange(0, BLOCK_H)
    h_mask = rh < H
    h_base = m0.to(tl.int64) * H
    h1 = tl.load(
        h1_ptr + h_base + rm[:, None] * H + rh[None, :],
        mask=m_mask[:, None] & h_mask[None, :],
        other=0.0,
        cache_modifier=".cg",
    )

    n0 = pid_n * BLOCK_N
    rn = tl.arange(0, BLOCK_N)
    n_mask = (n0 + rn) < D
    rj = tl.arange(0, BLOCK_J)
    w2_ptrs = w2_ptr + rj[None, :] * H + rh[:, None]  # (BLOCK_H, BLOCK_J) = w2.T tile
    w3_ptrs = w3_ptr + n0.to(tl.int64) * H + rn[None, :] * H + rj[:, None]  # (BLOCK_J, BLOCK_N) = w3.T tile
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, H, BLOCK_J):
        j_mask = (j0 + rj) < H
        w2t = tl.load(w2_ptrs, mask=h_mask[:, None] & j_mask[None, :], other=0.0)
        acc2 = tl.dot(h1, w2t, input_precision=PRECISION)
        b2 = tl.load(b2_ptr + j0 + rj, mask=j_mask, other=0.0).to(tl.float32)
        h2 = tl.maximum(acc2 + b2[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(dt)  # round like PyTorch
        tl.store(
            h2_ptr + h_base + j0 + rm[:, None] * H + rj[None, :],
            h2,
            mask=m_mask[:, None] & ((j0 + rj) < h_lim)[None, :],
        )
        w3t = tl.load(w3_ptrs, mask=j_mask[:, None] & n_mask[None, :], other=0.0)
        acc3 = tl.dot(h2, w3t, acc3, input_precision=PRECISION)
        w2_ptrs += BLOCK_J * H
        w3_ptrs += BLOCK_J
    b3 = tl.load(b3_ptr + n0 + rn, mask=n_mask, other=0.0).to(tl.float32)
    out = acc3 + b3[None, :]
    tl.store(
        out_ptr + m0.to(tl.int64) * D + n0 + rm[:, None] * D + rn[None, :],
        out.to(dt),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _head23_kernel(
    h1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    out_ptr,
    h2_ptr,
    M,
    D,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (row blocks, column blocks of w3)."""
    _head23_tile(
        h1_ptr,
        w2_ptr,
        b2_ptr,
        w3_ptr,
        b3_ptr,
        out_ptr,
        h2_ptr,
        M,
        D,
        H,
        tl.program_id(0),
        tl.program_id(1),
        BLOCK_M,
        BLOCK_N,
        BLOCK_H,
        BLOCK_J,
        PRECISION,
    )


def head23_config(M: int, H: int, dtype=torch.float16, precision="ieee") -> dict:
    block_h = max(16, next_pow2(H))
    # 16 rows when the 32-row tile spills (compile sweep, sm_90, unaligned "i32" variant): 3xTF32's split operands,
    # and BLOCK_H = 256 in 16-bit
    block_m = 16 if (M <= 16 or precision == "tf32x3" or block_h >= 256) else 32
    if dtype == torch.float32 and precision == "ieee":  # CUDA-core FMA dot: smaller tiles or it spills
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_H=block_h, BLOCK_J=16, num_warps=8, num_stages=2)
    # BLOCK_J = 16 where 32 leaves a spilled register (sm_90 sweep, ptxas of Triton 3.9): BLOCK_H = 256 in 16-bit,
    # and 3xTF32 at BLOCK_H = 32 (128 registers and a spill, where BLOCK_J = 16 needs 89)
    small_j = block_h >= 256 or (precision == "tf32x3" and block_h == 32)
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=128,
        BLOCK_H=block_h,
        BLOCK_J=16 if small_j else min(block_h, 32),
        num_warps=8,
        num_stages=2,
    )


def head23_plan(M, D, H, *, dtype, precision: str) -> Launch:
    cfg = dict(head23_config(M, H, dtype, precision))
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    BM, BN, BH, BJ = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_H"], cfg["BLOCK_J"]
    grid = (cdiv(M, BM), cdiv(D, BN))
    es = dtype.itemsize
    nbytes = es * (M * H + H * H + H + D * H + D + M * D + M * H)  # h1, w2, b2, w3, b3 in; out, h2 out
    jt = cdiv(H, BJ)
    macs = grid[0] * grid[1] * jt * (BM * BH * BJ + BM * BJ * BN)
    return Launch(
        "mlp_head_small._head23_kernel",
        grid,
        dict(cfg, PRECISION=precision),
        nw,
        ns,
        nbytes,
        macs,
        M * H * H + M * H * D,
        jt,
    )
