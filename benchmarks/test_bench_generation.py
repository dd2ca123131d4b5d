"""Tokens per second of a patched model's KV-cached ``generate`` against PEFT's ``use_cache=False``.

Tiny random Llama (hidden 256, 4 layers), batch 4 of 32-token prompts, 20 virtual tokens, greedy, EOS off:
* P-tuning (``method=p_tuning``), two rows left-padded: ``use_cache=False`` is PEFT's only correct path;
* prefix tuning with a projection head (``method=prefix``): PEFT's ``generate`` is wrong with and without the cache
  (tests/test_generation_methods.py; on this batch its ``use_cache=False`` differs in 55 of 64 greedy tokens), so the
  uncached baseline is the greedy loop over PEFT's own forward (what training computes), recomputed every step.
Both providers of one method and length are in one pytest-benchmark group, so their ratio is read side by side:
``pytest benchmarks/test_bench_generation.py --benchmark-only``. Each benchmark first checks that the two produce
the same tokens.
"""

import warnings

import pytest
import torch

import ptfast

B, L, T = 4, 32, 20


@pytest.fixture(scope="module", params=["p_tuning", "prefix"])
def models(request):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.LlamaForCausalLM(config)
        with torch.no_grad():  # default-init logits are nearly flat: make greedy choices robust to rounding
            base.lm_head.weight.mul_(25)
        if request.param == "p_tuning":
            adapter = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, encoder_hidden_size=128)
        else:
            adapter = peft.PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=128
            )
        model = peft.get_peft_model(base, adapter).eval()
    ptfast.patch(model)  # the instance gets the fixed generate; type(model).generate is PEFT's
    ids = torch.randint(3, 1000, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[3, :11] = 0
    return request.param, model, ids, mask


def _forward_loop(model, ids, mask, new_tokens):
    """Greedy decoding by PEFT's forward on the whole sequence at every step: slow, and right."""
    seq, m = ids, mask
    for _ in range(new_tokens):
        nxt = model(input_ids=seq, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq


@pytest.mark.parametrize("new_tokens", [64, 256])
@pytest.mark.parametrize("provider", ["ptfast-kv-cache", "peft-uncached"])
def test_generate(benchmark, models, provider, new_tokens):
    method, model, ids, mask = models
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    if provider == "ptfast-kv-cache":

        def run():
            return model.generate(use_cache=True, **kw)
    elif method == "p_tuning":

        def run():
            return type(model).generate(model, use_cache=False, **kw)
    else:

        def run():
            return _forward_loop(model, ids, mask, new_tokens)

    with torch.inference_mode():
        reference = (
            _forward_loop(model, ids, mask, new_tokens)
            if method == "prefix"
            else type(model).generate(model, use_cache=False, **kw)
        )
        assert torch.equal(run(), reference)  # same tokens, or the timing means nothing
        benchmark.group = f"generate-B{B}-L{L}-T{T}-new{new_tokens}" + ("" if method == "p_tuning" else f"-{method}")
        benchmark.name = provider
        benchmark.extra_info["tokens"] = B * new_tokens
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = B * new_tokens / benchmark.stats.stats.min
