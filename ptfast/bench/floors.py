"""The floor of a case on a GPU: its minimal bytes and flops, over the memory bandwidth and the peak throughput."""

from __future__ import annotations

from typing import Tuple

import torch

from .. import _env
from .cases import Case

#: Measured on the H100 we test on (see shared GPU.md): device-to-device copy bandwidth, bf16 matmul peak.
HBM_BYTES_PER_S = _env.hbm_bytes_per_s(3.0e12)
#: Peak matmul throughput by dtype, for the compute side of the floor. bf16/fp16: measured ~800 TFLOP/s (GPU.md);
#: fp32 without TF32: the H100 SXM's 67 TFLOP/s datasheet number (not measured by us).
PEAK_FLOPS = {"bf16": 800e12, "fp16": 800e12, "fp32": 67e12}


def hbm_bytes_per_s() -> float:
    return HBM_BYTES_PER_S


def work(case: Case) -> Tuple[int, int]:
    """``(bytes, flops)`` of the minimal work of ``case``: every weight, input and output read or written once.

    * infer:  weights + embedding table (M x D) + the output table (M x D); the batch is a broadcast of one table.
    * train:  the above + weight gradients (= weights) + embedding gradient (M x D) + grad_out (B x M x D);
              flops = 3 x forward.
    * prompt/model: infer + inputs_embeds (B x S x D) read + the concatenation (B x (M+S) x D) written.
    Flops: one forward of the head on M rows, 2*M*(D*H + H*H + H*D).
    """
    M, D, H = case.shape.M, case.shape.D, case.shape.H
    es = torch.empty((), dtype=case.torch_dtype).element_size()
    weights = case.shape.weight_elems
    flops = 2 * M * (D * H + H * H + H * D)
    elems = weights + 2 * M * D
    if case.mode == "train":
        elems += weights + M * D + case.batch * M * D
        flops *= 3
    elif case.mode in ("prompt", "model"):
        elems += case.batch * case.seq_len * D + case.batch * (M + case.seq_len) * D
    return elems * es, flops


def floor_s(case: Case) -> float:
    """max(bytes / HBM bandwidth, flops / peak) on the GPU described in GPU.md."""
    nbytes, flops = work(case)
    return max(nbytes / hbm_bytes_per_s(), flops / PEAK_FLOPS[case.dtype])
