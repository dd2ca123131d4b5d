"""Triton gather kernel for ``prepend_prompts`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

    out[b, t]     = tables[adapter_index[b], t]        t <  T
    out[b, T + l] = word_embeddings[input_ids[b, l]]   l <  L

No validation here: ``ptfast/ops/prepend.py`` checks shapes, dtypes, devices and index ranges before launching.

Design: a pure byte mover. Grid ``(B * (T + L), cdiv(D, BLOCK_D))``: program ``(r, c)`` resolves output row ``r``
to its source row (one scalar load of the adapter index or the token id), then copies ``BLOCK_D`` contiguous
elements, masked at the row's end. fp32/fp16/bf16 tensors are moved as they are; any other dtype is reinterpreted
as the same-size integer type (or as bytes), so every dtype is copied bit for bit. All row offsets are int64
(``token_id * row_stride`` passes 2**31 for e.g. V=256k, D=8192, and so can ``r * D`` for large batches). The
innermost dimension must be dense (row strides are free); the launcher makes it so.

``BLOCK_D`` covers up to 8 KiB of a row per program (2048 fp32 / 4096 fp16 elements), with one warp per 1 KiB
(16 B per thread per access: vectorized when the row stride and D are multiples of 16 B, which Triton's argument
specialization detects). ``prepend_config`` is the only heuristic, so the GPU compile test can enumerate every
config it can return (``CONFIGS``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import on_device
from .launch import Launcher

__all__ = ["prepend_prompts_triton", "prepend_config", "CONFIGS", "MAX_BLOCK_BYTES"]

MAX_BLOCK_BYTES = 8192
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _prepend_kernel(
    ids_ptr,
    we_ptr,
    tab_ptr,
    aidx_ptr,
    out_ptr,
    T,
    S,
    D,
    stride_ids_b,
    stride_ids_l,
    stride_aidx,
    stride_we_v,
    stride_tab_a,
    stride_tab_t,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * S + s
    pid_d = tl.program_id(1)
    b = row // S
    s = row - b * S
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    if s < T:
        a = tl.load(aidx_ptr + b * stride_aidx).to(tl.int64)
        src = tab_ptr + a * stride_tab_a + s * stride_tab_t
    else:
        tok = tl.load(ids_ptr + b * stride_ids_b + (s - T) * stride_ids_l).to(tl.int64)
        src = we_ptr + tok * stride_we_v
    vals = tl.load(src + cols, mask=mask)
    tl.store(out_ptr + row * D + cols, vals, mask=mask)


def prepend_config(D: int, element_size: int) -> dict:
    """``BLOCK_D`` (a power of two >= 16, <= 8 KiB of elements) and ``num_warps`` (1 per KiB, 1..8)."""
    max_elems = MAX_BLOCK_BYTES // element_size
    block = min(max(triton.next_power_of_2(max(D, 1)), 16), max_elems)
    num_warps = max(1, min(8, (block * element_size) // 1024))
    return {"BLOCK_D": block, "num_warps": num_warps}


def _all_configs() -> dict:
    out = {}
    for es in (1, 2, 4, 8):
        seen = []
        block = 16
        while block <= MAX_BLOCK_BYTES // es:
            cfg = prepend_config(block, es)
            if cfg not in seen:
                seen.append(cfg)
            block *= 2
        out[es] = seen
    return out


CONFIGS = _all_configs()  # element size -> every config prepend_config can return


def _as_movable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself for fp32/fp16/bf16, else a same-memory view Triton can load and store bit for bit."""
    if t.dtype in _NATIVE_DTYPES:
        return t
    es = t.element_size()
    return t.view(_INT_OF_SIZE[es]) if es in _INT_OF_SIZE else t.view(torch.uint8)


def prepend_prompts_triton(input_ids, word_embeddings, tables, adapter_index) -> torch.Tensor:
    B, L = input_ids.shape
    A, T, D = tables.shape
    S = T + L
    out = torch.empty((B, S, D), dtype=word_embeddings.dtype, device=word_embeddings.device)
    if out.numel() == 0:
        return out
    we = word_embeddings if word_embeddings.stride(1) == 1 else word_embeddings.contiguous()
    tb = tables if tables.stride(2) == 1 else tables.contiguous()
    we_m, tb_m, out_m = _as_movable(we), _as_movable(tb), _as_movable(out)
    Dm = out_m.shape[-1]  # D, or D * element_size when moved as bytes
    scale = Dm // D
    cfg = prepend_config(Dm, out_m.element_size())
    key = (cfg["BLOCK_D"], cfg["num_warps"], out_m.dtype, input_ids.dtype, adapter_index.dtype)
    launcher = _LAUNCHERS.get(key)
    if launcher is None:  # every integer argument varies with the batch: all join the compiled kernels' key
        launcher = _LAUNCHERS[key] = Launcher(
            _prepend_kernel,
            (1, 1, 1),
            dict(BLOCK_D=cfg["BLOCK_D"]),
            num_warps=cfg["num_warps"],
            num_stages=3,
            int_slots=range(5, 14),
        )
    grid = (B * S, triton.cdiv(Dm, cfg["BLOCK_D"]), 1)
    with on_device(out):  # Triton launches on the current device, not the tensors'
        launcher.launch(
            grid,
            (
                input_ids,
                we_m,
                tb_m,
                adapter_index,
                out_m,
                T,
                S,
                Dm,
                input_ids.stride(0),
                input_ids.stride(1),
                adapter_index.stride(0),
                we.stride(0) * scale,
                tb.stride(0) * scale,
                tb.stride(1) * scale,
            ),
        )
    return out


_LAUNCHERS: dict = {}
