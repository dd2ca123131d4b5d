"""Offline ``LLM.generate``: three adapters mixed in one call give the tokens of PromptBank + HF and of PEFT."""

import pytest
import torch

from ptfast import PromptBank, UnknownAdapterError
from ptfast.integrations import vllm as ptv

from .common import (
    ADAPTERS,
    bank_hf_generate,
    greedy_margin,
    peft_generate,
    requests_and_names,
    shutdown_engine,
    vllm_engine,
)

NEW = 16


@pytest.fixture(scope="module")
def llm(model_folder):
    engine = vllm_engine(model_folder)
    yield engine
    shutdown_engine(engine)


def test_spec_read_from_the_engine(llm):
    spec = ptv.EngineSpec.of(llm)
    assert spec == ptv.EngineSpec(hidden_size=128, dtype=torch.float32, vocab_size=512, max_model_len=256)


def test_mixed_adapters_one_call_equal_hf_and_peft(llm, served_bank, peft_model):
    requests, names = requests_and_names()
    ours = ptv.generate(llm, served_bank, requests, names, _params(NEW))
    assert all(len(t) == NEW for t in ours)
    base = peft_model.get_base_model()
    assert ours == bank_hf_generate(base, served_bank, requests, names, NEW)
    assert ours == peft_generate(peft_model, requests, names, NEW)
    # the decisions are far from ties, so the equality above is not luck of rounding
    embeds = ptv.build_prompt_embeds(served_bank, requests, names, engine=llm)
    assert greedy_margin(base, embeds, NEW) > 5e-3  # measured 0.014, logits of std ~6
    # and the prompts matter: the same tokens under each adapter give different generations
    same = [requests[2]] * len(ADAPTERS)
    outs = ptv.generate(llm, served_bank, same, list(ADAPTERS), _params(NEW))
    assert len({tuple(t) for t in outs}) == len(ADAPTERS), outs


def test_bad_inputs_rejected_before_the_engine(llm, served_bank):
    requests, names = requests_and_names()
    before = ptv.generate(llm, served_bank, requests[:3], names[:3], _params(4))
    other = PromptBank(torch.randn(512, 64))  # another base model's embeddings: hidden 64
    other.add("sql", torch.randn(8, 64))
    with pytest.raises(ptv.PromptEmbedsError, match="hidden size 64, the engine's model 128"):
        ptv.generate(llm, other, requests[:1], "sql", _params(4))
    with pytest.raises(ptv.PromptEmbedsError, match="floating point"):
        ptv.check_prompt_embeds(torch.ones(5, 128, dtype=torch.int64), llm)
    with pytest.raises(ptv.PromptEmbedsError, match="hidden size 64"):
        ptv.check_prompt_embeds(torch.randn(5, 64), llm)
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        ptv.generate(llm, served_bank, requests[:2], ["sql", "nope"], _params(4))
    with pytest.raises(ptv.PromptEmbedsError, match="max_model_len 256"):
        ptv.generate(llm, served_bank, [[5] * 250], "sql", _params(4))
    # nothing reached the engine: it is alive and gives the same tokens
    assert ptv.generate(llm, served_bank, requests[:3], names[:3], _params(4)) == before


def _params(n):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
