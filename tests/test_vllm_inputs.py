"""ptfast.integrations.vllm and ptfast.bank_io without vllm: the inputs vLLM gets, their checks, bank save/load.

The same inputs against a real vLLM engine and server are tested in tests_vllm/ (the CI's second stage).
"""

import base64
import io
import json
import subprocess
import sys

import pytest
import torch

from ptfast import PromptBank, UnknownAdapterError
from ptfast.bank_io import (
    BankMismatchError,
    embedding_fingerprint,
    embedding_lookup,
    embedding_weight_from_checkpoint,
    read_manifest,
    save_bank,
)
from ptfast.integrations import vllm as ptv
from ptfast.integrations.vllm import EngineSpec, PromptEmbedsError

V, D = 97, 24


def _weight(seed=0, dtype=torch.float32):
    return torch.randn(V, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def bank():
    g = torch.Generator().manual_seed(1)
    b = PromptBank(torch.nn.Embedding.from_pretrained(_weight()))
    b.add("a", torch.randn(5, D, generator=g))
    b.add("b", torch.randn(5, D, generator=g))
    b.add("c", torch.randn(3, D, generator=g))  # another num_virtual_tokens
    return b


def _decode(data):
    return torch.load(io.BytesIO(base64.b64decode(data, validate=True)), weights_only=True, map_location="cpu")


LENGTHS = [7, 1, 7, 12, 3, 7]
NAMES = ["a", "c", "b", "a", "c", "a"]


def _ids(lengths=LENGTHS, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def test_embeds_are_table_then_lookup_bitwise(bank):
    ids = _ids()
    out = ptv.build_prompt_embeds(bank, ids, NAMES)
    assert len(out) == len(ids)
    for x, name, row in zip(out, NAMES, ids):
        expected = torch.cat([bank.table(name), bank.weight[row]])
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert torch.equal(x, expected)
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()  # not a view of a batch
    # lists of ints, one adapter for all, a (B, L) tensor and one request give the same rows
    as_lists = ptv.build_prompt_embeds(bank, [r.tolist() for r in ids], NAMES)
    assert all(torch.equal(x, y) for x, y in zip(out, as_lists))
    batch = torch.stack([ids[0], ids[2], ids[5]])
    for x, row in zip(ptv.build_prompt_embeds(bank, batch, "a"), batch):
        assert torch.equal(x, torch.cat([bank.table("a"), bank.weight[row]]))
    (one,) = ptv.build_prompt_embeds(bank, ids[3].tolist(), "a")
    assert torch.equal(one, out[3])
    prompts = ptv.build_prompts(bank, ids, NAMES)
    assert all(torch.equal(p["prompt_embeds"], x) for p, x in zip(prompts, out))


def test_engine_dtype_and_spec_of_llm(bank):
    class ModelConfig:  # what vllm.LLM.model_config answers
        dtype = torch.bfloat16
        max_model_len = 64

        def get_hidden_size(self):
            return D

        def get_vocab_size(self):
            return V

    class LLM:
        model_config = ModelConfig()

    spec = EngineSpec.of(LLM())
    assert spec == EngineSpec(hidden_size=D, dtype=torch.bfloat16, vocab_size=V, max_model_len=64)
    assert EngineSpec.of(spec) is spec
    ids = _ids()
    for x, name, row in zip(ptv.build_prompt_embeds(bank, ids, NAMES, engine=LLM()), NAMES, ids):
        assert x.dtype == torch.bfloat16
        assert torch.equal(x, torch.cat([bank.table(name), bank.weight[row]]).bfloat16())
    with pytest.raises(TypeError, match="vllm.LLM"):
        EngineSpec.of(object())


def test_spec_from_pretrained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": D, "vocab_size": V, "torch_dtype": "bfloat16"}))
    assert EngineSpec.from_pretrained(tmp_path) == EngineSpec(D, torch.bfloat16, V, None)
    assert EngineSpec.from_pretrained(tmp_path, dtype="float32", max_model_len=9).dtype == torch.float32


SPEC = EngineSpec(hidden_size=D, dtype=torch.float32, vocab_size=V, max_model_len=16)


@pytest.mark.parametrize(
    "ids, names, match",
    [
        pytest.param([[1, 2]], ["zzz"], "no adapter named 'zzz'", id="unknown-adapter"),
        pytest.param([[]], ["a"], "no token ids", id="empty-request"),
        pytest.param([], [], "no requests", id="no-requests"),
        pytest.param([[1, V]], ["a"], "outside the vocabulary", id="id-too-large"),
        pytest.param([[-1, 2]], ["a"], "outside the vocabulary", id="id-negative"),
        pytest.param([[1.0, 2.0]], ["a"], "list of ints", id="float-ids"),
        pytest.param([torch.tensor([1.0, 2.0])], ["a"], "must be integers", id="float-tensor-ids"),
        pytest.param(torch.zeros(1, 2, 3, dtype=torch.long), "a", "1-D .* or 2-D", id="3d-ids"),
        pytest.param([[1, 2], [3]], ["a"], "1 adapter names for 2 requests", id="names-count"),
        pytest.param([list(range(1, 13))], ["a"], "17 prompt positions .* max_model_len 16", id="too-long"),
        pytest.param("hello", "a", "token ids", id="text"),
    ],
)
def test_bad_requests_raise_before_the_engine(bank, ids, names, match):
    error = UnknownAdapterError if match.startswith("no adapter") else PromptEmbedsError
    with pytest.raises(error, match=match):
        ptv.build_prompt_embeds(bank, ids, names, engine=SPEC)


def test_unknown_adapter_is_a_key_and_value_error(bank):
    with pytest.raises(KeyError):
        ptv.build_prompts(bank, [[1]], ["nope"])
    with pytest.raises(UnknownAdapterError):
        ptv.chat_prompt_embeds_part(bank, "nope")


def test_bank_of_another_model_and_engine_vocab(bank):
    with pytest.raises(PromptEmbedsError, match="hidden size 24, the engine's model 32"):
        ptv.build_prompt_embeds(bank, [[1, 2]], "a", engine=EngineSpec(hidden_size=32))
    with pytest.raises(PromptEmbedsError, match=r"outside the vocabulary \[0, 50\)"):
        ptv.build_prompt_embeds(bank, [[60]], "a", engine=EngineSpec(hidden_size=D, vocab_size=50))


def test_non_finite_table_is_caught(bank):
    bad = torch.randn(5, D)
    bad[2, 3] = float("nan")
    bank.add("nan", bad)
    with pytest.raises(PromptEmbedsError, match=r"requests \[1\].*'nan'"):
        ptv.build_prompt_embeds(bank, [[1, 2], [3, 4]], ["a", "nan"])
    big = torch.full((5, D), 1e5)  # finite in fp32, inf in fp16
    bank.add("big", big)
    ptv.build_prompt_embeds(bank, [[1]], "big")
    with pytest.raises(PromptEmbedsError, match="NaN or infinite"):
        ptv.build_prompt_embeds(bank, [[1]], "big", engine=EngineSpec(hidden_size=D, dtype=torch.float16))


@pytest.mark.parametrize(
    "embeds, match",
    [
        pytest.param(torch.randn(4, D).long(), "floating point", id="int64"),
        pytest.param(torch.ones(4, D, dtype=torch.bool), "floating point", id="bool"),
        pytest.param(torch.randn(1, 4, D), "2-D", id="rank3"),
        pytest.param(torch.randn(D), "2-D", id="rank1"),
        pytest.param(torch.randn(0, D), "no rows", id="empty"),
        pytest.param(torch.randn(4, D + 1), "hidden size 25 != the engine model's hidden size 24", id="hidden"),
        pytest.param(torch.full((4, D), float("inf")), "NaN or infinite", id="inf"),
        pytest.param(torch.randn(17, D), "17 rows > the engine's max_model_len 16", id="too-long"),
        pytest.param([[0.0] * D], "torch.Tensor", id="list"),
    ],
)
def test_check_prompt_embeds(embeds, match):
    with pytest.raises(PromptEmbedsError, match=match):
        ptv.check_prompt_embeds(embeds, SPEC)
    with pytest.raises(PromptEmbedsError):
        ptv.encode_prompt_embeds(embeds, SPEC)


def test_check_prompt_embeds_casts_to_engine_dtype():
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True) * 1
    y = ptv.check_prompt_embeds(x, SPEC)
    assert y.dtype == torch.float32 and not y.requires_grad and torch.equal(y, x.detach().float())
    assert ptv.check_prompt_embeds(x.detach()).dtype == torch.float64  # no engine: dtype kept


def test_completion_request_round_trip(bank):
    ids = _ids()
    spec = EngineSpec(hidden_size=D, dtype=torch.float32, vocab_size=V, max_model_len=32)
    embeds = ptv.build_prompt_embeds(bank, ids, NAMES, engine=spec)
    body = ptv.completion_request(bank, ids, NAMES, model="tiny", engine=spec, max_tokens=7, ignore_eos=True)
    assert body["model"] == "tiny" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert body["return_token_ids"] is True and body["ignore_eos"] is True
    assert isinstance(body["prompt_embeds"], list) and len(body["prompt_embeds"]) == len(ids)
    for data, x in zip(body["prompt_embeds"], embeds):
        assert torch.equal(_decode(data), x)
    json.dumps(body)  # a JSON body as it stands
    single = ptv.completion_request(bank, ids[3], "a", model="tiny")
    assert isinstance(single["prompt_embeds"], str) and torch.equal(_decode(single["prompt_embeds"]), embeds[3])
    # the encoded size is the request's own rows, not a whole batch's storage
    assert len(base64.b64decode(single["prompt_embeds"])) < embeds[3].numel() * 4 + 2048


@pytest.mark.parametrize("row", [0, 3])  # a view at offset 0 and one past it: both share the batch's storage
def test_encode_prompt_embeds_ships_only_the_view(row):
    batch = torch.randn(4, 3, D)
    data = ptv.encode_prompt_embeds(batch[row], SPEC)
    assert torch.equal(_decode(data), batch[row])
    assert len(base64.b64decode(data)) < batch[row].numel() * 4 + 2048
    whole = ptv.encode_prompt_embeds(batch.view(12, D), SPEC)  # owns its storage: encoded as it is
    assert torch.equal(_decode(whole), batch.view(12, D))


def test_chat_part_carries_only_the_table(bank):
    part = ptv.chat_prompt_embeds_part(bank, "c", engine=SPEC)
    assert part["type"] == "prompt_embeds"
    assert torch.equal(_decode(part["data"]), bank.table("c"))
    with pytest.raises(PromptEmbedsError, match="another base model"):
        ptv.chat_prompt_embeds_part(bank, "c", engine=EngineSpec(hidden_size=8))


def test_importable_without_vllm(tmp_path):
    # A vllm package that cannot be imported: the module must not touch it (vllm is absent in this stage anyway).
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('ptfast imported vllm')\n")
    code = "import sys, ptfast.integrations.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={"PTFAST_NO_NATIVE": "1", "PATH": "", "PYTHONPATH": str(tmp_path)}
    )


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(bank, tmp_path):
    folder = bank.save(tmp_path / "bank")
    manifest = read_manifest(folder)
    assert [a["name"] for a in manifest["adapters"]] == ["a", "b", "c"]
    assert manifest["embeddings"] == embedding_fingerprint(bank.weight)
    assert manifest["embeddings"]["vocab_size"] == V and manifest["embeddings"]["dtype"] == "float32"
    served = torch.nn.Embedding.from_pretrained(_weight())  # another copy of the same weights
    loaded = PromptBank.load(folder, served)
    assert loaded.names == bank.names
    for name in bank.names:
        assert loaded.num_virtual_tokens(name) == bank.num_virtual_tokens(name)
        assert torch.equal(loaded.table(name), bank.table(name))
    ids = _ids()
    for x, y in zip(ptv.build_prompt_embeds(loaded, ids, NAMES), ptv.build_prompt_embeds(bank, ids, NAMES)):
        assert torch.equal(x, y)
    assert all(s.snapshot is None for s in loaded._state.sources.values())  # frozen tables


def test_load_checks_the_fingerprint(bank, tmp_path):
    folder = save_bank(bank, tmp_path)
    with pytest.raises(BankMismatchError, match="embedding weights differ"):
        PromptBank.load(folder, _weight(seed=5))
    assert PromptBank.load(folder, _weight(seed=5), verify=False).names == bank.names
    with pytest.raises(BankMismatchError, match="hidden_size=24"):
        PromptBank.load(folder, torch.randn(V, D + 8))
    with pytest.raises(BankMismatchError, match="vocab_size=97"):
        PromptBank.load(folder, torch.randn(V + 1, D))
    with pytest.raises(BankMismatchError, match="dtype='float32'"):
        PromptBank.load(folder, _weight().bfloat16(), verify=False)
    w = _weight()
    w[3, 4] += 1e-6
    with pytest.raises(BankMismatchError):
        PromptBank.load(folder, w)
    with pytest.raises(FileNotFoundError, match="bank.json"):
        PromptBank.load(tmp_path / "nothing", _weight())
    (tmp_path / "bank.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format 'other'"):
        PromptBank.load(folder, _weight())


def test_bf16_bank_round_trip(tmp_path):
    w = _weight(dtype=torch.bfloat16)
    b = PromptBank(w)
    b.add("x", torch.randn(4, D))
    loaded = PromptBank.load(save_bank(b, tmp_path), w.clone())
    assert loaded.table("x").dtype == torch.bfloat16 and torch.equal(loaded.table("x"), b.table("x"))


def test_bank_from_peft_and_checkpoint_embeddings(tmp_path):
    peft = pytest.importorskip("peft")
    from tests.helpers.models import tiny_llama_causal_lm

    base = tiny_llama_causal_lm()
    base.save_pretrained(tmp_path / "model")
    model = peft.get_peft_model(
        base,
        peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
        adapter_name="x",
    )
    model.add_adapter(
        "y",
        peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_reparameterization_type="LSTM", encoder_hidden_size=16
        ),
    )
    bank = PromptBank.from_peft_model(model.eval())
    bank.save(tmp_path / "bank")
    weight = embedding_weight_from_checkpoint(tmp_path / "model")
    assert torch.equal(weight, base.get_input_embeddings().weight)
    loaded = PromptBank.load(tmp_path / "bank", weight)  # no PEFT model, no training code
    for name in ("x", "y"):
        assert torch.equal(loaded.table(name), bank.table(name))
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        embedding_weight_from_checkpoint(tmp_path / "model", key="nope")
    with pytest.raises(FileNotFoundError):
        embedding_weight_from_checkpoint(tmp_path / "bank")


# ------------------------------------------------------------------------------------------- scaled embeddings
class _FloatScaled(torch.nn.Embedding):
    """transformers' BART-style scaled embedding: the rows times a Python float."""

    def __init__(self, weight, scale):
        super().__init__(*weight.shape, _weight=weight)
        self.embed_scale = scale

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale


class _TensorScaled(_FloatScaled):
    """transformers' Gemma-style scaled embedding: the rows times a buffer cast to the weight's dtype."""

    def __init__(self, weight, scale):
        super().__init__(weight, scale)
        self.embed_scale = torch.tensor(scale)

    def forward(self, input_ids):
        return torch.nn.functional.embedding(input_ids, self.weight) * self.embed_scale.to(self.weight.dtype)


@pytest.mark.parametrize("kind", [_FloatScaled, _TensorScaled])
def test_scaled_embeddings_round_trip_over_the_bare_weight(kind, tmp_path):
    weight = _weight(dtype=torch.bfloat16)
    module = kind(weight, 50**0.5)  # not a bf16 number: the two ways of scaling round differently
    ids = torch.arange(V)
    assert not torch.equal(weight[ids] * 50**0.5, weight[ids] * torch.tensor(50**0.5).bfloat16())
    bank = PromptBank(module)
    bank.add("x", torch.randn(4, D))
    # the scale the multiplication uses: the Python float, or the buffer's value rounded to bf16
    scale = 50**0.5 if kind is _FloatScaled else float(torch.tensor(50**0.5).bfloat16())
    assert embedding_lookup(module) == {
        "kind": "scaled",
        "scale": scale,
        "cast_scale_to_weight_dtype": kind is _TensorScaled,
    }
    folder = bank.save(tmp_path / "bank")
    assert read_manifest(folder)["format_version"] == 2  # an older ptfast refuses it instead of serving it unscaled
    loaded = PromptBank.load(folder, weight.clone())  # what embedding_weight_from_checkpoint gives
    batch = ids[:40].view(5, 8)
    assert torch.equal(
        loaded.prepare_inputs(batch, "x")["inputs_embeds"], bank.prepare_inputs(batch, "x")["inputs_embeds"]
    )
    assert torch.equal(PromptBank.load(folder, module).table("x"), bank.table("x"))
    # saved again from the loaded bank, and loaded again: the same lookup
    again = PromptBank.load(loaded.save(tmp_path / "again"), weight.clone())
    assert read_manifest(tmp_path / "again")["embedding_lookup"] == embedding_lookup(module)
    assert torch.equal(
        again.prepare_inputs(batch, "x")["inputs_embeds"], bank.prepare_inputs(batch, "x")["inputs_embeds"]
    )
    with pytest.raises(BankMismatchError, match=r"scaled by 7\.0[67]\d* \((cast|as a Python).*plain row lookups"):
        PromptBank.load(folder, torch.nn.Embedding.from_pretrained(weight.clone()))


def test_a_scale_buffer_in_another_dtype_with_the_same_effect_is_the_same_lookup():
    weight = _weight(dtype=torch.bfloat16)
    fp32_buffer = _TensorScaled(weight, 50**0.5)
    bf16_buffer = _TensorScaled(weight, 50**0.5)
    bf16_buffer.embed_scale = bf16_buffer.embed_scale.bfloat16()  # what model.to(torch.bfloat16) does to Gemma's
    ids = torch.arange(V)
    assert torch.equal(fp32_buffer(ids), bf16_buffer(ids))
    assert embedding_lookup(fp32_buffer) == embedding_lookup(bf16_buffer)


def test_gemma_bank_served_from_the_checkpoint_equals_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    base = GemmaForCausalLM(
        GemmaConfig(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=12,
        )
    )
    base.save_pretrained(tmp_path / "model")
    model = peft.get_peft_model(
        base, peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16)
    ).eval()
    PromptBank.from_peft_model(model).save(tmp_path / "bank")
    served = PromptBank.load(tmp_path / "bank", embedding_weight_from_checkpoint(tmp_path / "model"))
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = torch.cat((model.get_prompt(3), model.word_embeddings(ids)), 1)
    assert torch.equal(served.prepare_inputs(ids, "default")["inputs_embeds"], ref)
    assert not torch.equal(ref[:, 5:], embedding_weight_from_checkpoint(tmp_path / "model")[ids])  # it does scale


def test_embeddings_with_more_state_or_max_norm_are_modules():
    class SwapsOneRow(_FloatScaled):  # like T5Gemma2's: one token's row comes from a parameter of its own
        def __init__(self, weight, scale):
            super().__init__(weight, scale)
            self.eoi_embedding = torch.nn.Parameter(torch.randn(D))

        def forward(self, input_ids):
            out = super().forward(input_ids)
            return torch.where((input_ids == 1000)[..., None], self.eoi_embedding, out)

    module = SwapsOneRow(torch.randn(2000, D), 2.0)
    assert 1000 not in torch.linspace(0, 1999, 512).long()  # the probe's ids miss the swapped row
    assert embedding_lookup(module) == {"kind": "module", "class": SwapsOneRow.__qualname__}
    renorm = torch.nn.Embedding.from_pretrained(_weight(), max_norm=1.0)
    assert embedding_lookup(renorm)["kind"] == "module"
    assert torch.equal(renorm.weight, _weight())  # not called: it would renormalise rows in place


def test_embeddings_with_another_forward_need_the_module(tmp_path):
    class Shifted(torch.nn.Embedding):
        def forward(self, input_ids):
            return super().forward(input_ids) + 1

    module = Shifted.from_pretrained(_weight())
    assert embedding_lookup(module) == {"kind": "module", "class": Shifted.__qualname__}
    bank = PromptBank(module)
    bank.add("x", torch.randn(4, D))
    folder = bank.save(tmp_path / "bank")
    with pytest.raises(BankMismatchError, match="not a row lookup.*Pass the model's input embedding module"):
        PromptBank.load(folder, _weight())
    ids = torch.randint(0, V, (2, 6))
    loaded = PromptBank.load(folder, Shifted.from_pretrained(_weight()))
    assert torch.equal(loaded.prepare_inputs(ids, "x")["inputs_embeds"], bank.prepare_inputs(ids, "x")["inputs_embeds"])


def test_bank_saved_without_the_lookup_loads_as_before(bank, tmp_path):
    folder = bank.save(tmp_path / "bank")
    assert read_manifest(folder)["embedding_lookup"] == {"kind": "plain"}
    assert read_manifest(folder)["format_version"] == 1  # readable by ptfast versions that predate the lookup
    manifest = json.loads((tmp_path / "bank" / "bank.json").read_text())
    del manifest["embedding_lookup"]
    (tmp_path / "bank" / "bank.json").write_text(json.dumps(manifest))
    assert torch.equal(PromptBank.load(folder, _weight()).table("a"), bank.table("a"))
