"""Weight-streaming GEMM with a fused epilogue and in-kernel deterministic split-K, and the weight-gradient GEMM.

    _linear_kernel: C[m, n] = epilogue(sum_k A[m, k] * W'[n, k])   W' = W (N, K), or W.T for W (K, N) (W_T)
    _bwd_kernel:    one backward layer in one launch: C = mask(G @ W) tiles, then dW = G.T @ act, db = sum_m G tiles

Few tokens (M <= ~200) against large weights: the weight rows are the MMA's M dimension, the tokens its N.
Split-K without an epilogue launch: each split stores its fp32 partial, takes a ticket from a per-tile counter
(``atomic_add``, acq_rel, gpu scope, after a CTA barrier), and the program that draws the last ticket sums the
partials in the fixed order s = 0..S-1 (bit-identical results whichever program finishes last), applies the
epilogue and resets the counter. Design notes: docs/design.md, "Kernels".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env
from . import common
from .common import Epilogue, Launch, cdiv, num_sms, split_counters

__all__ = [
    "linear",
    "linear_plan",
    "linear_dw_plan",
    "dw_plan",
    "linear_config",
    "dw_config",
    "split_k",
    "split_args",
]


@triton.jit
def _tanh(x):
    """tanh in fp32 within ~2 ulp, NaN kept, on every backend (the interpreter has no libdevice): the odd Taylor
    series below |x| = 1/4, where 1 - exp(-2|x|) would cancel; sign(x) (1 - e) / (1 + e), e = exp(-2|x|), above."""
    a = tl.abs(x)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.25, series, tl.where(x < 0, -t, t))


@triton.jit
def _epilogue(
    acc,
    bias_ptr,
    ref_ptr,
    c_ptr,
    n0,
    rn,
    n_mask,
    c_base,
    c_off,
    out_mask,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TANH: tl.constexpr,
    TANH_GRAD: tl.constexpr,
):
    if HAS_BIAS:
        b = tl.load(bias_ptr + n0 + rn, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + b[:, None]
    if RELU:  # propagate_nan: torch.relu keeps NaN; fmax would hide an overflow
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if HAS_MASK:  # threshold_backward: zero where ref <= 0; a NaN ref passes the gradient
        r = tl.load(ref_ptr + c_base + c_off, mask=out_mask, other=1.0)
        acc = tl.where(r <= 0, 0.0, acc)
    if TANH:
        acc = _tanh(acc)
    if TANH_GRAD:  # tanh_backward: grad * (1 - y^2), y the saved (rounded) output, as PyTorch computes it
        r = tl.load(ref_ptr + c_base + c_off, mask=out_mask, other=0.0).to(tl.float32)
        acc = acc * (1.0 - r * r)
    tl.store(c_ptr + c_base + c_off, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _linear_tile(
    a_ptr,
    w_ptr,
    bias_ptr,
    ref_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    N_SPLIT,
    pid_n,
    pid_m,
    pid_k,
    grid_n,
    W_T: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TANH: tl.constexpr,
    TANH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (BLOCK_N weight rows x BLOCK_M tokens, K split pid_k) tile: acc = W' @ A.T. A (M, K), C (M, N)
    contiguous; W (N, K) or, with W_T, (K, N) contiguous. int64 per-program bases, int32 in-tile offsets."""
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    rn = tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = (n0 + rn) < N
    m_mask = (m0 + rm) < M

    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    if W_T:
        w_ptrs = w_ptr + k_start.to(tl.int64) * N + n0 + rk[None, :] * N + rn[:, None]
        w_step = BLOCK_K * N
    else:
        w_ptrs = w_ptr + n0.to(tl.int64) * K + k_start + rn[:, None] * K + rk[None, :]
        w_step = BLOCK_K
    a_ptrs = a_ptr + m0.to(tl.int64) * K + k_start + rm[None, :] * K + rk[:, None]  # (BLOCK_K, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + rk) < k_end
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        acc = tl.dot(w, at, acc, input_precision=PRECISION)
        w_ptrs += w_step
        a_ptrs += BLOCK_K

    out_mask = n_mask[:, None] & m_mask[None, :]
    c_off = rm[None, :] * N + rn[:, None]
    c_base = m0.to(tl.int64) * N + n0
    if N_SPLIT > 1:  # a runtime branch: one binary serves both cases
        mn = M.to(tl.int64) * N
        tl.store(ws_ptr + pid_k * mn + c_base + c_off, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the (single-thread) release below
        tile = pid_m * grid_n + pid_n
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == N_SPLIT - 1:  # last to arrive: all partials are visible (acquire); sum them in fixed order
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            p = ws_ptr + c_base + c_off
            for s in range(0, N_SPLIT):
                acc += tl.load(p, mask=out_mask, other=0.0, cache_modifier=".cg")  # L2, never a stale L1 line
                p += mn
            _epilogue(
                acc,
                bias_ptr,
                ref_ptr,
                c_ptr,
                n0,
                rn,
                n_mask,
                c_base,
                c_off,
                out_mask,
                HAS_BIAS,
                RELU,
                HAS_MASK,
                TANH,
                TANH_GRAD,
            )
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    else:
        _epilogue(
            acc,
            bias_ptr,
            ref_ptr,
            c_ptr,
            n0,
            rn,
            n_mask,
            c_base,
            c_off,
            out_mask,
            HAS_BIAS,
            RELU,
            HAS_MASK,
            TANH,
            TANH_GRAD,
        )


# N_SPLIT == 1 must not build a second binary; M == 1 must stay a tensor (Triton 3.6 made a specialized 1 a Python
# int, and `M.to` failed to compile)
@triton.jit(do_not_specialize=["N_SPLIT", "M"])
def _linear_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    ref_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    N_SPLIT,
    W_T: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TANH: tl.constexpr,
    TANH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """C = epilogue(A @ W'); grid (N tiles, M tiles, K splits)."""
    _linear_tile(
        a_ptr,
        w_ptr,
        bias_ptr,
        ref_ptr,
        c_ptr,
        ws_ptr,
        cnt_ptr,
        M,
        N,
        K,
        K_PER_SPLIT,
        N_SPLIT,
        tl.program_id(0),
        tl.program_id(1),
        tl.program_id(2),
        tl.num_programs(0),
        W_T,
        HAS_BIAS,
        RELU,
        HAS_MASK,
        TANH,
        TANH_GRAD,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        PRECISION,
    )


@triton.jit
def _dw_tile(
    g_ptr,
    a_ptr,
    dw_ptr,
    db_ptr,
    M,
    N,
    K,
    pid_n,
    pid_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """G (M, N), A (M, K), dW (N, K) contiguous; tiles with pid_k == 0 also write db. M is the loop."""
    n0 = pid_n * BLOCK_N
    k0 = pid_k * BLOCK_K
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    n_mask = (n0 + rn) < N
    k_mask = (k0 + rk) < K
    g_ptrs = g_ptr + n0 + rm[None, :] * N + rn[:, None]  # (BLOCK_N, BLOCK_M) = G.T tile
    a_ptrs = a_ptr + k0 + rm[:, None] * K + rk[None, :]  # (BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_mask = (m0 + rm) < M
        gt = tl.load(g_ptrs, mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(gt, a, acc, input_precision=PRECISION)
        dbacc += tl.sum(gt.to(tl.float32), axis=1)
        g_ptrs += BLOCK_M * N
        a_ptrs += BLOCK_M * K
    dw_ptrs = dw_ptr + n0.to(tl.int64) * K + k0 + rn[:, None] * K + rk[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
    tl.store(db_ptr + n0 + rn, dbacc.to(db_ptr.dtype.element_ty), mask=(n0 + rn) < tl.where(pid_k == 0, N, 0))


@triton.jit
def _bwd_layer_tile(
    t,
    g_ptr,
    w_ptr,
    act_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    dw_ptr,
    db_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    N_SPLIT,
    GRID_N,
    GRID_M,
    DW_GRID_N,
    HAS_MASK: tl.constexpr,
    TANH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr,
    DW_BLOCK_N: tl.constexpr,
    DW_BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile ``t`` of one backward layer. The first GRID_N * GRID_M * N_SPLIT tiles compute
    C (M, N) = mask(G (M, K) @ W (K, N), act) (split-K as in _linear_kernel), the others
    dW (K, N) = G.T @ act and db (K) = sum_m G: both read G, and act is both the mask and dW's operand."""
    n_lin = GRID_N * GRID_M * N_SPLIT
    if t < n_lin:
        _linear_tile(
            g_ptr,
            w_ptr,
            g_ptr,
            act_ptr,
            c_ptr,
            ws_ptr,
            cnt_ptr,
            M,
            N,
            K,
            K_PER_SPLIT,
            N_SPLIT,
            t % GRID_N,
            (t // GRID_N) % GRID_M,
            t // (GRID_N * GRID_M),
            GRID_N,
            True,
            False,
            False,
            HAS_MASK,
            False,
            TANH_GRAD,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            PRECISION,
        )
    else:
        q = t - n_lin
        _dw_tile(
            g_ptr,
            act_ptr,
            dw_ptr,
            db_ptr,
            M,
            K,
            N,
            q % DW_GRID_N,
            q // DW_GRID_N,
            DW_BLOCK_M,
            DW_BLOCK_N,
            DW_BLOCK_K,
            PRECISION,
        )


@triton.jit(do_not_specialize=["N_SPLIT", "M"])
def _bwd_kernel(
    g_ptr,
    w_ptr,
    act_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    dw_ptr,
    db_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    N_SPLIT,
    GRID_N,
    GRID_M,
    DW_GRID_N,
    HAS_MASK: tl.constexpr,
    TANH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr,
    DW_BLOCK_N: tl.constexpr,
    DW_BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One backward layer in one launch: one program per tile of ``_bwd_layer_tile``."""
    _bwd_layer_tile(
        tl.program_id(0),
        g_ptr,
        w_ptr,
        act_ptr,
        c_ptr,
        ws_ptr,
        cnt_ptr,
        dw_ptr,
        db_ptr,
        M,
        N,
        K,
        K_PER_SPLIT,
        N_SPLIT,
        GRID_N,
        GRID_M,
        DW_GRID_N,
        HAS_MASK,
        TANH_GRAD,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        DW_BLOCK_M,
        DW_BLOCK_N,
        DW_BLOCK_K,
        PRECISION,
    )


# ------------------------------------------------------------------------------------------------ configs
# No autotuning: every value these return is compiled by tests/helpers/triton_compile.py and audited.

BLOCK_M_CHOICES = (16, 32, 64)
MIN_K_ITERS = 2  # per split: at least two K tiles, so the pipeline has more than one tile in flight
MAX_SPLIT = 32


def _fma_dot(dtype, precision) -> bool:
    """fp32 with input_precision="ieee" is a CUDA-core FMA dot: short BLOCK_K, or it spills."""
    return dtype == torch.float32 and precision == "ieee"


def linear_config(M: int, dtype=torch.float16, precision="ieee") -> dict:
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if _fma_dot(dtype, precision):
        return dict(
            BLOCK_M=block_m,
            BLOCK_N=64,
            BLOCK_K=16 if block_m >= 64 else 32,
            num_warps=4 if block_m <= 16 else 8,
            num_stages=3,
        )
    if dtype == torch.float32:  # tf32 / tf32x3 tensor cores: 32-wide fp32 K tiles (same bytes as bf16's 64)
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, num_warps=4 if block_m <= 32 else 8, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, num_warps=4 if block_m <= 32 else 8, num_stages=4)


def dw_config(dtype=torch.float16, precision="ieee") -> dict:
    if _fma_dot(dtype, precision):
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def split_k(n_tiles: int, K: int, block_k: int, sms: int) -> int:
    """Splits of K so that tiles x splits fills about two waves of SMs, each split >= MIN_K_ITERS tiles long."""
    k_blocks = cdiv(K, block_k)
    forced = _env.mlp_head_forced_split_k()
    if forced:
        split = max(1, min(forced, k_blocks))
    else:
        split = max(1, min((2 * sms) // max(n_tiles, 1), k_blocks // MIN_K_ITERS, MAX_SPLIT))
    if split > 1:  # no empty splits
        split = cdiv(k_blocks, cdiv(k_blocks, split))
    return split


# ------------------------------------------------------------------------------------------------ plans
def linear_plan(M, N, K, *, w_t: bool, epilogue: Epilogue, dtype, precision: str, sms: int = 132) -> Launch:
    cfg = linear_config(M, dtype, precision)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    n_tiles = cdiv(N, BN) * cdiv(M, BM)
    split = split_k(n_tiles, K, BK, sms)
    k_per_split = cdiv(cdiv(K, BK), split) * BK
    grid = (cdiv(N, BN), cdiv(M, BM), split)
    es = dtype.itemsize
    # A is reread by every weight-row tile, from L2 (it is M x K, tiny next to W): counted once
    nbytes = es * (N * K + M * K + M * N * (2 if epilogue.mask else 1) + (N if epilogue.bias else 0))
    if split > 1:
        nbytes += 4 * split * M * N  # fp32 partials written back to DRAM eventually; the reducer reads them from L2
    constexprs = dict(
        W_T=w_t,
        HAS_BIAS=epilogue.bias,
        RELU=epilogue.relu,
        HAS_MASK=epilogue.mask,
        TANH=epilogue.tanh,
        TANH_GRAD=epilogue.tanh_grad,
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_K=BK,
        PRECISION=precision,
    )
    macs = grid[0] * grid[1] * BN * BM * split * k_per_split
    return Launch(
        "linear._linear_kernel",
        grid,
        constexprs,
        cfg["num_warps"],
        cfg["num_stages"],
        nbytes,
        macs,
        M * N * K,
        k_per_split // BK,
    )


def dw_plan(M, N, K, *, dtype, precision: str) -> Launch:
    """The dW (N, K) = G.T @ A tiles of ``_bwd_kernel`` (a part of ``linear_dw_plan``)."""
    cfg = dw_config(dtype, precision)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (cdiv(N, BN), cdiv(K, BK))
    es = dtype.itemsize
    nbytes = es * (M * N + M * K + N * K + N)  # G and A rereads hit L2
    constexprs = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PRECISION=precision)
    macs = grid[0] * grid[1] * BN * BK * cdiv(M, BM) * BM
    return Launch(
        "linear._dw_tile", grid, constexprs, cfg["num_warps"], cfg["num_stages"], nbytes, macs, M * N * K, cdiv(M, BM)
    )


def linear_dw_plan(M, N, K, *, mask: bool, dtype, precision: str, sms: int = 132, tanh_grad: bool = False) -> Launch:
    """``_bwd_kernel``: the ``_linear_kernel`` tiles of C = mask(G @ W) (or, with ``tanh_grad``, (G @ W) * (1 - act^2))
    then the ``_dw_tile`` tiles of dW = G.T @ act, in one 1-D grid (warps and stages of the GEMM's config). ``parts``
    holds the two plans, for the cost model."""
    epilogue = Epilogue(mask=mask, tanh_grad=tanh_grad)
    lin = linear_plan(M, N, K, w_t=True, epilogue=epilogue, dtype=dtype, precision=precision, sms=sms)
    dwp = dw_plan(M, K, N, dtype=dtype, precision=precision)
    lc, dc = lin.constexprs, dwp.constexprs
    constexprs = dict(
        HAS_MASK=mask,
        TANH_GRAD=tanh_grad,
        BLOCK_M=lc["BLOCK_M"],
        BLOCK_N=lc["BLOCK_N"],
        BLOCK_K=lc["BLOCK_K"],
        DW_BLOCK_M=dc["BLOCK_M"],
        DW_BLOCK_N=dc["BLOCK_N"],
        DW_BLOCK_K=dc["BLOCK_K"],
        PRECISION=precision,
    )
    es = dtype.itemsize
    nbytes = lin.hbm_bytes + dwp.hbm_bytes - es * (M * K + (M * N if mask or tanh_grad else 0))  # G, act read once
    return Launch(
        "linear._bwd_kernel",
        (lin.ctas + dwp.ctas,),
        constexprs,
        lin.num_warps,
        lin.num_stages,
        nbytes,
        lin.macs + dwp.macs,
        lin.useful_macs + dwp.useful_macs,
        lin.iters,
        (lin, dwp),
    )


def split_args(plan: Launch, K: int):
    """(K per split, splits) of a ``linear_plan`` over a reduction of length ``K``: K_PER_SPLIT and N_SPLIT."""
    split = plan.grid[2]
    block_k = plan.constexprs["BLOCK_K"]
    return cdiv(cdiv(K, block_k), split) * block_k, split


# ------------------------------------------------------------------------------------------------ launchers
def linear(a, w, *, bias=None, relu=False, precision: str, out_dtype):
    """C (M, N) = relu?(a @ w.T + bias) for a (M, K), w (N, K): a forward layer. (The W_T and mask variants of the
    tile serve the backward, through ``_bwd_kernel``.)"""
    M, K = a.shape
    N = w.shape[0]
    c = common.alloc((M, N), out_dtype, a.device)
    if M == 0:
        return c
    epi = Epilogue(bias=bias is not None, relu=relu)
    plan = linear_plan(M, N, K, w_t=False, epilogue=epi, dtype=a.dtype, precision=precision, sms=num_sms(a.device))
    split = plan.grid[2]
    cnt = split_counters(a.device, plan.grid[0] * plan.grid[1])  # int32 either way: one binary per config
    ws = common.alloc((split, M, N), torch.float32, a.device) if split > 1 else cnt.view(torch.float32)
    k_per_split = cdiv(cdiv(K, plan.constexprs["BLOCK_K"]), split) * plan.constexprs["BLOCK_K"]
    _linear_kernel[plan.grid](
        a,
        w,
        bias if bias is not None else c,
        c,
        c,
        ws,
        cnt,
        M,
        N,
        K,
        k_per_split,
        split,
        **plan.constexprs,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return c
