"""A model that scales its token embeddings (Gemma): a bank served from the checkpoint's bare weight gives vLLM the
inputs PEFT gives HF, so the tokens agree; without the recorded scale they would not."""

import pytest

from ptfast import PromptBank
from ptfast.bank_io import embedding_weight_from_checkpoint
from ptfast.integrations import vllm as ptv

from .common import (
    ADAPTERS,
    add_p_tuning_adapters,
    bank_hf_generate,
    greedy_margin,
    make_tiny_gemma,
    peft_generate,
    requests_and_names,
    shutdown_engine,
    vllm_engine,
)

NEW = 16


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gemma")
    base = make_tiny_gemma(folder)
    # virtual tokens of about the norm of the real ones, which the model scales by sqrt(128)
    return folder, add_p_tuning_adapters(base, ADAPTERS, scale=128**0.5)


def test_gemma_bank_from_the_bare_weight_gives_pefts_tokens_in_vllm(gemma, tmp_path):
    folder, peft_model = gemma
    saved = PromptBank.from_peft_model(peft_model).save(tmp_path / "bank")
    weight = embedding_weight_from_checkpoint(folder)
    bank = PromptBank.load(saved, weight)
    requests, names = requests_and_names()
    base = peft_model.get_base_model()
    reference = peft_generate(peft_model, requests, names, NEW)
    assert bank_hf_generate(base, bank, requests, names, NEW) == reference
    assert greedy_margin(base, ptv.build_prompt_embeds(bank, requests, names), NEW) > 2e-2  # measured 0.097
    same = [requests[2]] * len(ADAPTERS)  # the prompts matter: one request under each adapter, three generations
    assert len({tuple(t) for t in bank_hf_generate(base, bank, same, list(ADAPTERS), NEW)}) == len(ADAPTERS)
    llm = vllm_engine(folder)
    try:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, detokenize=False)
        assert ptv.generate(llm, bank, requests, names, params) == reference
    finally:
        shutdown_engine(llm)
    # the scale matters: the same tables over the unscaled rows generate other tokens (for all 10 requests here)
    unscaled = PromptBank(weight)
    for name in ADAPTERS:
        unscaled.add(name, bank.table(name))
    assert bank_hf_generate(base, unscaled, requests, names, NEW) != reference
