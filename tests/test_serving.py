"""PromptBank against PEFT: mixed-adapter batches give PEFT's per-adapter logits, loss and greedy generations.

PEFT notes (peft 0.21.2 + transformers 5.x, as installed here):
* The models are in eval mode; adapters added with ``add_adapter`` are in training mode (prompts come from the MLP/LSTM
  head), adapters loaded with ``from_pretrained``/``load_adapter`` are in inference mode (prompts are
  ``embedding.weight``). Both are covered.
* ``PeftModel.generate`` with the KV cache is wrong for P-tuning on transformers 5: the cache reaches
  ``prepare_inputs_for_generation`` as ``cache`` (no longer ``past_key_values``), so PEFT re-prepends the prompt at
  every decoding step. Its ``use_cache=False`` path and a greedy loop over PEFT's ``forward`` are correct and agree;
  generation through PromptBank (with the KV cache) is compared with those.
"""

import collections
import copy
import io
import pickle
import sys
import threading
import time

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from ptfast.config import PromptEncoderConfig  # noqa: E402
from ptfast.encoder import PromptEncoder  # noqa: E402
from ptfast.errors import UnknownAdapterError  # noqa: E402
from ptfast.ops.prepend import prepend_prompts_reference  # noqa: E402
from ptfast.serving import PromptBank  # noqa: E402
from tests.helpers.models import greedy_margin, tiny_llama_causal_lm  # noqa: E402

V, L = 128, 9


def _base():
    return tiny_llama_causal_lm(vocab_size=V)  # seeds torch itself


def _pconfig(T, **kw):
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, **kw)


@pytest.fixture(scope="module")
def trained_mode_model():
    """Adapters a (MLP), b (LSTM) with T=6 and c (MLP) with T=4, all in training mode (reparameterized)."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(_base(), _pconfig(6, encoder_hidden_size=32), adapter_name="a")
    pm.add_adapter("b", _pconfig(6, encoder_hidden_size=48, encoder_reparameterization_type="LSTM"))
    pm.add_adapter("c", _pconfig(4, encoder_hidden_size=16))
    return pm.eval()


@pytest.fixture(scope="module")
def loaded_model(trained_mode_model, tmp_path_factory):
    """The same adapters saved and loaded back with from_pretrained + load_adapter (inference mode)."""
    d = tmp_path_factory.mktemp("adapters")
    trained_mode_model.save_pretrained(str(d), selected_adapters=["a", "b", "c"])
    pm = peft.PeftModel.from_pretrained(_base(), str(d / "a") if (d / "a").exists() else str(d), adapter_name="a")
    for name in ("b", "c"):
        pm.load_adapter(str(d / name), adapter_name=name)
    assert all(pm.peft_config[n].inference_mode for n in "abc")
    return pm.eval()


@pytest.fixture(params=["trained", "loaded"])
def peft_model(request, trained_mode_model, loaded_model):
    return trained_mode_model if request.param == "trained" else loaded_model


def _batch(B=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    ids[1, :3] = 0
    return ids, mask


NAMES = ["a", "b", "a", "b", "b", "a"]


@torch.no_grad()
def test_mixed_batch_logits_equal_peft(peft_model):
    bank = PromptBank.from_peft_model(peft_model)
    ids, mask = _batch()
    kw = bank.prepare_inputs(ids, NAMES, attention_mask=mask)
    assert set(kw) == {"inputs_embeds", "attention_mask"}
    ours = peft_model.get_base_model()(**kw).logits
    for name in ("a", "b"):
        peft_model.set_adapter(name)
        rows = [i for i, n in enumerate(NAMES) if n == name]
        # Same batch shape through PEFT: the rows of this adapter are bit-identical.
        full = peft_model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(full[rows], ours[rows]), name
        for i in rows:  # each row alone through PEFT (different batch shape: BLAS may round differently)
            single = peft_model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
            torch.testing.assert_close(single[0], ours[i], rtol=1e-5, atol=1e-5)
    peft_model.set_adapter("a")


@torch.no_grad()
def test_inputs_embeds_and_mask_are_pefts(peft_model):
    bank = PromptBank.from_peft_model(peft_model)
    ids, mask = _batch()
    kw = bank.prepare_inputs(ids, "b", attention_mask=mask)
    peft_model.set_adapter("b")
    prompts = peft_model.get_prompt(batch_size=ids.shape[0])
    embeds = peft_model.word_embeddings(ids)
    assert torch.equal(kw["inputs_embeds"], torch.cat((prompts.to(embeds.dtype), embeds), dim=1))
    ref_mask = torch.cat((torch.ones(ids.shape[0], 6), mask), dim=1)
    assert kw["attention_mask"].dtype == ref_mask.dtype == torch.float32
    assert torch.equal(kw["attention_mask"], ref_mask)
    peft_model.set_adapter("a")


@torch.no_grad()
def test_labels_and_loss_equal_peft(peft_model):
    bank = PromptBank.from_peft_model(peft_model)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    peft_model.set_adapter("a")
    ref = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    kw = bank.prepare_inputs(ids, ["a"] * ids.shape[0], attention_mask=mask, labels=labels)
    assert torch.equal(kw["labels"][:, :6], torch.full((ids.shape[0], 6), -100))
    ours = peft_model.get_base_model()(**kw).loss
    assert torch.equal(ours, ref)


def _greedy_peft_forward(pm, name, ids, mask, steps):
    pm.set_adapter(name)
    cur, m = ids, mask
    for _ in range(steps):
        nxt = pm(input_ids=cur, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        cur, m = torch.cat([cur, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return cur[:, ids.shape[1] :]


@torch.no_grad()
def test_greedy_generate_equals_peft(peft_model):
    bank = PromptBank.from_peft_model(peft_model)
    ids, mask = _batch()
    steps = 8
    base = peft_model.get_base_model()
    gen_kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    out = base.generate(
        **bank.prepare_inputs(ids, NAMES, attention_mask=mask),
        output_scores=True,
        return_dict_in_generate=True,
        **gen_kw,
    )
    ours = out.sequences
    assert ours.shape == (ids.shape[0], steps)  # inputs_embeds only: generate returns the new tokens
    # Other batch shapes below (BLAS may round differently): equal tokens need decisions far from ties.
    assert greedy_margin(out.scores) > 1e-4  # measured 2.4e-3 (AMD EPYC); fp32 rounding moves logits ~1e-7
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        peft_model.set_adapter(name)
        ref = peft_model.generate(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False, **gen_kw)
        assert torch.equal(ref[:, L:], ours[rows]), name
        assert torch.equal(_greedy_peft_forward(peft_model, name, ids[rows], mask[rows], steps), ours[rows])
    peft_model.set_adapter("a")


def test_table_sources(trained_mode_model, loaded_model):
    bank = PromptBank.from_peft_model(loaded_model)
    for n in "abc":  # inference mode: the table is embedding.weight
        assert torch.equal(bank.table(n), loaded_model.prompt_encoder[n].embedding.weight)
    bank = PromptBank.from_peft_model(trained_mode_model)
    assert bank.num_virtual_tokens("a") == 6 and bank.num_virtual_tokens("c") == 4
    assert set(bank.names) == {"a", "b", "c"} and len(bank) == 3 and "b" in bank
    with torch.no_grad():
        trained_mode_model.set_adapter("c")
        assert torch.equal(bank.table("c"), trained_mode_model.get_prompt(1)[0])
        trained_mode_model.set_adapter("a")
    # the saved table of a training-mode adapter is what the loaded one uses (PEFT computed it with grad enabled;
    # torch's CPU LSTM rounds differently with and without grad, hence not bitwise for the LSTM adapter "b")
    loaded = PromptBank.from_peft_model(loaded_model)
    assert torch.equal(bank.table("a"), loaded.table("a"))
    torch.testing.assert_close(bank.table("b"), loaded.table("b"), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_patched_model(trained_mode_model):
    """A model whose encoders were swapped for ptfast.PromptEncoder (ptfast.patch, or by hand) gives the same bank."""
    ref = PromptBank.from_peft_model(trained_mode_model)
    pm = peft.get_peft_model(_base(), _pconfig(6, encoder_hidden_size=32), adapter_name="a")
    pm.add_adapter("b", _pconfig(6, encoder_hidden_size=48, encoder_reparameterization_type="LSTM"))
    pm.add_adapter("c", _pconfig(4, encoder_hidden_size=16))
    pm.load_state_dict(trained_mode_model.state_dict())
    pm.eval()
    try:
        from ptfast.integrations.peft import patch
    except ImportError:  # pragma: no cover - integration not present
        for n in "abc":
            pm.prompt_encoder[n] = PromptEncoder.from_peft(pm.prompt_encoder[n])
    else:
        patch(pm)
    assert all(isinstance(pm.prompt_encoder[n], PromptEncoder) for n in "abc")
    bank = PromptBank.from_peft_model(pm)
    for n in "abc":
        torch.testing.assert_close(bank.table(n), ref.table(n), rtol=1e-6, atol=1e-6)
    ids, mask = _batch()
    ours = pm.get_base_model()(**bank.prepare_inputs(ids, NAMES, attention_mask=mask)).logits
    pm.set_adapter("b")
    rows = [i for i, n in enumerate(NAMES) if n == "b"]
    torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits[rows], ours[rows], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ registry
def test_mixed_virtual_token_lengths_rejected(trained_mode_model):
    bank = PromptBank.from_peft_model(trained_mode_model)
    ids, _ = _batch(B=3)
    with pytest.raises(ValueError, match=r"different num_virtual_tokens.*num_virtual_tokens=4: \['c'\]"):
        bank.prepare_inputs(ids, ["a", "c", "b"])
    assert bank.prepare_inputs(ids, "c")["inputs_embeds"].shape == (3, 4 + L, 64)


def test_bad_requests(trained_mode_model):
    bank = PromptBank.from_peft_model(trained_mode_model)
    ids, mask = _batch(B=3)
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        bank.prepare_inputs(ids, ["a", "zz", "a"])
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        bank.prepare_inputs(ids, "zz")
    with pytest.raises(ValueError, match="2 adapter names for 3 rows"):
        bank.prepare_inputs(ids, ["a", "a"])
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        bank.prepare_inputs(ids, "a", attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        bank.prepare_inputs(ids, "a", labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        bank.prepare_inputs(ids[0], "a")
    bad = ids.clone()
    bad[0, 0] = V
    with pytest.raises(IndexError, match="token id 128 out of range"):
        bank.prepare_inputs(bad, "a")
    with pytest.raises(TypeError, match="strings"):
        bank.prepare_inputs(ids, ["a", 1, "a"])


def test_add_remove_never_stale():
    D = 8
    we = torch.randn(20, D)
    bank = PromptBank(we)
    t = {n: torch.randn(3, D) for n in "xyz"}
    for n in "xyz":
        bank.add(n, t[n])
    bank.add("w", torch.randn(5, D))
    ids = torch.randint(0, 20, (3, 4))
    before = bank.prepare_inputs(ids, ["x", "y", "z"])["inputs_embeds"]
    bank.remove("y")
    with pytest.raises(KeyError):
        bank.prepare_inputs(ids, ["x", "y", "z"])
    out = bank.prepare_inputs(ids, ["z", "x", "z"])["inputs_embeds"]
    for row, n in enumerate(["z", "x", "z"]):
        assert torch.equal(out[row, :3], t[n])
        assert torch.equal(out[row, 3:], we[ids[row]])
    assert torch.equal(before[2, :3], t["z"])
    with pytest.raises(ValueError, match="already exists"):
        bank.add("x", torch.randn(3, D))
    new_x = torch.randn(3, D)
    bank.add("x", new_x, replace=True)
    assert torch.equal(bank.prepare_inputs(ids, "x")["inputs_embeds"][:, :3], new_x.expand(3, -1, -1))
    bank.add("y", t["y"])  # re-added after removal
    assert torch.equal(bank.prepare_inputs(ids, ["y", "z", "x"])["inputs_embeds"][0, :3], t["y"])
    t["z"].zero_()  # the bank copied the table: the caller's later writes do not leak in
    assert not torch.equal(bank.table("z"), t["z"])
    with pytest.raises(KeyError):
        bank.remove("nope")
    with pytest.raises(ValueError, match="width"):
        bank.add("bad", torch.randn(3, D + 1))
    with pytest.raises(TypeError):
        bank.add("bad", [1, 2])
    assert "T=3" in repr(bank) and "T=5" in repr(bank)


def test_dtype_cast_once_and_followed():
    emb = nn.Embedding(30, 8).to(torch.bfloat16)
    enc_table = torch.randn(4, 8)  # fp32 source
    bank = PromptBank(emb)
    bank.add("p", enc_table)
    assert bank.table("p").dtype == torch.bfloat16
    ids = torch.randint(0, 30, (2, 3))
    out = bank.prepare_inputs(ids, "p")["inputs_embeds"]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, :4], enc_table.to(torch.bfloat16).expand(2, -1, -1))
    emb.float()  # seen on the next call: the frozen table is cast again from the bank's fp32 original
    out = bank.prepare_inputs(ids, "p")["inputs_embeds"]
    assert out.dtype == torch.float32 and torch.equal(out[:, :4], enc_table.expand(2, -1, -1))


def _small_encoder(n):
    return PromptEncoder(PromptEncoderConfig(num_virtual_tokens=n, token_dim=8, encoder_hidden_size=8))


def test_add_after_the_embeddings_changed_dtype_recasts_the_others():
    emb = nn.Embedding(30, 8)
    bank = PromptBank(emb)
    bank.add("enc", _small_encoder(4))
    bank.add("frozen", torch.randn(5, 8))
    emb.double()
    bank.add("new", _small_encoder(6))  # before any call has seen the cast
    ids = torch.randint(0, 30, (2, 3))
    for name in ("enc", "frozen", "new"):  # the first two raised "tables have dtype float32"
        assert bank.prepare_inputs(ids, name)["inputs_embeds"].dtype == torch.float64


def test_untracked_encoder_follows_an_embedding_cast():
    with torch.inference_mode():  # inference tensors: no version counters, so the bank cannot track it
        encoder = _small_encoder(4)
    emb = nn.Embedding(30, 8)
    bank = PromptBank(emb)
    bank.add("a", encoder)
    ids = torch.randint(0, 30, (2, 3))
    before = bank.prepare_inputs(ids, "a")["inputs_embeds"]
    emb.double()  # an AttributeError: the encoder was taken for a frozen table and "cast"
    after = bank.prepare_inputs(ids, "a")["inputs_embeds"]
    assert after.dtype == torch.float64
    torch.testing.assert_close(after[:, :4].float(), before[:, :4])


def test_edited_encoder_is_followed_and_data_writes_need_refresh():
    enc = PromptEncoder({"num_virtual_tokens": 3, "token_dim": 8, "encoder_hidden_size": 4})
    bank = PromptBank(torch.randn(10, 8))
    bank.add("e", enc)
    old = bank.table("e").clone()
    with torch.no_grad():
        enc.embedding.weight.add_(1.0)  # bumps the version counter: seen
        assert torch.equal(bank.table("e"), enc.table())
        assert not torch.equal(bank.table("e"), old)
        enc.embedding.weight.data.add_(1.0)  # .data bypasses every counter: refresh() is the way
        enc.invalidate_cache()
        before = bank.table("e").clone()
        bank.refresh()
        assert torch.equal(bank.table("e"), enc.table())
        assert not torch.equal(bank.table("e"), before)


class _ScaledEmbedding(nn.Embedding):
    """Like Gemma's scaled word embedding: the lookup is not the whole forward."""

    def forward(self, input_ids):
        return super().forward(input_ids) * 2.5


def test_scaled_embedding_module_is_called_like_peft():
    emb = _ScaledEmbedding(30, 8)
    bank = PromptBank(emb)
    table = torch.randn(4, 8)
    bank.add("p", table)
    ids = torch.randint(0, 30, (2, 3))
    with torch.no_grad():
        out = bank.prepare_inputs(ids, "p")["inputs_embeds"]
        assert torch.equal(out, torch.cat((table.expand(2, -1, -1), emb(ids)), 1))
    plain = PromptBank(emb.weight.detach())  # a bare weight is a plain lookup (no scaling)
    plain.add("p", table)
    assert torch.equal(
        plain.prepare_inputs(ids, "p")["inputs_embeds"],
        prepend_prompts_reference(ids, emb.weight.detach(), table[None], torch.zeros(2).long()),
    )


def test_from_peft_model_rejects_non_peft_and_filters(trained_mode_model):
    with pytest.raises(TypeError, match="PeftModel"):
        PromptBank.from_peft_model(nn.Linear(2, 2))
    bank = PromptBank.from_peft_model(trained_mode_model, adapters=["b"])
    assert bank.names == ("b",)
    with pytest.raises(KeyError, match="zz"):
        PromptBank.from_peft_model(trained_mode_model, adapters=["zz"])
    w = trained_mode_model.get_base_model().get_input_embeddings().weight
    explicit = PromptBank.from_peft_model(trained_mode_model, word_embeddings=w)
    assert explicit.weight is w


def test_from_peft_model_takes_a_single_adapter_name(trained_mode_model):
    assert PromptBank.from_peft_model(trained_mode_model, adapters="b").names == ("b",)


def test_tables_are_the_eval_mode_ones_even_from_a_training_model():
    """An LSTM head with dropout, model in train mode: the bank serves the deterministic (eval) table."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(
        _base(),
        _pconfig(
            5, encoder_hidden_size=24, encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.5
        ),
    ).train()
    first, second = PromptBank.from_peft_model(pm).table("default"), PromptBank.from_peft_model(pm).table("default")
    assert torch.equal(first, second)
    encoder = pm.prompt_encoder["default"]
    assert encoder.training  # restored
    encoder.eval()
    with torch.no_grad():
        expected = encoder(torch.arange(5).unsqueeze(0))[0]
    torch.testing.assert_close(first, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ never stale
def _fresh_model(patched: bool):
    base = _base()
    torch.manual_seed(3)
    pm = peft.get_peft_model(base, _pconfig(6, encoder_hidden_size=32), adapter_name="a")
    pm.add_adapter("b", _pconfig(6, encoder_hidden_size=16))
    if patched:
        from ptfast.integrations.peft import patch

        patch(pm)
    return pm.eval()


def _peft_logits(pm, name, ids, mask):
    pm.set_adapter(name)
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=mask).logits[:, -L:]


@pytest.mark.parametrize("patched", [False, True], ids=["peft", "patched"])
def test_bank_follows_further_training(patched):
    """Train adapter a further (a fused AdamW step bumps no version counter): the bank serves the new prompts."""
    pm = _fresh_model(patched)
    bank = PromptBank.from_peft_model(pm)
    ids, mask = _batch(B=2)
    base = pm.get_base_model()
    with torch.no_grad():
        before = base(**bank.prepare_inputs(ids, ["a", "b"], attention_mask=mask)).logits[:, -L:]
    pm.set_adapter("a")
    opt = torch.optim.AdamW(pm.prompt_encoder["a"].parameters(), lr=0.5, fused=True)
    pm.train()
    pm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    pm.eval()
    with torch.no_grad():
        after = base(**bank.prepare_inputs(ids, ["a", "b"], attention_mask=mask)).logits[:, -L:]
    assert not torch.allclose(after[0], before[0])
    torch.testing.assert_close(after[:1], _peft_logits(pm, "a", ids[:1], mask[:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)  # adapter b did not change


def test_bank_follows_resized_and_replaced_embeddings():
    pm = _fresh_model(False)
    bank = PromptBank.from_peft_model(pm)
    base = pm.get_base_model()
    base.resize_token_embeddings(V + 40)
    ids = torch.full((1, 3), V + 30)  # a token that only the new vocabulary has
    out = bank.prepare_inputs(ids, "a")["inputs_embeds"]
    assert torch.equal(out[0, 6:], base.get_input_embeddings().weight[ids[0]].detach())
    new = nn.Embedding(V + 40, 64)
    base.set_input_embeddings(new)
    out = bank.prepare_inputs(ids, "a")["inputs_embeds"]
    assert torch.equal(out[0, 6:], new.weight[ids[0]].detach())
    table = out[0, :6]
    base.to(torch.float64)  # a cast: tables follow, recomputed from the (fp32) encoders and cast
    out = bank.prepare_inputs(ids, "a")["inputs_embeds"]
    assert out.dtype == torch.float64
    assert torch.equal(out[0, :6], table.double())
    assert torch.equal(out[0, 6:], new.weight[ids[0]].detach())


def test_bank_follows_load_adapter_into_an_existing_name(tmp_path):
    pm = _fresh_model(False)
    pm.save_pretrained(str(tmp_path), selected_adapters=["a"])
    other_base = _base()  # seeds torch itself
    torch.manual_seed(9)
    other = peft.get_peft_model(other_base, _pconfig(6, encoder_hidden_size=32), adapter_name="a")
    loaded = peft.PeftModel.from_pretrained(
        _base(), str(tmp_path / "a"), adapter_name="a"
    )  # not "default": a sub-folder
    bank = PromptBank.from_peft_model(loaded)
    first = bank.table("a").clone()
    other.save_pretrained(str(tmp_path / "other"))
    loaded.load_adapter(str(tmp_path / "other" / "a"), adapter_name="a")  # writes into the inference-mode embedding
    assert not torch.equal(bank.table("a"), first)
    assert torch.equal(bank.table("a"), loaded.prompt_encoder["a"].embedding.weight)


def test_frozen_tables_stay_frozen():
    we = torch.randn(20, 8)
    bank = PromptBank(we)
    src = torch.randn(3, 8)
    bank.add("t", src)
    kept = bank.table("t").clone()
    src.mul_(2)  # the caller's tensor changes: the bank holds its own copy
    assert torch.equal(bank.table("t"), kept)
    bank.refresh()
    assert torch.equal(bank.table("t"), kept)


def test_unknown_adapter_is_one_error_type_everywhere(trained_mode_model, tmp_path):
    import ptfast

    bank = PromptBank.from_peft_model(trained_mode_model)
    ids = torch.ones(1, 3, dtype=torch.long)
    calls = [
        lambda: bank.prepare_inputs(ids, "nope"),
        lambda: bank.table("nope"),
        lambda: bank.remove("nope"),
        lambda: PromptBank.from_peft_model(trained_mode_model, adapters=["nope"]),
        lambda: ptfast.save_encoder_state(trained_mode_model, str(tmp_path), selected_adapters=["nope"]),
    ]
    for call in calls:
        with pytest.raises(ptfast.UnknownAdapterError, match="nope") as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
        assert not str(info.value).startswith("'")  # a readable message, not KeyError's quoted repr


# ------------------------------------------------------------------------------------------- concurrency
def _removing_during_the_call(bank, name, then=None):
    """Word embeddings read (once per prepare_inputs, between its name checks and the table lookups) through a
    callable that removes ``name`` (and adds ``then``'s table in its place) the first time: another thread's
    ``remove``/``add`` landing at that instant, made deterministic."""
    embeddings = bank._word_embeddings
    done = []

    def read():
        if not done:
            done.append(True)
            bank.remove(name)
            if then is not None:
                bank.add(name, then)
        return embeddings

    bank._embeddings_of = read


def test_remove_during_prepare_inputs_serves_the_old_bank_or_says_unknown_adapter():
    D = 8
    ids = torch.randint(0, 20, (2, 4))
    tables = {n: torch.randn(3, D) for n in "ab"}

    bank = PromptBank(torch.randn(20, D))
    for n, t in tables.items():
        bank.add(n, t)
    _removing_during_the_call(bank, "b")
    out = bank.prepare_inputs(ids, ["a", "b"])["inputs_embeds"]  # served from the snapshot it checked the names in
    assert torch.equal(out[1, :3], tables["b"])
    assert "b" not in bank

    # A source that changed must be rebuilt from the bank as it is now, where "b" is gone: a bare KeyError before.
    for call in (lambda b: b.prepare_inputs(ids, ["a", "b"]), lambda b: b.prepare_inputs(ids, "b")):
        bank = PromptBank(torch.randn(20, D))
        bank.add("a", tables["a"])
        encoder = _small_encoder(3)
        bank.add("b", encoder)
        with torch.no_grad():
            encoder.embedding.weight.add_(1.0)  # "b" is stale: the call rebuilds
        _removing_during_the_call(bank, "b")
        with pytest.raises(UnknownAdapterError, match="no adapter named 'b'"):
            call(bank)


def test_replaced_with_another_length_during_prepare_inputs_serves_the_new_table():
    D = 8
    bank = PromptBank(torch.randn(20, D))
    encoder = _small_encoder(3)
    bank.add("b", encoder)
    with torch.no_grad():
        encoder.embedding.weight.add_(1.0)
    new = torch.randn(5, D)
    _removing_during_the_call(bank, "b", then=new)
    out = bank.prepare_inputs(torch.randint(0, 20, (2, 4)), "b")["inputs_embeds"]
    assert out.shape == (2, 5 + 4, D)  # the new length, not the old one's group (a KeyError before)
    assert torch.equal(out[:, :5], new.expand(2, -1, -1))


def test_concurrent_add_remove_only_raise_unknown_adapter():
    D = 8
    weight = torch.randn(20, D)
    bank = PromptBank(weight)
    bank.add("a", torch.randn(3, D))
    encoder = _small_encoder(3)
    versions = {3: [torch.randn(3, D) for _ in range(4)], 4: [torch.randn(4, D) for _ in range(4)]}
    allowed = [t for ts in versions.values() for t in ts] + [encoder.table().clone()]  # every table "b" can have
    ids = torch.randint(0, 20, (2, 4))
    deadline = time.monotonic() + 1.5
    failures, served = [], collections.Counter()

    def mutate():
        i = 0
        while time.monotonic() < deadline:  # "b" is absent at the top of each round
            bank.add("b", versions[3 + i % 2][i % 4])
            bank.add("b", versions[3 + (i + 1) % 2][(i + 1) % 4], replace=True)
            bank.remove("b")
            bank.add("b", encoder)  # a tracked source, edited below: the serving calls rebuild
            with torch.no_grad():
                encoder.embedding.weight.add_(0.0)  # a new version, the same values
            bank.remove("b")
            i += 1

    def serve():
        calls = [
            lambda: bank.prepare_inputs(ids, ["b", "b"])["inputs_embeds"][0, :-4],
            lambda: bank.prepare_inputs(ids, "b")["inputs_embeds"][1, :-4],
            lambda: bank.table("b"),
            lambda: bank.num_virtual_tokens("b"),
        ]
        while time.monotonic() < deadline:
            for call in calls:
                try:
                    out = call()
                except UnknownAdapterError:
                    served["unknown"] += 1
                    continue
                except Exception as error:  # noqa: BLE001 - the test is that nothing else escapes
                    failures.append(repr(error))
                    continue
                if isinstance(out, torch.Tensor) and not any(torch.equal(out, t) for t in allowed):
                    failures.append(f"served a table that 'b' never had: {out}")
                served["served"] += 1

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # many more thread switches, so more interleavings in the time given
    try:
        threads = [threading.Thread(target=mutate)] + [threading.Thread(target=serve) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        sys.setswitchinterval(switch)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert served["unknown"] > 0 and served["served"] > 0  # both outcomes were exercised


# ------------------------------------------------------------------------------------------------- copies
def _edited_encoder(n, edits):
    encoder = _small_encoder(n)
    with torch.no_grad():
        for _ in range(edits):
            encoder.embedding.weight.add_(0.5)  # each edit bumps the version counter
    return encoder


@pytest.mark.parametrize("copy_of", ["pickle", "deepcopy", "torch.save"])
def test_a_copied_bank_serves_and_tracks_its_own_copies(copy_of):
    D = 8
    weight = torch.randn(20, D)
    bank = PromptBank(weight)
    bank.add("frozen", torch.randn(3, D))
    bank.add("enc", _edited_encoder(4, edits=3))
    ids = torch.randint(0, 20, (2, 5))
    original = {n: bank.prepare_inputs(ids, n)["inputs_embeds"] for n in bank.names}

    pair = (bank, bank._state.sources["enc"].source)
    if copy_of == "pickle":
        copied, encoder = pickle.loads(pickle.dumps(pair))
    elif copy_of == "deepcopy":
        copied, encoder = copy.deepcopy(pair)
    else:
        buffer = io.BytesIO()
        torch.save(pair, buffer)
        buffer.seek(0)
        copied, encoder = torch.load(buffer, weights_only=False)
    assert copied.names == bank.names
    for name in bank.names:
        assert torch.equal(copied.prepare_inputs(ids, name)["inputs_embeds"], original[name])
    # The copy's version counters start again at 0: three edits bring them back to the original's counts, which a
    # copied Snapshot would take for "unchanged".
    with torch.no_grad():
        for _ in range(3):
            encoder.embedding.weight.add_(0.5)
    assert torch.equal(copied.table("enc"), encoder.table())
    assert not torch.equal(copied.table("enc"), bank.table("enc"))
    # A lock of its own, and a registry of its own.
    copied.remove("frozen")
    assert "frozen" in bank and "frozen" not in copied
    copied.add("new", torch.randn(2, D))
    assert "new" not in bank


def test_a_copied_peft_bank_follows_its_copy_of_the_model(trained_mode_model):
    bank = PromptBank.from_peft_model(trained_mode_model, adapters=["a", "c"])
    ids, mask = _batch()
    copied = copy.deepcopy(bank)
    assert copied.word_embeddings is not bank.word_embeddings
    for name in bank.names:
        assert torch.equal(copied.table(name), bank.table(name))
    expected = bank.prepare_inputs(ids, "a", attention_mask=mask)
    got = copied.prepare_inputs(ids, "a", attention_mask=mask)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
