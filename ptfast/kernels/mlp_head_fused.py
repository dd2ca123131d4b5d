"""The small MLP head in one launch per direction: persistent programs with a grid barrier between the layers.

    forward:  phase 1  h1 = relu(x @ w1.T + b1)            the split-K tiles of linear._linear_tile
              phase 2  h2, out = layers 2 + 3              the tiles of mlp_head_small._head23_tile
    backward: phase 1  g2 = mask(dy @ w3, h2), dw3, db3    the tiles of linear._bwd_layer_tile, layer by layer
              phase 2  g1 = mask(g2 @ w2, h1), dw2, db2
              phase 3  dx = g1 @ w1, dw1, db1

At the seed shape each layer is a few microseconds of GPU time, so a kernel boundary (a launch, and the host's
share of it) costs as much as a layer. Here one launch runs every phase: its G programs (at most the number of
SMs, launched cooperatively so that all are resident at once) loop over each phase's tiles with stride G and wait
at a grid barrier before the next phase reads what the last one wrote.

The barrier: after a CTA barrier, one thread adds 1 to an arrival counter (acq_rel, gpu scope) and spins until
it reaches ``phase x G``; a second CTA barrier releases the other threads. This is cooperative groups' grid sync.
The last program to leave draws the last exit ticket and zeroes both counters for the next launch on the stream.

The interpreter runs one program at a time, so a program waiting for the others would wait forever: there
(``PHASE`` > 0) the kernel is launched once per phase, with the launch boundary as the barrier. Same tiles,
same order of every reduction, same bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import Launch
from .linear import _bwd_layer_tile, _linear_tile
from .mlp_head_small import _head23_tile

__all__ = ["fused_forward_plan", "fused_backward_plan"]


@triton.jit
def _grid_barrier(bar_ptr, phase):
    """Wait until every program of the grid has arrived here ``phase`` times (phase = 1, 2, ...)."""
    tl.debug_barrier()  # every thread's stores of this phase are issued before the release below
    target = phase * tl.num_programs(0)
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < target:
        arrived = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _grid_exit(bar_ptr):
    """The last program out resets the arrival and exit counters (everyone else has passed every barrier)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed", scope="gpu")


# Tile and grid counts are small numbers that vary with M: specializing on them would only multiply binaries.
@triton.jit(do_not_specialize=["M", "N_SPLIT", "L1_GRID_N", "L1_GRID_M", "L1_TILES", "H23_GRID_N", "H23_TILES"])
def _fwd_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    out_ptr,
    h1_ptr,
    h2_ptr,
    ws_ptr,
    cnt_ptr,
    bar_ptr,
    M,
    D,
    H,
    K_PER_SPLIT,
    N_SPLIT,
    L1_GRID_N,
    L1_GRID_M,
    L1_TILES,
    H23_GRID_N,
    H23_TILES,
    PHASE: tl.constexpr,
    L1_BLOCK_M: tl.constexpr,
    L1_BLOCK_N: tl.constexpr,
    L1_BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The forward; ``PHASE`` 0 runs both phases with the barrier, 1 or 2 only that phase."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    if PHASE != 2:
        for t in range(pid, L1_TILES, step):
            _linear_tile(
                x_ptr,
                w1_ptr,
                b1_ptr,
                x_ptr,
                h1_ptr,
                ws_ptr,
                cnt_ptr,
                M,
                H,
                D,
                K_PER_SPLIT,
                N_SPLIT,
                t % L1_GRID_N,
                (t // L1_GRID_N) % L1_GRID_M,
                t // (L1_GRID_N * L1_GRID_M),
                L1_GRID_N,
                False,
                True,
                True,
                False,
                False,
                False,
                L1_BLOCK_M,
                L1_BLOCK_N,
                L1_BLOCK_K,
                PRECISION,
            )
    if PHASE == 0:
        _grid_barrier(bar_ptr, 1)
    if PHASE != 1:
        for t in range(pid, H23_TILES, step):
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
                t // H23_GRID_N,
                t % H23_GRID_N,
                BLOCK_M,
                BLOCK_N,
                BLOCK_H,
                BLOCK_J,
                PRECISION,
            )
    if PHASE == 0:
        _grid_exit(bar_ptr)


@triton.jit
def _bwd_phase(
    pid,
    step,
    tiles,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr,
    DW_BLOCK_N: tl.constexpr,
    DW_BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    for t in range(pid, tiles, step):
        _bwd_layer_tile(
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
            HAS_MASK,
            False,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            DW_BLOCK_M,
            DW_BLOCK_N,
            DW_BLOCK_K,
            PRECISION,
        )


@triton.jit(
    do_not_specialize=[
        "M",
        "S3",
        "GN3",
        "GM3",
        "DGN3",
        "T3",
        "S2",
        "GN2",
        "GM2",
        "DGN2",
        "T2",
        "S1",
        "GN1",
        "GM1",
        "DGN1",
        "T1",
    ]
)
def _bwd_kernel3(
    dy_ptr,
    x_ptr,
    w1_ptr,
    w2_ptr,
    w3_ptr,
    h1_ptr,
    h2_ptr,
    g1_ptr,
    g2_ptr,
    dx_ptr,
    dw1_ptr,
    db1_ptr,
    dw2_ptr,
    db2_ptr,
    dw3_ptr,
    db3_ptr,
    ws_ptr,
    cnt_ptr,
    bar_ptr,
    M,
    D,
    H,
    KPS3,
    S3,
    GN3,
    GM3,
    DGN3,
    T3,
    KPS2,
    S2,
    GN2,
    GM2,
    DGN2,
    T2,
    KPS1,
    S1,
    GN1,
    GM1,
    DGN1,
    T1,
    PHASE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr,
    DW_BLOCK_N: tl.constexpr,
    DW_BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The backward; per layer l: split-K length KPS, splits S, GEMM grid GN x GM, dW grid width DGN, tiles T.
    ``PHASE`` 0 runs all three layers with barriers, 1-3 only that layer (3 first, as autograd does)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    if PHASE == 0 or PHASE == 1:  # layer 3: g2 = mask(dy @ w3, h2); dw3 = dy.T @ h2; db3
        _bwd_phase(
            pid,
            step,
            T3,
            dy_ptr,
            w3_ptr,
            h2_ptr,
            g2_ptr,
            ws_ptr,
            cnt_ptr,
            dw3_ptr,
            db3_ptr,
            M,
            H,
            D,
            KPS3,
            S3,
            GN3,
            GM3,
            DGN3,
            True,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            DW_BLOCK_M,
            DW_BLOCK_N,
            DW_BLOCK_K,
            PRECISION,
        )
    if PHASE == 0:
        _grid_barrier(bar_ptr, 1)
    if PHASE == 0 or PHASE == 2:  # layer 2: g1 = mask(g2 @ w2, h1); dw2 = g2.T @ h1; db2
        _bwd_phase(
            pid,
            step,
            T2,
            g2_ptr,
            w2_ptr,
            h1_ptr,
            g1_ptr,
            ws_ptr,
            cnt_ptr,
            dw2_ptr,
            db2_ptr,
            M,
            H,
            H,
            KPS2,
            S2,
            GN2,
            GM2,
            DGN2,
            True,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            DW_BLOCK_M,
            DW_BLOCK_N,
            DW_BLOCK_K,
            PRECISION,
        )
    if PHASE == 0:
        _grid_barrier(bar_ptr, 2)
    if PHASE == 0 or PHASE == 3:  # layer 1: dx = g1 @ w1; dw1 = g1.T @ x; db1
        _bwd_phase(
            pid,
            step,
            T1,
            g1_ptr,
            w1_ptr,
            x_ptr,
            dx_ptr,
            ws_ptr,
            cnt_ptr,
            dw1_ptr,
            db1_ptr,
            M,
            D,
            H,
            KPS1,
            S1,
            GN1,
            GM1,
            DGN1,
            False,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            DW_BLOCK_M,
            DW_BLOCK_N,
            DW_BLOCK_K,
            PRECISION,
        )
    if PHASE == 0:
        _grid_exit(bar_ptr)


# ------------------------------------------------------------------------------------------------ plans
def _grid(parts, sms: int) -> int:
    """One program per tile of the largest phase, at most one per SM (all resident: the barrier needs that)."""
    return max(1, min(sms, max(p.ctas for p in parts)))


def fused_forward_plan(l1: Launch, h23: Launch, *, sms: int, fma_dot: bool = False) -> Launch:
    """``_fwd_kernel`` running the tiles of ``l1`` (linear_plan of layer 1) then those of ``h23`` (head23_plan)."""
    lc, hc = l1.constexprs, h23.constexprs
    constexprs = dict(
        PHASE=0,
        L1_BLOCK_M=lc["BLOCK_M"],
        L1_BLOCK_N=lc["BLOCK_N"],
        L1_BLOCK_K=lc["BLOCK_K"],
        BLOCK_M=hc["BLOCK_M"],
        BLOCK_N=hc["BLOCK_N"],
        BLOCK_H=hc["BLOCK_H"],
        BLOCK_J=hc["BLOCK_J"],
        PRECISION=hc["PRECISION"],
    )
    parts = (l1, h23)
    # The CUDA-core FMA dot (fp32 "ieee") spills with layer 1's deeper pipeline (compile sweep, sm_90)
    stages = min(l1.num_stages, h23.num_stages) if fma_dot else l1.num_stages
    return Launch(
        "mlp_head_fused._fwd_kernel",
        (_grid(parts, sms),),
        constexprs,
        max(l1.num_warps, h23.num_warps),
        stages,
        sum(p.hbm_bytes for p in parts),
        sum(p.macs for p in parts),
        sum(p.useful_macs for p in parts),
        sum(p.iters for p in parts),
        parts,
    )


def fused_backward_plan(layers, *, sms: int) -> Launch:
    """``_bwd_kernel3`` running the tiles of three ``linear_dw_plan`` launches (layer 3, 2, 1), phase by phase."""
    first = layers[0].constexprs
    constexprs = dict(PHASE=0, **{k: v for k, v in first.items() if k not in ("HAS_MASK", "TANH_GRAD")})
    # Three layers' tiles in one binary spill with the GEMM's 4 warps, and 3xTF32's split operands with its 3
    # stages on sm_80 (compile sweep): 8 warps, and 2 stages there
    stages = 2 if first["PRECISION"] == "tf32x3" else layers[0].num_stages
    return Launch(
        "mlp_head_fused._bwd_kernel3",
        (_grid(layers, sms),),
        constexprs,
        max(8, layers[0].num_warps),
        stages,
        sum(p.hbm_bytes for p in layers),
        sum(p.macs for p in layers),
        sum(p.useful_macs for p in layers),
        sum(p.iters for p in layers),
        tuple(layers),
    )
