"""Patched PEFT models and ptfast encoders survive pickle, torch.save/torch.load, copy.deepcopy and a spawned worker.

Each round trip must give back a model that is still what it was (ptfast encoders and the fixed generate bound to
the copy, or, after ``ptfast.unpatch``, PEFT's encoder and PEFT's generate) and computes the same numbers.
"""

from __future__ import annotations

import copy
import io
import multiprocessing
import pickle
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PromptEncoderConfig, TaskType, get_peft_model  # noqa: E402
from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder  # noqa: E402

import ptfast  # noqa: E402
from ptfast.integrations import generation  # noqa: E402
from ptfast.integrations import peft as integration  # noqa: E402
from tests.helpers.models import tiny_llama_causal_lm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

T, NEW_TOKENS = 4, 6
BROKEN = generation.peft_generate_is_broken()


def _pconfig():
    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=T, encoder_hidden_size=16)


def _model(patched: bool):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama_causal_lm(), _pconfig())
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(10)  # make the virtual tokens matter
    model = ptfast.patch(model) if patched else ptfast.unpatch(ptfast.patch(model))
    return model.eval()


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    return ids, (ids != 0).long()


@torch.no_grad()
def _outputs(model):
    """What the round trip must keep: forward logits and generated tokens (through the model's own generate)."""
    ids, mask = _batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    tokens = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
    )
    return logits, tokens


def _describe(model):
    """Which encoder and which generate/_setup_prompt_encoder the model has, and to whom the latter are bound."""
    bound = {
        name: (getattr(model.__dict__.get(name), "__func__", None), getattr(model.__dict__.get(name), "__self__", None))
        for name in ("generate", "_setup_prompt_encoder")
    }
    return type(model.prompt_encoder["default"]), bound


def _torch_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": _torch_round_trip,
    "deepcopy": copy.deepcopy,
}


def _check_like_original(copied, original, patched):
    assert copied is not original
    encoder_type, bound = _describe(copied)
    if patched:
        assert encoder_type is ptfast.PromptEncoder
        setup = bound["_setup_prompt_encoder"]
        assert setup == (integration._setup_prompt_encoder_of_patched_model, copied)  # bound to the copy
        if BROKEN:
            assert bound["generate"] == (generation._patched_generate, copied)
        else:
            assert "generate" not in copied.__dict__
    else:
        assert encoder_type is PeftPromptEncoder
        assert "generate" not in copied.__dict__ and "_setup_prompt_encoder" not in copied.__dict__
    for got, want in zip(_outputs(copied), _outputs(original)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
@pytest.mark.parametrize("how", list(ROUND_TRIPS))
def test_model_round_trip(how, patched):
    original = _model(patched)
    logits, tokens = _outputs(original)  # a warm table cache must not travel (or break the copy)
    copied = ROUND_TRIPS[how](original)
    _check_like_original(copied, original, patched)
    # the copy's encoder, cache and generate are its own: changing its prompts changes its output only
    with torch.no_grad():
        copied.prompt_encoder["default"].embedding.weight.add_(1)
    assert not torch.allclose(_outputs(copied)[0], logits)
    assert all(torch.equal(got, want) for got, want in zip(_outputs(original), (logits, tokens)))


def test_adapter_added_to_a_copy_of_a_patched_model_is_ptfast():
    copied = pickle.loads(pickle.dumps(_model(True)))
    copied.add_adapter("other", _pconfig())
    assert type(copied.prompt_encoder["other"]) is ptfast.PromptEncoder


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
def test_encoder_round_trip_starts_with_an_empty_cache(how):
    encoder = ptfast.PromptEncoder(
        ptfast.PromptEncoderConfig(num_virtual_tokens=T, token_dim=8, encoder_hidden_size=6)
    ).eval()
    indices = torch.arange(T).unsqueeze(0)
    with torch.no_grad():
        before = encoder(indices).clone()
    assert encoder._cache.table is not None and encoder._index_check is not None
    copied = ROUND_TRIPS[how](encoder)
    assert type(copied) is ptfast.PromptEncoder
    assert copied._cache is not encoder._cache
    assert copied._cache.table is None and copied._index_check is None
    with torch.no_grad():
        assert torch.equal(copied(indices), before)
        copied.embedding.weight.add_(1)
        assert not torch.equal(copied(indices), before)  # the copy's cache follows the copy's weights
        assert torch.equal(encoder(indices), before)


# ------------------------------------------------------------------------------------------------ spawned worker


def _worker_outputs(models):
    """Runs in a spawned process: what each received model computes, and what it was received as."""
    warnings.simplefilter("ignore")
    return [
        (
            _outputs(model),
            _qualified_name(_describe(model)[0]),
            getattr(model.__dict__.get("generate"), "__func__", None) is generation._patched_generate,
        )
        for model in models
    ]


def _qualified_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"  # both encoder classes are called PromptEncoder


def test_spawned_worker_gets_working_models():
    models = [_model(True), _model(False)]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.apply(_worker_outputs, (models,))
    expected = [(_qualified_name(ptfast.PromptEncoder), BROKEN), (_qualified_name(PeftPromptEncoder), False)]
    for model, (outputs, encoder_name, fixed_generate), want in zip(models, results, expected):
        assert (encoder_name, fixed_generate) == want
        for got, ref in zip(outputs, _outputs(model)):
            assert torch.equal(got, ref)
