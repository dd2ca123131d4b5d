"""ptfast.integrations.peft: patch/unpatch, patch_peft/unpatch_peft, checkpoints and full-encoder state.

Tiny random models built from configs (tests/helpers/models.py), CPU, fp32. A patched model must give PEFT's numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import (  # noqa: E402
    CPTConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import ptfast  # noqa: E402
from ptfast.integrations.checkpoints import (  # noqa: E402
    ENCODER_STATE_FILE,
    load_encoder_state,
    load_for_training,
    save_encoder_state,
)
from ptfast.integrations.peft import is_peft_patched, patch, patch_peft, unpatch, unpatch_peft  # noqa: E402
from tests.helpers.models import (  # noqa: E402
    random_batch,
    tiny_bert_seq_cls,
    tiny_bloom_causal_lm,
    tiny_llama_causal_lm,
    tiny_t5_seq2seq,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Position ids are not supported:UserWarning",
    "ignore::FutureWarning",
    "ignore:.*will not detect padding tokens:UserWarning",
)

NUM_VIRTUAL_TOKENS = 4
ENCODER_HIDDEN = 32
BATCH, SEQ = 2, 6


class Case:
    def __init__(self, name, builder, task_type, generates):
        self.name, self.builder, self.task_type, self.generates = name, builder, task_type, generates

    def __repr__(self):
        return self.name

    def batch(self, batch_size=BATCH, seed=1234):
        ids, mask = random_batch(batch_size, SEQ, seed=seed)
        if self.task_type == TaskType.SEQ_CLS:
            labels = torch.arange(batch_size) % 3
        else:
            labels = ids.clone()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


LLAMA = Case("llama-causal", tiny_llama_causal_lm, TaskType.CAUSAL_LM, True)
BLOOM = Case("bloom-causal", tiny_bloom_causal_lm, TaskType.CAUSAL_LM, True)
T5 = Case("t5-seq2seq", tiny_t5_seq2seq, TaskType.SEQ_2_SEQ_LM, True)
BERT = Case("bert-seqcls", tiny_bert_seq_cls, TaskType.SEQ_CLS, False)
CASES = [LLAMA, BLOOM, T5, BERT]
GEN_CASES = [c for c in CASES if c.generates]


def p_tuning_config(case, **kwargs):
    kwargs.setdefault("num_virtual_tokens", NUM_VIRTUAL_TOKENS)
    kwargs.setdefault("encoder_hidden_size", ENCODER_HIDDEN)
    return PromptEncoderConfig(task_type=case.task_type, **kwargs)


def make(case, *, patched=False, seed=0, **cfg):
    """A PeftModel on a fresh tiny base model; the same ``seed`` gives the same encoder weights."""
    base = case.builder()
    torch.manual_seed(seed)
    model = get_peft_model(base, p_tuning_config(case, **cfg))
    if patched:
        patch(model)
    return model


def encoder(model, name="default"):
    return model.prompt_encoder[name]


def logits(model, batch):
    return model(**batch).logits


@pytest.fixture
def restore_peft():
    """Always leave PEFT unpatched, even when a test fails."""
    yield
    unpatch_peft()
    assert not is_peft_patched()


# ------------------------------------------------------------ same numbers
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_same_logits(case):
    ref, fast = make(case), make(case, patched=True)
    assert type(encoder(fast)) is ptfast.PromptEncoder
    assert type(encoder(ref)) is PeftPromptEncoder
    batch = case.batch()
    torch.testing.assert_close(logits(fast, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)  # grad path
    fast.eval(), ref.eval()
    with torch.no_grad():  # cached-table path
        for _ in range(2):
            torch.testing.assert_close(logits(fast, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        fast.get_prompt_embedding_to_save("default"), ref.get_prompt_embedding_to_save("default"), rtol=1e-6, atol=1e-7
    )


def train(model, case, steps=5, optimizer=None, on_step=None):
    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        loss = model(**case.batch(seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_same_training_losses(case):
    ref, fast = make(case), make(case, patched=True)
    ref_losses, fast_losses = train(ref, case), train(fast, case)
    assert ref_losses[-1] != ref_losses[0]  # it trains
    assert fast_losses == pytest.approx(ref_losses, rel=1e-5)
    for (n1, p1), (n2, p2) in zip(encoder(ref).named_parameters(), encoder(fast).named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6)


def test_eval_between_training_steps_sees_new_weights():
    """Evaluation (no_grad, cached table) interleaved with training: the cache must follow every optimizer step."""
    ref, fast = make(LLAMA), make(LLAMA, patched=True)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, fast)]
    batch = LLAMA.batch(seed=99)
    previous = None
    for step in range(3):
        for model, opt in zip((ref, fast), opts):
            model.train()
            model(**LLAMA.batch(seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
            model.eval()
        with torch.no_grad():
            out_ref, out_fast = logits(ref, batch), logits(fast, batch)
        torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-6)
        assert previous is None or not torch.equal(out_fast, previous)
        previous = out_fast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    ref, fast = make(LLAMA).to(dtype), make(LLAMA).to(dtype)
    patch(fast)
    assert encoder(fast).embedding.weight.dtype == dtype
    batch = LLAMA.batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(fast, batch), logits(ref, batch), rtol=2e-2, atol=2e-2)
    fast.float(), ref.float()  # .to() after patching drops the cached table
    with torch.no_grad():
        torch.testing.assert_close(logits(fast, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)


def test_same_training_losses_lstm():
    cfg = dict(encoder_reparameterization_type="LSTM", encoder_num_layers=2)
    ref, fast = make(LLAMA, **cfg), make(LLAMA, patched=True, **cfg)
    assert hasattr(encoder(fast), "lstm_head")
    assert train(fast, LLAMA, steps=3) == pytest.approx(train(ref, LLAMA, steps=3), rel=1e-5)
    ref.eval(), fast.eval()
    with torch.no_grad():
        batch = LLAMA.batch()
        torch.testing.assert_close(logits(fast, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)


def test_patch_mid_training_keeps_optimizer_state():
    """Sharing the Parameter objects: an optimizer created before patch() keeps stepping the patched encoder."""
    ref = make(LLAMA)
    ref_losses = train(ref, LLAMA)

    model = make(LLAMA)
    params_before = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params_before.values()), lr=1e-2)

    def on_step(step):
        if step == 1:
            patch(model)
            assert type(encoder(model)) is ptfast.PromptEncoder
            now = {n: p for n, p in model.named_parameters() if p.requires_grad}
            assert now.keys() == params_before.keys()
            assert all(now[n] is params_before[n] for n in now)
            assert all(len(optimizer.state[p]) > 0 for p in now.values())  # AdamW state found by identity

    assert train(model, LLAMA, optimizer=optimizer, on_step=on_step) == pytest.approx(ref_losses, rel=1e-5)


@pytest.mark.parametrize("case", GEN_CASES, ids=repr)
def test_same_generate(case):
    ref, fast = make(case).eval(), make(case, patched=True).eval()
    batch = case.batch()
    kwargs = dict(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5, do_sample=False
    )
    with torch.no_grad():
        # PEFT's KV-cached generate is wrong for decoder-only P-tuning (tests/test_generation.py); its
        # use_cache=False path is the reference. The patched model runs its fixed KV-cached generate.
        out_ref, out_fast = ref.generate(**kwargs, use_cache=False), fast.generate(**kwargs)
    assert out_ref.shape[1] > (SEQ if case.task_type == TaskType.CAUSAL_LM else 1)
    assert torch.equal(out_fast, out_ref)


def test_state_dict_and_trainable_parameters_unchanged():
    ref, fast = make(LLAMA), make(LLAMA, patched=True)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert fast.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    outs = []
    for model in (ref, fast):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            model.print_trainable_parameters()
        outs.append(buf.getvalue())
    assert outs[0] == outs[1] and outs[0].startswith("trainable params: ")


def _printed_trainable_parameters(model):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


@pytest.mark.parametrize("mode", ["unpatched", "patch", "patch_peft"])
def test_bloomz_560m_trainable_parameters(mode, restore_peft):
    """PEFT's P-tuning example numbers for bigscience/bloomz-560m, on a meta-device model of that shape."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)
    with torch.device("meta"):
        base = BloomForCausalLM(config)
    if mode == "patch_peft":
        patch_peft()
    model = get_peft_model(
        base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, encoder_hidden_size=128)
    )
    if mode == "patch":
        patch(model)
    expected_type = PeftPromptEncoder if mode == "unpatched" else ptfast.PromptEncoder
    assert type(encoder(model)) is expected_type
    assert _printed_trainable_parameters(model) == (
        "trainable params: 300,288 || all params: 559,514,880 || trainable%: 0.0537"
    )


# ------------------------------------------------------------ types, idempotence
@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
def test_patch_unpatch_types_identity_and_idempotence(encoder_type):
    model = make(LLAMA, encoder_reparameterization_type=encoder_type)
    batch = LLAMA.batch()
    expected = logits(model, batch)
    peft_enc = encoder(model)
    params = dict(peft_enc.named_parameters())
    assert patch(model) is model
    fast_enc = encoder(model)
    assert type(fast_enc) is ptfast.PromptEncoder
    assert all(p is params[n] for n, p in fast_enc.named_parameters())
    assert patch(model) is model and encoder(model) is fast_enc  # idempotent

    assert unpatch(model) is model
    restored = encoder(model)
    assert type(restored) is PeftPromptEncoder
    assert all(p is params[n] for n, p in restored.named_parameters())
    assert unpatch(model) is model and encoder(model) is restored  # idempotent
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-6)


def test_patch_preserves_dtype_device_requires_grad_and_mode():
    model = make(LLAMA).to(torch.bfloat16)
    enc = encoder(model)
    enc.mlp_head[0].weight.requires_grad_(False)
    enc.eval()
    patch(model)
    fast = encoder(model)
    assert not fast.training and not fast.mlp_head.training
    for (n, p), (n2, q) in zip(enc.named_parameters(), fast.named_parameters()):
        assert n == n2 and p is q and q.dtype == torch.bfloat16 and q.device == p.device
    assert not fast.mlp_head[0].weight.requires_grad and fast.mlp_head[2].weight.requires_grad
    fast.train()
    unpatch(model)
    assert encoder(model).training


def test_patch_all_p_tuning_adapters():
    ref, fast = make(LLAMA), make(LLAMA)
    for model in (ref, fast):
        torch.manual_seed(7)
        model.add_adapter("second", p_tuning_config(LLAMA, num_virtual_tokens=3))
    patch(fast)
    assert {type(m) for m in fast.prompt_encoder.values()} == {ptfast.PromptEncoder}
    batch = LLAMA.batch()
    for name in ("default", "second"):
        ref.set_adapter(name), fast.set_adapter(name)
        torch.testing.assert_close(logits(fast, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)
    unpatch(fast)
    assert {type(m) for m in fast.prompt_encoder.values()} == {PeftPromptEncoder}


def test_adapters_added_after_patch_are_ptfast_until_unpatch(restore_peft):
    ref, fast = make(LLAMA), make(LLAMA, patched=True)
    for model in (ref, fast):
        torch.manual_seed(7)  # PEFT builds the encoder first, so the same seed gives the same weights
        model.add_adapter("second", p_tuning_config(LLAMA, num_virtual_tokens=3))
    assert type(encoder(fast, "second")) is ptfast.PromptEncoder
    assert type(encoder(ref, "second")) is PeftPromptEncoder  # only the patched instance converts
    ref.set_adapter("second"), fast.set_adapter("second")
    batch = LLAMA.batch()
    torch.testing.assert_close(logits(fast, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)

    unpatch(fast)
    fast.add_adapter("third", p_tuning_config(LLAMA))
    assert {type(m) for m in fast.prompt_encoder.values()} == {PeftPromptEncoder}

    patch_peft()  # a model built under patch_peft converts later adapters after unpatch_peft too, like patch(model)
    built = make(LLAMA)
    unpatch_peft()
    built.add_adapter("second", p_tuning_config(LLAMA))
    assert type(encoder(built, "second")) is ptfast.PromptEncoder


def test_forward_hooks_on_the_encoder_are_carried_over():
    model = make(LLAMA)
    calls = []
    handle = encoder(model).register_forward_hook(lambda mod, args, out: calls.append(type(mod)))
    patch(model)
    model(**LLAMA.batch())
    assert calls == [ptfast.PromptEncoder]
    unpatch(model)
    model(**LLAMA.batch())
    assert calls == [ptfast.PromptEncoder, PeftPromptEncoder]
    handle.remove()
    model(**LLAMA.batch())
    assert len(calls) == 2


def test_type_errors():
    with pytest.raises(TypeError, match="expects a peft.PeftModel"):
        patch(tiny_llama_causal_lm())
    with pytest.raises(TypeError, match="expects a peft.PeftModel"):
        unpatch("not a model")
    with pytest.raises(TypeError, match="torch.compile"):
        patch(torch.compile(make(LLAMA)))


def test_data_parallel_wrapper_is_unwrapped():
    model = make(LLAMA)
    wrapped = torch.nn.DataParallel(model)
    assert patch(wrapped) is wrapped
    assert type(encoder(model)) is ptfast.PromptEncoder


def test_peft_rejects_mixing_prompt_learning_types():
    """PEFT 0.21 refuses a P-tuning adapter next to another PEFT type, so a model holds P-tuning or nothing to patch."""
    model = make(LLAMA)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_prompt_tuning_keeps_its_encoder_and_gets_the_generate_fix():
    """patch takes every prompt-learning method: prompt tuning keeps PEFT's encoder and gets the fixed generate
    where the installed PEFT generates wrongly for it (test_generation_methods.py checks what it generates)."""
    from ptfast.integrations import generation

    model = get_peft_model(tiny_llama_causal_lm(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    enc = encoder(model)
    assert patch(model) is model
    assert encoder(model) is enc
    assert ("generate" in model.__dict__) == generation.peft_generate_is_broken("PROMPT_TUNING")
    assert "_setup_prompt_encoder" in model.__dict__  # adapters added later are handled too
    unpatch(model)
    assert encoder(model) is enc
    assert "generate" not in model.__dict__ and "_setup_prompt_encoder" not in model.__dict__


def _prefix_model(case=LLAMA, *, seed=0, **cfg):
    base = case.builder()
    torch.manual_seed(seed)
    return get_peft_model(
        base, PrefixTuningConfig(task_type=case.task_type, num_virtual_tokens=NUM_VIRTUAL_TOKENS, **cfg)
    )


PREFIX_CONFIGS = {"table": {}, "projection": dict(prefix_projection=True, encoder_hidden_size=ENCODER_HIDDEN)}


@pytest.mark.parametrize("case", [LLAMA, BLOOM, T5], ids=repr)
@pytest.mark.parametrize("kind", PREFIX_CONFIGS)
def test_patch_swaps_prefix_encoders_keeping_parameters(case, kind):
    """Prefix tuning / P-tuning v2: patch puts a ptfast.PrefixEncoder in, holding PEFT's very Parameter objects (same
    state_dict, same logits, same gradients); unpatch puts PEFT's PrefixEncoder back with them."""
    from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder

    from ptfast.integrations import generation

    ref, model = _prefix_model(case, **PREFIX_CONFIGS[kind]), _prefix_model(case, **PREFIX_CONFIGS[kind])
    peft_enc = encoder(model)
    params = dict(peft_enc.named_parameters())
    keys = list(model.state_dict())
    hook_calls = []
    peft_enc.register_forward_hook(lambda *a: hook_calls.append(1))
    patch(model)
    patch(model)  # idempotent
    fast = encoder(model)
    assert type(fast) is ptfast.PrefixEncoder
    assert dict(fast.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in fast.named_parameters())
    assert fast.training == peft_enc.training
    assert list(model.state_dict()) == keys
    assert ("generate" in model.__dict__) == generation.peft_generate_is_broken("PREFIX_TUNING")
    batch = case.batch()
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)
    assert hook_calls  # the encoder's forward hook came along
    logits(model, batch).float().pow(2).mean().backward()
    logits(ref, batch).float().pow(2).mean().backward()
    for (name, p), (_, q) in zip(encoder(model).named_parameters(), encoder(ref).named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)

    unpatch(model)
    unpatch(model)  # idempotent
    back = encoder(model)
    assert type(back) is PeftPrefixEncoder
    assert back.prefix_projection == peft_enc.prefix_projection
    assert all(p is params[n] for n, p in back.named_parameters())
    assert list(model.state_dict()) == keys
    assert "generate" not in model.__dict__
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", PREFIX_CONFIGS)
def test_patch_swaps_a_loaded_inference_mode_prefix_encoder(tmp_path, kind):
    """PeftModel.from_pretrained loads prefix tuning in inference mode (the table only, even with a projection)."""
    trained = _prefix_model(**PREFIX_CONFIGS[kind])
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path)
    batch = LLAMA.batch()
    with torch.no_grad():
        want = logits(loaded, batch)
        patch(loaded)
        assert type(encoder(loaded)) is ptfast.PrefixEncoder
        torch.testing.assert_close(logits(loaded, batch), want, rtol=1e-5, atol=1e-6)
        unpatch(loaded)
        assert type(encoder(loaded)).__name__ == "PrefixEncoder"
        torch.testing.assert_close(logits(loaded, batch), want, rtol=1e-5, atol=1e-6)


def test_prefix_encoders_under_patch_peft_and_added_later(restore_peft):
    patch_peft()
    model = _prefix_model(**PREFIX_CONFIGS["projection"])
    assert type(encoder(model)) is ptfast.PrefixEncoder
    unpatch_peft()
    model.add_adapter("second", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert type(encoder(model, "second")) is ptfast.PrefixEncoder  # a patched model converts adapters added later
    assert type(encoder(_prefix_model())).__name__ == "PrefixEncoder" and not isinstance(
        encoder(_prefix_model()), ptfast.PrefixEncoder
    )  # unpatched PEFT builds its own again


def test_prompt_learning_types_ptfast_does_not_handle_raise():
    model = get_peft_model(
        tiny_llama_causal_lm(),
        CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7], cpt_mask=[1, 1, 1], cpt_tokens_type_mask=[1, 2, 2]),
    )
    with pytest.raises(ValueError, match=r"no prompt-learning adapter ptfast handles \(found \{'default': 'CPT'\}\)"):
        patch(model)
    with pytest.raises(ValueError, match="no prompt-learning adapter"):
        unpatch(model)
    assert "generate" not in model.__dict__


def test_lora_model_raises():
    model = get_peft_model(tiny_llama_causal_lm(), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="'default': 'LORA'"):
        patch(model)


def test_ptfast_encoder_has_every_base_prompt_encoder_hook():
    """Canary for PEFT upgrades: PEFT calls these on (or via) the encoder; a new one must be handled by ptfast."""
    from peft.tuners.tuners_utils import BasePromptEncoder

    hooks = {
        name
        for name in vars(BasePromptEncoder)
        if callable(getattr(BasePromptEncoder, name)) and not name.startswith("__")
    }
    classmethods = {name for name in hooks if isinstance(vars(BasePromptEncoder)[name], classmethod)}
    # Classmethods are called on PEFT_TYPE_TO_TUNER_MAPPING[P_TUNING], which stays PEFT's class.
    assert classmethods == {
        "_get_adapter_state_dict",
        "_remove_adapter_name_from_key",
        "_remap_adapter_state_dict_for_load",
    }
    instance_hooks = hooks - classmethods
    assert instance_hooks == {"_load_adapter_state_dict"}
    for name in instance_hooks:
        assert callable(getattr(ptfast.PromptEncoder, name, None)), name
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.P_TUNING] is PeftPromptEncoder


# ------------------------------------------------------------ patch_peft
def test_patch_peft_before_the_generate_probe_has_run(restore_peft):
    """The first get_peft_model under patch_peft asks whether PEFT's generate is broken; the probe builds its own
    P-tuned model through the same patched setup (it recursed until RecursionError)."""
    from ptfast.integrations import generation

    generation._probe.cache_clear()  # as in a fresh process
    patch_peft()
    model = make(LLAMA)
    assert type(encoder(model)) is ptfast.PromptEncoder
    assert ("generate" in model.__dict__) == generation.peft_generate_is_broken()
    assert generation._probe.cache_info().currsize == 1  # probed once, not per nested call


def test_patch_peft_get_peft_model_and_from_pretrained(tmp_path, restore_peft):
    ref = make(LLAMA)
    ref.save_pretrained(tmp_path)

    patch_peft()
    patch_peft()  # idempotent
    assert is_peft_patched()
    fast = make(LLAMA)  # same seed: PEFT builds first, so the weights are the same as without the patch
    assert type(encoder(fast)) is ptfast.PromptEncoder
    for (n, p), (_, q) in zip(encoder(ref).named_parameters(), encoder(fast).named_parameters()):
        assert torch.equal(p, q), n
    torch.manual_seed(3)
    fast.add_adapter("second", p_tuning_config(LLAMA))
    assert type(encoder(fast, "second")) is ptfast.PromptEncoder

    loaded = PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path)
    assert type(encoder(loaded)) is ptfast.PromptEncoder
    ref.eval()
    with torch.no_grad():
        batch = LLAMA.batch()
        torch.testing.assert_close(logits(loaded, batch), logits(ref, batch), rtol=1e-5, atol=1e-6)

    other = get_peft_model(tiny_llama_causal_lm(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert type(encoder(other)).__name__ == "PromptEmbedding"  # other prompt-learning types untouched

    unpatch_peft()
    unpatch_peft()  # idempotent
    assert not is_peft_patched()
    assert type(encoder(make(LLAMA))) is PeftPromptEncoder
    assert type(encoder(PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path))) is PeftPromptEncoder
    assert type(encoder(fast)) is ptfast.PromptEncoder  # existing models keep their encoders
    unpatch(fast)
    assert type(encoder(fast)) is PeftPromptEncoder


# ------------------------------------------------------------ checkpoints
def saved_tensors(directory):
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def files(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("case", [LLAMA, T5], ids=repr)
@pytest.mark.parametrize(
    "src_patched,dst_patched",
    [(True, False), (False, True), (True, True)],
    ids=["ptfast->peft", "peft->ptfast", "ptfast->ptfast"],
)
def test_save_load_round_trip(case, src_patched, dst_patched, tmp_path):
    src = make(case, patched=src_patched)
    train(src, case, steps=2)
    src.eval()
    src.save_pretrained(tmp_path / "src")

    # The same weights saved by PEFT itself (unpatch/patch shares the parameters, so nothing else changes).
    (unpatch if src_patched else patch)(src)
    src.save_pretrained(tmp_path / "other")
    (patch if src_patched else unpatch)(src)
    assert (
        files(tmp_path / "src")
        == files(tmp_path / "other")
        == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    )
    a, b = saved_tensors(tmp_path / "src"), saved_tensors(tmp_path / "other")
    assert list(a) == list(b) == ["prompt_embeddings"]
    n_tokens = NUM_VIRTUAL_TOKENS * (2 if case is T5 else 1)
    assert (
        a["prompt_embeddings"].shape
        == b["prompt_embeddings"].shape
        == (n_tokens, src.config.hidden_size if case is LLAMA else src.config.d_model)
    )
    assert a["prompt_embeddings"].dtype == b["prompt_embeddings"].dtype == torch.float32
    torch.testing.assert_close(a["prompt_embeddings"], b["prompt_embeddings"], rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "src" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "other" / "adapter_config.json").read_text()
    )

    dst = PeftModel.from_pretrained(case.builder(), tmp_path / "src")
    assert dst.peft_config["default"].inference_mode
    flags = {n: p.requires_grad for n, p in encoder(dst).named_parameters()}
    assert list(flags) == ["embedding.weight"]  # inference mode: no head
    if dst_patched:
        patch(dst)
        assert type(encoder(dst)) is ptfast.PromptEncoder
        assert not hasattr(encoder(dst), "mlp_head")
        assert {n: p.requires_grad for n, p in encoder(dst).named_parameters()} == flags
    else:
        assert type(encoder(dst)) is PeftPromptEncoder
    batch = case.batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(dst, batch), logits(src, batch), rtol=1e-5, atol=1e-6)
        if case.generates:
            kw = dict(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=4,
                do_sample=False,
                use_cache=False,
            )  # the path plain PEFT gets right (test_generation.py)
            assert torch.equal(dst.generate(**kw), src.generate(**kw))

    # and the loaded model saves the same checkpoint again (inference mode: embedding.weight is the table)
    dst.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(saved_tensors(tmp_path / "again")["prompt_embeddings"], a["prompt_embeddings"])


def test_load_adapter_into_patched_encoder_uses_the_hook(tmp_path, monkeypatch):
    """PEFT 0.21 loads prompt_embeddings via encoder._load_adapter_state_dict; a patched encoder receives it."""
    src = make(LLAMA)
    src.save_pretrained(tmp_path)
    table = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]

    calls = []
    original = ptfast.PromptEncoder._load_adapter_state_dict

    def spy(self, state_dict):
        calls.append(sorted(state_dict))
        return original(self, state_dict)

    monkeypatch.setattr(ptfast.PromptEncoder, "_load_adapter_state_dict", spy)

    # inference-mode adapter added to a patched model: patch() converts adapters added later, before PEFT loads them
    dst = make(LLAMA, patched=True, seed=1)
    dst.load_adapter(tmp_path, "loaded")
    assert calls == [["prompt_embeddings"]]
    assert type(encoder(dst, "loaded")) is ptfast.PromptEncoder
    torch.testing.assert_close(encoder(dst, "loaded").table(), table)
    calls.clear()

    # loading into an existing, already patched (trainable) adapter goes through the hook on the ptfast encoder
    cached = encoder(dst).table()  # warm the cache: the load must invalidate it
    dst.load_adapter(tmp_path, "default")
    assert calls == [["prompt_embeddings"]]
    torch.testing.assert_close(encoder(dst).embedding.weight.detach(), table)
    assert not torch.equal(encoder(dst).table(), cached)

    # under patch_peft, PeftModel.from_pretrained loads straight into a ptfast encoder
    patch_peft()
    try:
        loaded = PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path)
    finally:
        unpatch_peft()
    assert type(encoder(loaded)) is ptfast.PromptEncoder
    assert calls == [["prompt_embeddings"]] * 2
    torch.testing.assert_close(encoder(loaded).embedding.weight.detach(), table)


def test_peft_resume_semantics(tmp_path):
    """What PEFT 0.21 does with a P-tuning checkpoint when asked to train again (documented in the module)."""
    src = make(LLAMA)
    train(src, LLAMA, steps=2)
    src.save_pretrained(tmp_path)
    table = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]

    for load in (
        lambda: PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path, is_trainable=True),
        lambda: make(LLAMA).load_adapter(tmp_path, "new", is_trainable=True),
    ):
        with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
            load()

    # The route left: a fresh trainable adapter, then load the table into it. The head stays fresh, so the prompts
    # become fresh_mlp(saved_table), not the trained ones. Same with ptfast.
    for patched in (False, True):
        model = make(LLAMA, patched=patched, seed=1)
        model.load_adapter(tmp_path, "default", is_trainable=True)
        assert torch.equal(encoder(model).embedding.weight.detach(), table)
        assert not torch.allclose(model.get_prompt_embedding_to_save("default"), table, atol=1e-3)


# ------------------------------------------------------------ full encoder state
@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
def test_full_encoder_state_resume(tmp_path, encoder_type):
    cfg = dict(encoder_reparameterization_type=encoder_type)
    src = make(LLAMA, patched=True, **cfg)
    optimizer = torch.optim.AdamW([p for p in src.parameters() if p.requires_grad], lr=1e-2)
    train(src, LLAMA, steps=2, optimizer=optimizer)
    src.save_pretrained(tmp_path)
    paths = save_encoder_state(src, tmp_path)
    assert paths == [str(tmp_path / ENCODER_STATE_FILE)]
    assert files(tmp_path) == ["README.md", "adapter_config.json", "adapter_model.safetensors", ENCODER_STATE_FILE]
    with safe_open(paths[0], "pt") as f:
        assert sorted(f.keys()) == sorted(encoder(src).state_dict())
        assert f.metadata()["encoder_type"] == encoder_type

    # plain PEFT still loads the directory and ignores the extra file
    plain = PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path)
    assert type(encoder(plain)) is PeftPromptEncoder
    torch.testing.assert_close(encoder(plain).embedding.weight, src.get_prompt_embedding_to_save("default"))

    restored = load_for_training(tiny_llama_causal_lm(), tmp_path)
    assert type(encoder(restored)) is ptfast.PromptEncoder
    assert not restored.peft_config["default"].inference_mode
    for (n, p), (n2, q) in zip(encoder(src).named_parameters(), encoder(restored).named_parameters()):
        assert n == n2 and q.requires_grad
        assert torch.equal(p, q), n
    assert torch.equal(restored.get_prompt_embedding_to_save("default"), src.get_prompt_embedding_to_save("default"))

    # get_peft_model + load_encoder_state on an unpatched model gives the same encoder
    config = PeftConfig.from_pretrained(tmp_path)
    config.inference_mode = False
    manual = get_peft_model(tiny_llama_causal_lm(), config)
    load_encoder_state(manual, tmp_path)
    assert type(encoder(manual)) is PeftPromptEncoder
    assert torch.equal(manual.get_prompt_embedding_to_save("default"), src.get_prompt_embedding_to_save("default"))

    # training continues identically (the optimizer state is the user's business: fresh AdamW on both sides)
    src_opt = torch.optim.AdamW([p for p in src.parameters() if p.requires_grad], lr=1e-2)
    assert train(restored, LLAMA, steps=2) == pytest.approx(train(src, LLAMA, steps=2, optimizer=src_opt), rel=1e-5)


def test_full_encoder_state_non_default_adapter_and_errors(tmp_path):
    model = make(LLAMA, patched=True)
    torch.manual_seed(5)
    model.add_adapter("second", p_tuning_config(LLAMA, num_virtual_tokens=3))
    model.save_pretrained(tmp_path, selected_adapters=["default", "second"])
    paths = save_encoder_state(model, tmp_path)
    assert paths == [str(tmp_path / ENCODER_STATE_FILE), str(tmp_path / "second" / ENCODER_STATE_FILE)]
    assert save_encoder_state(model, tmp_path / "x", is_main_process=False) == []
    assert not (tmp_path / "x").exists()

    restored = load_for_training(tiny_llama_causal_lm(), tmp_path / "second", adapter_name="second")
    assert torch.equal(restored.get_prompt_embedding_to_save("second"), model.get_prompt_embedding_to_save("second"))

    # load into a model that has both adapters (fresh weights), selected adapters only
    other = make(LLAMA, seed=9)
    other.add_adapter("second", p_tuning_config(LLAMA, num_virtual_tokens=3))
    load_encoder_state(other, tmp_path, selected_adapters=["second"])
    assert torch.equal(other.get_prompt_embedding_to_save("second"), model.get_prompt_embedding_to_save("second"))
    assert not torch.equal(other.get_prompt_embedding_to_save("default"), model.get_prompt_embedding_to_save("default"))
    with pytest.raises(ValueError, match="unknown adapter"):
        load_encoder_state(other, tmp_path, selected_adapters=["nope"])

    inference_only = PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path)
    with pytest.raises(ValueError, match="inference-only encoder"):
        load_encoder_state(inference_only, tmp_path)

    os.remove(tmp_path / ENCODER_STATE_FILE)
    with pytest.raises(FileNotFoundError, match="only the reparameterized table"):
        load_for_training(tiny_llama_causal_lm(), tmp_path)
    with pytest.raises(ValueError, match="no P-tuning adapter"):
        save_encoder_state(
            get_peft_model(tiny_llama_causal_lm(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)),
            tmp_path,
        )


def test_load_encoder_state_keeps_parameter_objects_and_refreshes_cache(tmp_path):
    src = make(LLAMA, patched=True)
    train(src, LLAMA, steps=1)
    save_encoder_state(src, tmp_path)
    dst = make(LLAMA, patched=True, seed=3).eval()
    params = dict(encoder(dst).named_parameters())
    with torch.no_grad():
        stale = encoder(dst).table().clone()  # cached
    load_encoder_state(dst, tmp_path)
    assert all(p is params[n] for n, p in encoder(dst).named_parameters())
    with torch.no_grad():
        fresh = encoder(dst).table()
    assert not torch.equal(fresh, stale)
    torch.testing.assert_close(fresh, src.get_prompt_embedding_to_save("default"), rtol=1e-6, atol=1e-7)


def test_no_warnings_on_patch():
    model = make(LLAMA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch(model)
        unpatch(model)
