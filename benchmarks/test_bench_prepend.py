"""prepend_prompts on CPU: native vs eager vs PEFT's embed + repeat + cat (B=8, L=512, D=4096, T=20, V=32000, fp32).

Run: ``pytest benchmarks/test_bench_prepend.py --benchmark-only`` (not collected by the normal ``pytest`` run,
whose testpaths are ``tests/``). Timed like the encoder suite, with
``ptfast.bench.pytest_benchmark`` (calibrated rounds of ptfast's one timer, handed to pytest-benchmark).
"""

import pytest
import torch
import torch.nn.functional as F

from ptfast import bench
from ptfast.native import native_available
from ptfast.ops.prepend import prepend_prompts

B, L, D, T, V, A = 8, 512, 4096, 20, 32000, 4


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    we = torch.randn(V, D, generator=g)
    tables = torch.randn(A, T, D, generator=g)
    ids = torch.randint(0, V, (B, L), generator=g)
    ai = torch.randint(0, A, (B,), generator=g)
    return ids, we, tables, ai


def _peft_path(ids, we, table):
    # PeftModelForCausalLM.forward: self.word_embeddings(input_ids); get_prompt(...).repeat(B, 1, 1); .to(dtype); cat
    embeds = F.embedding(ids, we)
    prompts = table.unsqueeze(0).repeat(ids.shape[0], 1, 1).to(embeds.dtype)
    return torch.cat((prompts, embeds), dim=1)


@pytest.mark.benchmark(group="prepend-cpu-B8-L512-D4096")
def test_peft_embed_repeat_cat(benchmark, inputs, repeats):
    ids, we, tables, _ = inputs
    with torch.no_grad():
        bench.pytest_benchmark(benchmark, lambda: _peft_path(ids, we, tables[0]), "cpu", repeats)
        out = _peft_path(ids, we, tables[0])
    assert out.shape == (B, T + L, D)


@pytest.mark.benchmark(group="prepend-cpu-B8-L512-D4096")
def test_prepend_eager(benchmark, inputs, repeats):
    ids, we, tables, ai = inputs
    with torch.no_grad():
        bench.pytest_benchmark(benchmark, lambda: prepend_prompts(ids, we, tables, ai, backend="eager"), "cpu", repeats)
        out = prepend_prompts(ids, we, tables, ai, backend="eager")
    assert out.shape == (B, T + L, D)


@pytest.mark.benchmark(group="prepend-cpu-B8-L512-D4096")
def test_prepend_native(benchmark, inputs, repeats):
    if not native_available():
        pytest.skip("native extension unavailable")
    ids, we, tables, ai = inputs
    with torch.no_grad():
        bench.pytest_benchmark(
            benchmark, lambda: prepend_prompts(ids, we, tables, ai, backend="native"), "cpu", repeats
        )
        out = prepend_prompts(ids, we, tables, ai, backend="native")
    assert torch.equal(out, prepend_prompts(ids, we, tables, ai, backend="eager"))
