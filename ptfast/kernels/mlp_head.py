"""Triton kernels (and their launchers) for the P-tuning MLP head.

    out = relu(relu(x @ w1.T + b1) @ w2.T + b2) @ w3.T + b3        x: (M, D), w1: (H, D), w2: (H, H), w3: (D, H)

No ``torch.nn`` and no autograd here: ``ptfast/ops/mlp_head.py`` owns validation, backend choice, the
autograd wiring and the ``torch.library`` registration. Launchers expect validated, same-device,
same-dtype tensors (fp32 / fp16 / bf16); every ``tl.dot`` accumulates in fp32 and receives the caller's
``input_precision`` explicitly ("ieee" = PyTorch's fp32 default, "tf32" = faster, less accurate; for
fp16/bf16 operands Triton ignores it).

Honesty note: none of this has been timed on a GPU. Everything below about speed is *reasoned*
(bytes moved, launch counts, SM occupancy), not measured. What *has* been checked: numerics under
``TRITON_INTERPRET=1`` on CPU, and that every selectable kernel/config compiles for sm_80 and sm_90
without register spills and within the shared-memory limit (tests/helpers/triton_compile.py, driven by
tests/test_mlp_head.py).

Design
------
Working shapes: M (virtual tokens) 10..200, D 768..8192, H 128..D.

*Small-weight path* (``_fused_small_fwd_kernel``; chosen when H <= 256 and one copy of w1 is
<= 1 MiB, e.g. the seed shape M=20, D=1024, H=128): the whole forward is ONE launch. The grid is
(row blocks, output-column blocks of w3). Every program recomputes h1 = relu(x @ w1.T + b1) for its
row block (held in registers, BLOCK_H = next_pow2(H) columns), then walks H in BLOCK_J chunks:
h2_j = relu(h1 @ w2[j].T + b2[j]) and immediately acc += h2_j @ w3[n, j].T, so h2 never leaves the
chip either. The redundant work is the point: with M=20 a single program would occupy one SM, while
D/BLOCK_N programs that each redo the tiny layers 1-2 (20x1024x128 + 20x128x128 MACs) spread the w3
stream over D/BLOCK_N SMs in one launch. The cost is that each program streams all of w1 (and w2)
from L2; that is why the path is capped at |w1| <= 1 MiB (at roughly 100-200 GB/s of L2 bandwidth
per SM this is a few microseconds, comparable to the 3+ launches of the large path). Program
(row block, column block 0) also writes h1 and h2 (M x H each, tiny) for the backward pass.

*Large-weight path* (``_ws_linear_kernel`` once per layer, e.g. D = H = 4096, 201 MB in fp32):
bandwidth-bound on the weight stream, so the kernel is a weight-streaming GEMV-like GEMM: operands
are swapped so that weight rows form the MMA's M dimension (BLOCK_N = 64) and the few tokens, padded
to BLOCK_M in {16, 32, 64}, form its N dimension. When (weight-row tiles x token tiles) is below
~2x the SM count the K dimension is split (SPLIT_K <= 16, >= 4 K-blocks per split). Split-K is
DETERMINISTIC: each split writes its fp32 partial tile into a workspace (SPLIT_K, M, N) and a tiny
second kernel (``_splitk_epilogue_kernel``) sums the splits in a fixed order and applies
bias + ReLU (+ the backward ReLU mask) + the dtype cast. Without split-K the epilogue is fused.
So a large forward is 3 launches (up to 6 with split-K). No grid barriers / cooperative launches.

*Backward* (both paths): with dY (M, D) and the saved activations h1, h2 (M, H):
    g3 = dY;  dw3 = g3.T @ h2, db3 = sum_m g3;  g2 = (g3 @ w3) * (h2 > 0)
    dw2 = g2.T @ h1, db2 = sum_m g2;  g1 = (g2 @ w2) * (h1 > 0)
    dw1 = g1.T @ x,  db1 = sum_m g1;  dx = g1 @ w1
The g = dY @ W products reuse ``_ws_linear_kernel`` (W read through strides, i.e. transposed for
free) with the "multiply by (ref > 0)" epilogue. dW = G.T @ A is a reduction over the few M rows:
``_dw_kernel`` tiles the weight gradient (64 x 64), loops over M inside, writes every dW element
exactly once (weight-sized write, the unavoidable cost) and also produces db from the programs of
the first K-tile column. 3 dW launches + 3 (or up to 6) g/dx launches.

ReLU masks: h1 and h2 (post-ReLU activations) are SAVED, not recomputed. They are needed anyway
for dw2 / dw3, they are M x H elements each (20 x 128 x 4 B = 10 KB at the seed shape, <= 3.2 MB at
M=200, H=4096) against weight streams of 0.5-200 MB, and recomputing them would mean re-streaming
w1 and w2 in the backward. The mask is (h > 0), identical to PyTorch's ReLU backward.

GPU constraints observed: every ``tl.dot`` operand block is >= 16 in each dimension; weight offsets
are computed in int64; every load/store is masked on every edge (non-power-of-two D, H, M).
Configs are chosen by a heuristic (no autotuning), so the compile test can enumerate them all:
see ``small_fwd_config``, ``ws_config``, ``dw_config`` and ``epilogue_config``.

Test/debug knobs (read at call time): ``PTFAST_MLP_HEAD_PATH=small|large`` forces a forward path,
``PTFAST_MLP_HEAD_SPLIT_K=<int>`` forces the split-K factor of every ``_ws_linear_kernel`` launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env
from ._device import on_device

__all__ = [
    "mlp_head_forward",
    "mlp_head_backward",
    "use_small_path",
    "small_fwd_config",
    "ws_config",
    "dw_config",
    "epilogue_config",
]

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fused_small_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr,
    out_ptr, h1_ptr, h2_ptr,
    M, D, H,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
):
    # All tensors contiguous: x/out (M, D), w1 (H, D), w2 (H, H), w3 (D, H), h1/h2 (M, H).
    # int32 in-tile offsets (< max(M, H, BLOCK_N) * max(D, H)) on int64 per-program bases.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dt = out_ptr.dtype.element_ty
    h_lim = tl.where(pid_n == 0, H, 0)  # only column block 0 writes h1/h2 (all blocks compute them)

    m0 = pid_m * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    m_mask = (m0 + rm) < M
    rh = tl.arange(0, BLOCK_H)
    h_mask = rh < H
    rk = tl.arange(0, BLOCK_K)

    # ---- layer 1: h1 = relu(x @ w1.T + b1), (BLOCK_M, BLOCK_H), kept on chip ----
    x_ptrs = x_ptr + m0.to(tl.int64) * D + rm[:, None] * D + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w1_ptrs = w1_ptr + rh[None, :] * D + rk[:, None]  # (BLOCK_K, BLOCK_H) = w1.T tile
    acc1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = (k0 + rk) < D
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w1t = tl.load(w1_ptrs, mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        acc1 = tl.dot(xt, w1t, acc1, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w1_ptrs += BLOCK_K
    b1 = tl.load(b1_ptr + rh, mask=h_mask, other=0.0).to(tl.float32)
    # propagate_nan: torch.relu keeps NaN, plain max (fmax) would turn it into 0 and hide it
    h1 = tl.maximum(acc1 + b1[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(dt)  # round like PyTorch
    h_base = m0.to(tl.int64) * H
    tl.store(h1_ptr + h_base + rm[:, None] * H + rh[None, :], h1,
             mask=m_mask[:, None] & (rh < h_lim)[None, :])

    # ---- layers 2+3 fused over BLOCK_J chunks of H ----
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
        h2 = tl.maximum(acc2 + b2[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(dt)
        tl.store(h2_ptr + h_base + j0 + rm[:, None] * H + rj[None, :], h2,
                 mask=m_mask[:, None] & ((j0 + rj) < h_lim)[None, :])
        w3t = tl.load(w3_ptrs, mask=j_mask[:, None] & n_mask[None, :], other=0.0)
        acc3 = tl.dot(h2, w3t, acc3, input_precision=PRECISION)
        w2_ptrs += BLOCK_J * H
        w3_ptrs += BLOCK_J
    b3 = tl.load(b3_ptr + n0 + rn, mask=n_mask, other=0.0).to(tl.float32)
    out = acc3 + b3[None, :]
    tl.store(out_ptr + m0.to(tl.int64) * D + n0 + rm[:, None] * D + rn[None, :], out.to(dt),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _ws_linear_kernel(
    a_ptr, w_ptr, bias_ptr, ref_ptr, c_ptr, ws_ptr,
    M, N, K, K_PER_SPLIT,
    W_T: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_REF: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """C[m, n] = epi(sum_k A[m, k] * W'[n, k]); A (M, K) and C (M, N) contiguous.
    W' = W with W (N, K) contiguous (W_T=False, forward: x @ W.T), or W' = W.T with W (K, N)
    contiguous (W_T=True, backward: dY @ W).

    Weight-streaming: the tile is (BLOCK_N weight rows) x (BLOCK_M tokens), i.e. the MMA computes
    C.T = W' @ A.T. epi = (+ bias[n]) (relu) (* (ref[m, n] > 0)). With SPLIT, the raw fp32 partial of
    K range [pid_k * K_PER_SPLIT, +K_PER_SPLIT) goes to ws[pid_k, m, n] and the epilogue runs later.
    Offsets: int64 scalar bases per program + int32 in-tile offsets (< BLOCK * max(K, N) < 2**31).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)

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
        w_base = w_ptr + k_start.to(tl.int64) * N + n0
        w_ptrs = w_base + rk[None, :] * N + rn[:, None]
        w_step = BLOCK_K * N
    else:
        w_base = w_ptr + n0.to(tl.int64) * K + k_start
        w_ptrs = w_base + rn[:, None] * K + rk[None, :]
        w_step = BLOCK_K
    a_ptrs = a_ptr + m0.to(tl.int64) * K + k_start + rm[None, :] * K + rk[:, None]  # (BLOCK_K, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + rk) < k_end
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        at = tl.load(a_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_M)
        acc = tl.dot(w, at, acc, input_precision=PRECISION)
        w_ptrs += w_step
        a_ptrs += BLOCK_K

    out_mask = n_mask[:, None] & m_mask[None, :]
    c_off = rm[None, :] * N + rn[:, None]
    c_base = m0.to(tl.int64) * N + n0
    if SPLIT:
        tl.store(ws_ptr + (pid_k.to(tl.int64) * M * N + c_base) + c_off, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            b = tl.load(bias_ptr + n0 + rn, mask=n_mask, other=0.0).to(tl.float32)
            acc = acc + b[:, None]
        if RELU:
            acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if HAS_REF:
            r = tl.load(ref_ptr + c_base + c_off, mask=out_mask, other=0.0)
            acc = tl.where(r > 0, acc, 0.0)
        tl.store(c_ptr + c_base + c_off, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, bias_ptr, ref_ptr, c_ptr,
    TOTAL, N, SPLIT_K,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    """Deterministic split-K reduction (fixed order s = 0..SPLIT_K-1) + fused epilogue.
    TOTAL = M * N elements of the (M, N) output; ws is (SPLIT_K, M, N)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = TOTAL
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + offs  # stepped as a pointer: s * TOTAL could overflow int32
    for s in range(0, SPLIT_K):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += total
    if HAS_BIAS:
        n = offs % N
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if HAS_REF:
        r = tl.load(ref_ptr + offs, mask=mask, other=0.0)
        acc = tl.where(r > 0, acc, 0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_kernel(
    g_ptr, a_ptr, dw_ptr, db_ptr,
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[n, k] = sum_m G[m, n] * A[m, k]  (G (M, N), A (M, K), dW (N, K), all contiguous);
    programs with pid_k == 0 also write db[n] = sum_m G[m, n]. M (tokens) is the reduction loop."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
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


# ------------------------------------------------------------------------------------------------
# Config heuristics (no autotuning: the compile test enumerates every value these can return)
# ------------------------------------------------------------------------------------------------

SMALL_MAX_H = 256
SMALL_MAX_W1_BYTES = 1 << 20


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def use_small_path(D: int, H: int, elem_size: int) -> bool:
    """Single-launch fused forward when H fits on chip and every program can afford to stream w1."""
    return H <= SMALL_MAX_H and H * D * elem_size <= SMALL_MAX_W1_BYTES


def small_fwd_config(H: int, dtype=torch.float16, precision="ieee") -> dict:
    # Picked from a register/spill sweep of compiles for sm_80/sm_90 (not from timings): BLOCK_M=16
    # and 8 warps keep h1 (16 x BLOCK_H fp32) plus the dot operands under 255 registers; the
    # fp32 "ieee" FMA dot with BLOCK_H >= 64 additionally needs BLOCK_K=16.
    block_h = max(16, _next_pow2(H))
    # why >= 64 (was >= 256): with D/H divisible by 16 (tt.divisibility), BK=32 spills/uses stack at BH=64 (sm_90) and BH=128 (sm_80)
    block_k = 16 if (_fma_dot(dtype, precision) and block_h >= 64) else 32
    return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, BLOCK_H=block_h, BLOCK_J=min(block_h, 32),
                num_warps=8, num_stages=2)


SMALL_BLOCK_H_CHOICES = (16, 32, 64, 128, 256)


def _fma_dot(dtype, precision) -> bool:
    """fp32 with input_precision="ieee" is a CUDA-core FMA dot (no tensor cores): it keeps whole
    operand slices in registers, so it needs a short BLOCK_K to avoid spills."""
    return dtype == torch.float32 and precision == "ieee"


def ws_config(M: int, dtype=torch.float16, precision="ieee") -> dict:
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if _fma_dot(dtype, precision):
        # why BK=16 at BLOCK_M=64: BK=32 uses stack/spills there with N/K divisible by 16 (sm_80 and sm_90, W_T variants)
        block_k = 16 if block_m >= 64 else 32
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, num_warps=4 if block_m <= 16 else 8, num_stages=3)
    # tensor-core dot: 4 warps spill at BLOCK_M=64 on sm_80/sm_90 (compile sweep), 8 do not
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, num_warps=4 if block_m <= 32 else 8, num_stages=3)


WS_BLOCK_M_CHOICES = (16, 32, 64)
# (W_T, HAS_BIAS, RELU, HAS_REF, SPLIT) combinations the launchers use.
WS_EPILOGUES = (
    (False, True, True, False, False),    # forward hidden layer
    (False, True, False, False, False),   # forward output layer
    (False, False, False, False, True),   # forward split-K partial
    (True, False, False, True, False),    # backward g = (dY @ W) * (h > 0)
    (True, False, False, False, False),   # backward dx = g1 @ w1
    (True, False, False, False, True),    # backward split-K partial
)
EPI_VARIANTS = (
    (True, True, False),
    (True, False, False),
    (False, False, True),
    (False, False, False),
)


def epilogue_config() -> dict:
    return dict(BLOCK=1024, num_warps=4, num_stages=1)


def dw_config(dtype=torch.float16, precision="ieee") -> dict:
    if _fma_dot(dtype, precision):
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100; only matters for the interpreter


def _split_k(n_tiles: int, K: int, block_k: int, device: torch.device) -> int:
    forced = _env.mlp_head_forced_split_k()
    k_blocks = triton.cdiv(K, block_k)
    if forced:
        split = max(1, min(forced, k_blocks))
    else:
        target = 2 * _num_sms(device)
        split = max(1, min(target // max(n_tiles, 1), k_blocks // 4, 16))
    if split > 1:  # no empty splits
        per = triton.cdiv(k_blocks, split)
        split = triton.cdiv(k_blocks, per)
    return split


def _alloc(shape, dtype, device):
    """Every output/workspace allocation goes through here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _linear_ws(a, w, w_is_nk, bias, relu, ref, precision, out_dtype):
    """C (M, N) = epi(A @ W') where W' = w.T if w_is_nk (w is (N, K)) else w (w is (K, N))."""
    M, K = a.shape
    N = w.shape[0] if w_is_nk else w.shape[1]
    c = _alloc((M, N), out_dtype, a.device)
    if M == 0:
        return c
    cfg = ws_config(M, a.dtype, precision)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    n_tiles = triton.cdiv(N, BN) * triton.cdiv(M, BM)
    split = _split_k(n_tiles, K, BK, a.device)
    k_per_split = triton.cdiv(triton.cdiv(K, BK), split) * BK
    has_bias = bias is not None
    has_ref = ref is not None
    dummy = c
    ws = _alloc((split, M, N), torch.float32, a.device) if split > 1 else dummy
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM), split)
    _ws_linear_kernel[grid](
        a, w, bias if has_bias else dummy, ref if has_ref else dummy, c, ws,
        M, N, K, k_per_split,
        W_T=not w_is_nk, HAS_BIAS=has_bias, RELU=relu, HAS_REF=has_ref, SPLIT=split > 1,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        ecfg = epilogue_config()
        egrid = (triton.cdiv(M * N, ecfg["BLOCK"]),)
        _splitk_epilogue_kernel[egrid](
            ws, bias if has_bias else dummy, ref if has_ref else dummy, c,
            M * N, N, split,
            HAS_BIAS=has_bias, RELU=relu, HAS_REF=has_ref, BLOCK=ecfg["BLOCK"],
            num_warps=ecfg["num_warps"], num_stages=ecfg["num_stages"],
        )
    return c


def _dw(g, a, precision, w_dtype):
    M, N = g.shape
    K = a.shape[1]
    dw = _alloc((N, K), w_dtype, g.device)
    db = _alloc((N,), w_dtype, g.device)
    if M == 0:
        dw.zero_()
        db.zero_()
        return dw, db
    cfg = dw_config(g.dtype, precision)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _dw_kernel[grid](
        g, a, dw, db, M, N, K,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dw, db


def mlp_head_forward(x, w1, b1, w2, b2, w3, b3, precision="ieee"):
    """x: (M, D). Returns (out (M, D), h1 (M, H), h2 (M, H)); h1/h2 are the post-ReLU activations."""
    x, w1, b1, w2, b2, w3, b3 = (t.contiguous() for t in (x, w1, b1, w2, b2, w3, b3))
    if x.dtype != torch.float32:
        precision = "ieee"  # irrelevant for 16-bit dots; one compiled variant instead of two
    M, D = x.shape
    H = w1.shape[0]
    dev, dt = x.device, x.dtype
    path = _env.mlp_head_forced_path()
    if path is None:
        path = "small" if use_small_path(D, H, x.element_size()) else "large"
    if path == "small" and H > SMALL_MAX_H:
        path = "large"  # h1 must fit on chip
    with on_device(x):
        if path == "small":
            out = _alloc((M, D), dt, dev)
            h1 = _alloc((M, H), dt, dev)
            h2 = _alloc((M, H), dt, dev)
            if M > 0:
                cfg = small_fwd_config(H, dt, precision)
                grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_N"]))
                _fused_small_fwd_kernel[grid](
                    x, w1, b1, w2, b2, w3, b3, out, h1, h2, M, D, H,
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                    BLOCK_H=cfg["BLOCK_H"], BLOCK_J=cfg["BLOCK_J"], PRECISION=precision,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                )
            return out, h1, h2
        h1 = _linear_ws(x, w1, True, b1, True, None, precision, dt)
        h2 = _linear_ws(h1, w2, True, b2, True, None, precision, dt)
        out = _linear_ws(h2, w3, True, b3, False, None, precision, dt)
        return out, h1, h2


def mlp_head_backward(grad_out, x, w1, w2, w3, h1, h2, precision="ieee"):
    """Returns (dx, dw1, db1, dw2, db2, dw3, db3); x / grad_out are (M, D)."""
    grad_out, x, w1, w2, w3, h1, h2 = (t.contiguous() for t in (grad_out, x, w1, w2, w3, h1, h2))
    dt = x.dtype
    if dt != torch.float32:
        precision = "ieee"  # as in the forward
    grad_out = grad_out.to(dt)
    with on_device(x):
        dw3, db3 = _dw(grad_out, h2, precision, w3.dtype)
        g2 = _linear_ws(grad_out, w3, False, None, False, h2, precision, dt)  # (dY @ w3) * (h2 > 0)
        dw2, db2 = _dw(g2, h1, precision, w2.dtype)
        g1 = _linear_ws(g2, w2, False, None, False, h1, precision, dt)  # (g2 @ w2) * (h1 > 0)
        dw1, db1 = _dw(g1, x, precision, w1.dtype)
        dx = _linear_ws(g1, w1, False, None, False, None, precision, dt)  # g1 @ w1
    return dx, dw1, db1, dw2, db2, dw3, db3
