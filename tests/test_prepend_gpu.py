"""prepend_prompts on a real GPU (skipped without CUDA): the Triton gather against the eager reference, bit for bit."""

import pytest
import torch

from ptfast.ops.prepend import prepend_prompts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64], ids=str)
@pytest.mark.parametrize("B,L,D,T,A", [(8, 128, 4096, 20, 3), (3, 17, 1000, 7, 2)])
def test_gpu_prepend_matches_eager(B, L, D, T, A, dtype):
    g = torch.Generator().manual_seed(0)
    V = 1000
    we = torch.randn(V, D, generator=g).mul(100).to(dtype).cuda()
    tables = torch.randn(A, T, D, generator=g).mul(100).to(dtype).cuda()
    ids = torch.randint(0, V, (B, L), generator=g).cuda()
    aidx = torch.randint(0, A, (B,), generator=g).cuda()
    got = prepend_prompts(ids, we, tables, aidx, backend="triton")
    ref = torch.cat([tables[aidx], we[ids]], dim=1)
    assert got.dtype == dtype and torch.equal(got, ref)
