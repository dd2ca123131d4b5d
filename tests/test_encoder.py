"""ptfast.PromptEncoder against PEFT's own PromptEncoder: structure, init, forward, gradients, errors."""

import pytest
import torch
from peft import PromptEncoderConfig as PeftConfig
from peft.tuners.p_tuning import PromptEncoder as PeftEncoder

import ptfast
from ptfast import PromptEncoder, PromptEncoderConfig
from tests.helpers.encoders import (
    assert_close_to_peft,
    check_forward_and_grads,
    fp64_copy,
    index_patterns,
    make_pair,
    peft_config,
)

# (type, num_virtual_tokens, token_dim, hidden, submodules): non-powers of two on purpose.
CONFIGS = [
    pytest.param("MLP", 7, 1000, 129, 1, id="MLP-T7-D1000-H129"),
    pytest.param("MLP", 5, 60, 33, 2, id="MLP-T5x2-D60-H33"),
    pytest.param("LSTM", 7, 100, 37, 1, id="LSTM-T7-D100-H37"),
    pytest.param("LSTM", 5, 60, 17, 2, id="LSTM-T5x2-D60-H17"),
]


# ---------------------------------------------------------------------------- structure and init
@pytest.mark.parametrize("kind,nvt,dim,hidden,subs", CONFIGS)
def test_same_init_names_and_shapes(kind, nvt, dim, hidden, subs):
    ref, ours = make_pair(kind, nvt, dim, hidden, subs)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    for name in ref_sd:
        assert torch.equal(ref_sd[name], our_sd[name]), name
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in ours.named_modules()]
    for attr in ("token_dim", "input_size", "output_size", "hidden_size", "total_virtual_tokens"):
        assert getattr(ours, attr) == getattr(ref, attr)


@pytest.mark.parametrize("kind,nvt,dim,hidden,subs", CONFIGS)
def test_state_dict_loads_both_ways_strict(kind, nvt, dim, hidden, subs):
    cfg = peft_config(kind, nvt, dim, hidden, subs)
    ref, ours = PeftEncoder(cfg), PromptEncoder(cfg)  # different random init
    ours.load_state_dict(ref.state_dict(), strict=True)
    idx = torch.arange(ours.total_virtual_tokens).unsqueeze(0)
    assert torch.equal(ours(idx), ref(idx))
    other = PeftEncoder(cfg)
    other.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(other(idx), ref(idx))


def test_inference_mode_is_embedding_only():
    ref, ours = make_pair("MLP", 7, 48, 16, 1, inference_mode=True)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["embedding.weight"]
    assert not hasattr(ours, "mlp_head")
    idx = torch.tensor([[0, 3, 6]])
    # PEFT's forward has no head to run here (AttributeError) and PeftModel reads embedding.weight directly;
    # ours returns those rows.
    with pytest.raises(AttributeError):
        ref(idx)
    assert torch.equal(ours(idx), ref.embedding.weight[idx])
    assert torch.equal(ours.table(), ref.embedding.weight)


def test_accepts_ptfast_config_dict_and_enum():
    cfg = PromptEncoderConfig(num_virtual_tokens=4, token_dim=24, encoder_hidden_size=8)
    enc = PromptEncoder(cfg)
    assert enc.total_virtual_tokens == 4 and enc.hidden_size == 8
    enc = PromptEncoder({"num_virtual_tokens": 4, "token_dim": 24, "encoder_reparameterization_type": "LSTM"})
    assert hasattr(enc, "lstm_head") and enc.hidden_size == 24  # hidden defaults to token_dim, as in PeftModel
    enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=4, token_dim=24, num_transformer_submodules=2))
    assert enc.total_virtual_tokens == 8


def test_mlp_warns_like_peft_when_num_layers_set():
    with pytest.warns(UserWarning, match="`encoder_num_layers` is ignored") as ours:
        PromptEncoder(peft_config("MLP", 4, 16, 8, 1, encoder_num_layers=3))
    # PEFT needs its enum here: with the string "MLP" its warning itself raises AttributeError (str has no .value).
    from peft.tuners.p_tuning.config import PromptEncoderReparameterizationType as PeftType

    with pytest.warns(UserWarning) as theirs:
        PeftEncoder(peft_config(PeftType.MLP, 4, 16, 8, 1, encoder_num_layers=3))
    assert str(ours[0].message) == str(theirs[0].message)


def test_unknown_type_raises_peft_error():
    cfg = PromptEncoderConfig(num_virtual_tokens=4, token_dim=16, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError) as ours:
        PromptEncoder(cfg)
    with pytest.raises(ValueError) as theirs:
        PeftEncoder(peft_config("GRU", 4, 16, 8, 1))
    assert str(ours.value) == str(theirs.value)


# ---------------------------------------------------------------------------- forward and gradients
def test_bitwise_equal_to_peft_for_get_prompt_call():
    """PeftModel.get_prompt passes a (1, T) arange: on CPU the result is PEFT's, bit for bit."""
    for kind in ("MLP", "LSTM"):
        ref, ours = make_pair(kind, 20, 1024, 128, 1)
        idx = torch.arange(20).unsqueeze(0).expand(1, -1)
        assert torch.equal(ours(idx), ref(idx))
        with torch.no_grad():
            assert torch.equal(ours(idx), ref(idx))  # cached


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("kind,nvt,dim,hidden,subs", CONFIGS)
def test_forward_and_grads_match_peft(kind, nvt, dim, hidden, subs, batch):
    check_forward_and_grads(kind, nvt, dim, hidden, subs, batch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_forward_matches_peft_in_other_dtypes(kind, dtype):
    ref, ours = make_pair(kind, 7, 96, 40, 1)
    ref64 = fp64_copy(ref)
    ref, ours = ref.to(dtype), ours.to(dtype)
    for idx in index_patterns(7, 3).values():
        try:
            expected = ref(idx)
        except RuntimeError as err:  # an op PyTorch lacks for this dtype on CPU: ours must fail the same way
            with pytest.raises(RuntimeError):
                ours(idx)
            pytest.skip(f"PEFT itself fails here: {err}")
        assert_close_to_peft(ours(idx).detach(), expected.detach(), ref64(idx).detach(), dtype)
        with torch.no_grad():
            assert_close_to_peft(ours(idx), expected.detach(), ref64(idx), dtype)


def test_training_runs_head_once_on_unique_rows(monkeypatch):
    """With B=8 the MLP sees total_virtual_tokens rows, not 8*T, and PEFT's gradients come out."""
    seen = []
    original = ptfast.ops.mlp_head.mlp_head_reference  # the head's computation on CPU (the eager backend)

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(ptfast.ops.mlp_head, "mlp_head_reference", spy)
    ref, ours = make_pair("MLP", 20, 64, 32, 1)
    idx = torch.arange(20).unsqueeze(0).expand(8, -1)
    ours(idx).square().sum().backward()
    ref(idx).square().sum().backward()
    assert seen == [(20, 64)]
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------- from_peft
@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_from_peft_copies_weights_dtype_and_flags(kind):
    ref, _ = make_pair(kind, 6, 48, 24, 2, encoder_dropout=0.0)
    ref = ref.to(torch.bfloat16).eval()
    ref.embedding.weight.requires_grad_(False)
    ours = PromptEncoder.from_peft(ref)
    assert isinstance(ours, PromptEncoder) and not ours.training
    for (n, p), (m, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n == m and torch.equal(p, q) and p.dtype == q.dtype and p.device == q.device
        assert p.requires_grad == q.requires_grad
        assert p.data_ptr() != q.data_ptr()  # a copy: training ours leaves PEFT's untouched
    idx = torch.arange(12).unsqueeze(0)
    assert torch.equal(ours(idx), ref(idx))


def test_from_peft_can_share_parameters():
    ref, _ = make_pair("MLP", 6, 48, 24, 1)
    ours = PromptEncoder.from_peft(ref, share_parameters=True)
    assert all(p is q for p, q in zip(ours.parameters(), ref.parameters()))


def test_from_peft_inference_mode_encoder():
    ref, _ = make_pair("MLP", 6, 48, 24, 1, inference_mode=True)
    ours = PromptEncoder.from_peft(ref)
    assert list(ours.state_dict()) == ["embedding.weight"]
    assert torch.equal(ours.table(), ref.embedding.weight)


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def small():
    return PromptEncoder(PromptEncoderConfig(num_virtual_tokens=5, token_dim=16, encoder_hidden_size=8))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize(
    "indices,error,match",
    [
        (torch.tensor([[0, 5]]), IndexError, r"out of range.*\[0, 5\].*5 virtual tokens"),
        (torch.tensor([[-1, 2]]), IndexError, r"out of range.*\[-1, 2\]"),
        (torch.tensor([[0.0, 1.0]]), TypeError, "integer"),
        (torch.tensor([[True, False]]), TypeError, "integer"),
        (torch.tensor([0, 1]), ValueError, r"shape \(batch, num_tokens\).*1 dims"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "3 dims"),
        ([[0, 1]], TypeError, "torch.Tensor"),
    ],
    ids=["too-large", "negative", "float", "bool", "rank-1", "rank-3", "list"],
)
def test_bad_indices_raise_clear_errors(small, indices, error, match, grad):
    with torch.set_grad_enabled(grad), pytest.raises(error, match=match):
        small(indices)


def test_bad_index_after_good_one_still_raises(small):
    """The validation memo must not let a modified index tensor through."""
    idx = torch.tensor([[0, 1, 2]])
    small(idx)
    idx[0, 1] = 7
    with pytest.raises(IndexError, match="out of range"):
        small(idx)


def test_indices_on_another_device_raise(small):
    with pytest.raises(ValueError, match="on meta but the encoder's weights are on cpu"):
        small(torch.zeros(1, 2, dtype=torch.long, device="meta"))


def test_int32_indices_work(small):
    idx = torch.tensor([[4, 0, 2]])
    torch.testing.assert_close(small(idx.int()), small(idx))


def test_empty_batch(small):
    assert small(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 16)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"num_virtual_tokens": 4}, "token_dim is None"),
        ({"token_dim": 16}, "num_virtual_tokens is None"),
        ({"num_virtual_tokens": 0, "token_dim": 16}, "num_virtual_tokens must be a positive int, got 0"),
        ({"num_virtual_tokens": 4, "token_dim": -2}, "token_dim must be a positive int, got -2"),
        ({"num_virtual_tokens": 4, "token_dim": 16, "encoder_hidden_size": 0}, "encoder_hidden_size must be"),
        ({"num_virtual_tokens": 4, "token_dim": 16, "num_transformer_submodules": 0}, "num_transformer_submodules"),
        ({"num_virtual_tokens": 4.0, "token_dim": 16}, "num_virtual_tokens must be a positive int, got 4.0"),
        ({"num_virtual_tokens": 4, "token_dim": 16, "encoder_dropout": 1.5}, "encoder_dropout"),
        ({"num_virtual_tokens": 4, "token_dim": 16, "encoder_dropout": "x"}, "encoder_dropout must be a number"),
        ({"num_virtual_tokens": 4, "token_dim": 16, "inference_mode": "False"}, "inference_mode must be a bool"),
    ],
)
def test_bad_config_raises(fields, match):
    with pytest.raises(ValueError, match=match):
        PromptEncoder(PromptEncoderConfig(**fields))


def test_peft_config_without_token_dim_raises():
    cfg = PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8)
    with pytest.raises(ValueError, match="token_dim is None"):
        PromptEncoder(cfg)


def test_works_without_peft_installed():
    """The encoder needs no peft; the integration says how to get it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['peft'] = None; sys.modules['transformers'] = None\n"
        "import torch, ptfast\n"
        "enc = ptfast.PromptEncoder(ptfast.PromptEncoderConfig(num_virtual_tokens=5, token_dim=16))\n"
        "assert enc(torch.arange(5)[None]).shape == (1, 5, 16)\n"
        "try:\n    ptfast.patch(object())\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'ptfast[peft]'" in out.stdout


def test_dict_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown prompt-encoder config field\(s\) \['encoder_hiden_size'\]"):
        PromptEncoder({"num_virtual_tokens": 4, "token_dim": 16, "encoder_hiden_size": 8})


def test_numpy_integers_are_sizes():
    import numpy as np

    enc = PromptEncoder({"num_virtual_tokens": np.int64(4), "token_dim": np.int32(16)})
    assert enc.total_virtual_tokens == 4 and type(enc.token_dim) is int
