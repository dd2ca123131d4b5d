"""ptfast.PrefixEncoder vs PEFT's prefix-tuning PrefixEncoder: forward under no_grad, and forward+backward.

``pytest benchmarks/test_bench_prefix.py --benchmark-only`` (results: ``<device>-prefix.pytest.json``, see
conftest.py). One CPU shape, small enough for a 2-core machine: 20 virtual tokens, token_dim 256, 4 layers (a
table 2048 wide), hidden 256, with and without the projection head, batch 1 and 8, the ``arange`` indices that
``PeftModel.get_prompt`` passes. Under no_grad ptfast serves its cached table (a view); with a gradient it runs the
head once on the 20 table rows (PEFT: on batch * 20 rows), eagerly (no Triton kernel for this head yet).
"""

import pytest
import torch

import ptfast

T, D, LAYERS, H = 20, 256, 4, 256
PROVIDERS = ["peft", "ptfast"]


@pytest.fixture(scope="module")
def encoders():
    prefix_tuning = pytest.importorskip("peft.tuners.prefix_tuning")
    from peft import PrefixTuningConfig

    pairs = {}
    for projection in (True, False):
        torch.manual_seed(0)
        peft_enc = prefix_tuning.PrefixEncoder(
            PrefixTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=T,
                token_dim=D,
                num_layers=LAYERS,
                encoder_hidden_size=H,
                prefix_projection=projection,
            )
        )
        pairs[projection] = {"peft": peft_enc, "ptfast": ptfast.PrefixEncoder.from_peft(peft_enc)}
    return pairs


def _group(kind, projection, batch):
    return f"prefix-{kind}-{'projection' if projection else 'embedding'}-B{batch}-T{T}-D{D}-L{LAYERS}-H{H}-fp32"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("projection", [True, False], ids=["projection", "embedding"])
def test_prefix_forward(benchmark, encoders, projection, batch, provider):
    module = encoders[projection][provider]
    indices = torch.arange(T).unsqueeze(0).expand(batch, -1)
    benchmark.group, benchmark.name = _group("forward", projection, batch), provider
    with torch.no_grad():
        torch.testing.assert_close(module(indices), encoders[projection]["peft"](indices), rtol=1e-5, atol=1e-6)
        benchmark.pedantic(module, args=(indices,), rounds=10, iterations=20, warmup_rounds=1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("projection", [True, False], ids=["projection", "embedding"])
def test_prefix_forward_backward(benchmark, encoders, projection, batch, provider):
    module = encoders[projection][provider]
    indices = torch.arange(T).unsqueeze(0).expand(batch, -1)
    grad_out = torch.randn(batch, T, LAYERS * 2 * D)

    def step():
        module(indices).backward(grad_out)

    benchmark.group, benchmark.name = _group("forward-backward", projection, batch), provider
    benchmark.pedantic(step, rounds=10, iterations=5, warmup_rounds=1)
    module.zero_grad(set_to_none=True)
