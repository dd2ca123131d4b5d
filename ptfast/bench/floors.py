"""The floor of a case on a GPU: its minimal bytes and flops, over the memory bandwidth and the peak throughput."""

from __future__ import annotations

import torch

from .. import _env
from .cases import Case

# NVIDIA H100 SXM5 80GB datasheet values (NVIDIA "H100 Tensor Core GPU" datasheet, SXM column); not measured by
# us. The floors are computed for this card; set PTFAST_HBM_BW (bytes/s) to use another bandwidth, e.g. one you
# measured, or another card's.
#: H100 SXM HBM3 memory bandwidth: 3.35 TB/s.
H100_SXM_HBM_BYTES_PER_S = 3.35e12
#: H100 SXM peak throughput by dtype: BF16/FP16 Tensor Core 989 TFLOP/s dense (the datasheet's 1,979 is with 2:4
#: sparsity); FP32 (no TF32) 67 TFLOP/s.
PEAK_FLOPS = {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}


def hbm_bytes_per_s() -> float:
    """The memory bandwidth the floors use: ``PTFAST_HBM_BW`` if set (read at each call), else the H100 SXM's."""
    return _env.hbm_bytes_per_s(H100_SXM_HBM_BYTES_PER_S)


def work(case: Case) -> tuple[int, int]:
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
    """``max(bytes / HBM bandwidth, flops / peak)``: the H100 SXM datasheet figures above, unless overridden."""
    nbytes, flops = work(case)
    return max(nbytes / hbm_bytes_per_s(), flops / PEAK_FLOPS[case.dtype])
