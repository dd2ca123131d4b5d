"""What a cache hit costs: ptfast's cached forward against the floor for any module, and against PEFT.

The floor is a module whose ``forward`` only returns ``table.expand(B, -1, -1)``: ``nn.Module.__call__`` plus one
view, what any cached encoder must pay at least. ``ptfast-cached`` checks its hit with the C++ extension
(``csrc/table_check.cpp``, built here if needed; skipped where it cannot be), ``ptfast-cached-python`` with the
Python reading alone. The providers run at the seed shape (20 x 1024 x 128, fp32)
under ``no_grad``, in one process, one after another in one pytest-benchmark group, so their ratios are read side
by side: ``pytest benchmarks/test_bench_cache_hit.py --benchmark-only``. On a shared machine compare minimums.
"""

import warnings

import pytest
import torch

import ptfast

M, D, H = 20, 1024, 128


class ExpandOnly(torch.nn.Module):
    """The floor: a module that returns a view of a ready table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.table.expand(indices.shape[0], -1, -1)


@pytest.fixture(scope="module")
def modules():
    peft_p_tuning = pytest.importorskip("peft.tuners.p_tuning")
    from peft import PromptEncoderConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_enc = peft_p_tuning.PromptEncoder(
            PromptEncoderConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=M,
                token_dim=D,
                encoder_hidden_size=H,
                num_transformer_submodules=1,
            )
        ).eval()
    ours = ptfast.PromptEncoder.from_peft(peft_enc)
    python_checked = ptfast.PromptEncoder.from_peft(peft_enc)
    indices = torch.arange(M).unsqueeze(0)
    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        floor = ExpandOnly(ours.table().clone())
        m.setattr(ptfast.native, "table_check_module", lambda: None)
        python_checked(indices)  # cached without the native record: every hit reads in Python
    assert python_checked._cache.entry.native is None
    return {"floor": floor, "ptfast-cached": ours, "ptfast-cached-python": python_checked, "peft": peft_enc}


@pytest.mark.parametrize("provider", ["floor", "ptfast-cached", "ptfast-cached-python", "peft"])
def test_cache_hit(benchmark, modules, provider):
    module = modules[provider]
    indices = torch.arange(M).unsqueeze(0)  # PeftModel.get_prompt's call, batch 1
    if provider == "ptfast-cached":
        if not ptfast.native_available():
            pytest.skip(f"no C++ extension: {ptfast.native.native_status()['error']}")
        module.invalidate_cache()  # cached again, now with the native record
        with torch.no_grad():
            module(indices)
        assert module._cache.entry.native is not None
    benchmark.group = f"cache-hit-M{M}-D{D}-H{H}-fp32"
    benchmark.name = provider
    with torch.no_grad():
        expected = modules["peft"](indices)
        torch.testing.assert_close(module(indices), expected, rtol=1e-5, atol=1e-6)
        benchmark.pedantic(
            module, args=(indices,), rounds=20, iterations=200 if provider != "peft" else 5, warmup_rounds=1
        )
