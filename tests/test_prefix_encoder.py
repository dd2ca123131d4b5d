"""ptfast.PrefixEncoder against PEFT's prefix-tuning PrefixEncoder: structure, outputs, gradients, the table cache,
bad input, conversions, pickling and checkpoints; and the fused_prefix_head op."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PeftConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict  # noqa: E402
from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder  # noqa: E402
from safetensors import safe_open  # noqa: E402

import ptfast.prefix_encoder  # noqa: E402
from ptfast import PrefixEncoder, fused_prefix_head  # noqa: E402
from ptfast.integrations.checkpoints import (  # noqa: E402
    ENCODER_STATE_FILE,
    load_encoder_state,
    load_for_training,
    save_encoder_state,
)
from ptfast.ops.prefix_head import prefix_head_reference  # noqa: E402
from tests.helpers.encoders import (  # noqa: E402
    assert_close_to_peft,
    forward_and_grads,
    fp64_copy,
    index_patterns,
    make_prefix_pair,
    prefix_config,
)
from tests.helpers.models import random_batch, tiny_llama_causal_lm  # noqa: E402

# Every test runs with the cache's hit check in Python and in C++ (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("hit_check")

# (num_virtual_tokens, token_dim, num_layers, encoder_hidden_size): non-powers of two, hidden < and > token_dim
SHAPES = [(7, 12, 3, 5), (5, 20, 2, 33), (1, 10, 1, 10)]
PROJECTION = pytest.mark.parametrize("projection", [True, False], ids=["projection", "no-projection"])


def arange(n, batch=1):
    return torch.arange(n).unsqueeze(0).expand(batch, -1)


# ---------------------------------------------------------------------------------------------------- structure
@PROJECTION
@pytest.mark.parametrize("init_weights", [None, "zero"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_same_init_names_and_shapes(shape, projection, init_weights):
    ref, ours = make_prefix_pair(*shape, projection=projection, init_weights=init_weights)
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    assert ours.prefix_projection == ref.prefix_projection == projection
    nvt, dim, layers, _ = shape
    assert ours(arange(nvt)).shape == (1, nvt, layers * 2 * dim)


@PROJECTION
def test_state_dict_loads_both_ways_strict(projection):
    ref, ours = make_prefix_pair(7, 12, 3, 5, projection=projection)
    other_ref, other_ours = make_prefix_pair(7, 12, 3, 5, projection=projection, seed=99)
    ours.load_state_dict(other_ref.state_dict(), strict=True)
    ref.load_state_dict(other_ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(ours(arange(7)), other_ref(arange(7)))
        assert torch.equal(ref(arange(7)), other_ours(arange(7)))


def test_inference_mode_encoder_holds_only_the_table():
    """PEFT builds the (T, layers * 2 * dim) table alone, even with prefix_projection; its forward then fails on the
    missing head, ours returns the table."""
    ref, ours = make_prefix_pair(4, 6, 2, 3, projection=True, inference_mode=True)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["embedding.weight"]
    assert ours.embedding.weight.shape == (4, 24) and ours.prefix_projection
    with pytest.raises(AttributeError):
        ref(arange(4))
    out = ours(arange(4, 2))
    assert torch.equal(out, ref.embedding.weight.detach().expand(2, -1, -1))


def test_accepts_dict_and_plain_object_configs():
    fields = dict(num_virtual_tokens=3, token_dim=4, num_layers=2, encoder_hidden_size=5, prefix_projection=True)
    torch.manual_seed(0)
    from_dict = PrefixEncoder(fields)
    torch.manual_seed(0)
    from_object = PrefixEncoder(type("Cfg", (), fields)())
    torch.manual_seed(0)
    from_peft_config = PrefixEncoder(prefix_config(3, 4, 2, 5, projection=True))
    for enc in (from_object, from_peft_config):
        assert all(torch.equal(a, b) for a, b in zip(from_dict.state_dict().values(), enc.state_dict().values()))
    assert PrefixEncoder(dict(fields, encoder_hidden_size=None)).transform[0].out_features == 4  # PeftModel's fill


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"token_dim": 4, "num_layers": 2}, "num_virtual_tokens is None"),
        ({"num_virtual_tokens": 3, "num_layers": 2}, "token_dim is None"),
        ({"num_virtual_tokens": 3, "token_dim": 4}, "num_layers is None"),
        ({"num_virtual_tokens": 0, "token_dim": 4, "num_layers": 2}, "num_virtual_tokens must be a positive int"),
        ({"num_virtual_tokens": 3, "token_dim": 4, "num_layers": 2.0}, "num_layers must be a positive int, got 2.0"),
        ({"num_virtual_tokens": 3, "token_dim": 4, "num_layers": 2, "prefix_projection": 1}, "prefix_projection"),
        ({"num_virtual_tokens": 3, "token_dim": 4, "num_layers": 2, "init_weights": "gaussian"}, "init_weights"),
        ({"num_virtual_tokens": 3, "token_dim": 4, "num_layers": 2, "dropout": 0.1}, r"unknown .* \['dropout'\]"),
    ],
)
def test_bad_config_raises(fields, match):
    with pytest.raises(ValueError, match=match):
        PrefixEncoder(fields)


# ---------------------------------------------------------------------------------------------------- outputs and grads
@PROJECTION
def test_forward_takes_peft_argument_name(projection):
    """PEFT's PrefixEncoder.forward(prefix): the keyword works as there, and gives the positional call's output."""
    ref, ours = make_prefix_pair(7, 12, 3, 5, projection=projection, dtype=torch.float32)
    idx = arange(7)
    with torch.no_grad():
        assert torch.equal(ours(prefix=idx), ref(prefix=idx))
        assert torch.equal(ours(prefix=idx), ours(idx))


@PROJECTION
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bitwise_equal_to_peft_for_get_prompt_call(projection, dtype):
    """(1, T) arange, what PeftModel.get_prompt passes at batch 1: the same ops on the same shapes, so the output
    and every gradient are PEFT's to the bit."""
    ref, ours = make_prefix_pair(7, 12, 3, 5, projection=projection, dtype=dtype)
    idx = arange(7)
    grad_out = torch.randn(1, 7, 72)
    out_ref, grads_ref = forward_and_grads(ref, idx, grad_out)
    out, grads = forward_and_grads(ours, idx, grad_out)
    assert out.dtype == dtype and torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert torch.equal(grads[name], grads_ref[name]), name


@PROJECTION
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_grads_match_peft(shape, projection, batch):
    """Every index pattern: output and every gradient within fp32 rounding of PEFT, measured against float64."""
    ref, ours = make_prefix_pair(*shape, projection=projection)
    ref64 = fp64_copy(ref)
    width = shape[2] * 2 * shape[1]
    for name, idx in index_patterns(shape[0], batch).items():
        grad_out = torch.randn(*idx.shape, width)
        results = [forward_and_grads(enc, idx, grad_out) for enc in (ours, ref, ref64)]
        assert_close_to_peft(results[0][0], results[1][0], results[2][0], torch.float32)
        for param in results[1][1]:
            assert_close_to_peft(results[0][1][param], results[1][1][param], results[2][1][param], torch.float32)


def _kernels_interpreted() -> bool:
    from ptfast.kernels import linear

    return type(linear._linear_kernel).__name__ == "InterpretedFunction"


@pytest.mark.skipif(
    not _kernels_interpreted(),
    reason="the Triton path on CPU needs the interpreter (GPU: tests/test_mlp_head_interp.py runs it)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_projection_head_matches_peft(dtype, monkeypatch):
    """PTFAST_BACKEND=triton: the projection head on the Triton kernels (interpreted here), output and every gradient
    within PEFT's own rounding error against float64, and the cached table follows the backend switch."""
    ref, ours = make_prefix_pair(5, 48, 2, 37, projection=True, dtype=dtype)
    ref64 = fp64_copy(ref)
    idx = arange(5, 2)
    grad_out = torch.randn(2, 5, 2 * 2 * 48)
    with torch.no_grad():
        eager_table = ours.table().clone()  # cached under the eager backend
    monkeypatch.setenv("PTFAST_BACKEND", "triton")
    results = [forward_and_grads(enc, idx, grad_out) for enc in (ours, ref, ref64)]
    assert_close_to_peft(results[0][0], results[1][0], results[2][0], dtype)
    for param in results[1][1]:
        assert_close_to_peft(results[0][1][param], results[1][1][param], results[2][1][param], dtype)
    with torch.no_grad():
        table = ours.table()
    assert not torch.equal(table, eager_table)  # recomputed by the kernels: the cache keys on the backend
    assert_close_to_peft(table, ref.transform(ref.embedding.weight), ref64.transform(ref64.embedding.weight), dtype)


@PROJECTION
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_forward_and_grads_match_peft_in_other_dtypes(projection, dtype):
    ref, ours = make_prefix_pair(5, 20, 2, 33, projection=projection, dtype=dtype)
    ref64 = fp64_copy(ref)
    idx = torch.tensor([[4, 0, 0, 2, 3, 1, 4], [1, 1, 2, 3, 0, 4, 2]])
    grad_out = torch.randn(2, 7, 80)
    results = [forward_and_grads(enc, idx, grad_out) for enc in (ours, ref, ref64)]
    assert_close_to_peft(results[0][0], results[1][0], results[2][0], dtype)
    for param in results[1][1]:
        assert_close_to_peft(results[0][1][param], results[1][1][param], results[2][1][param], dtype)
    with torch.no_grad():  # the cached path too
        assert_close_to_peft(ours(arange(5, 3)), ref(arange(5, 3)), ref64(arange(5, 3)), dtype)


def test_training_runs_head_once_on_the_table_rows(monkeypatch):
    """A batch of prompts runs the projection on num_virtual_tokens rows, not batch * T."""
    calls = []
    original = ptfast.prefix_encoder.fused_prefix_head
    monkeypatch.setattr(
        ptfast.prefix_encoder, "fused_prefix_head", lambda x, *rest: calls.append(tuple(x.shape)) or original(x, *rest)
    )
    _, ours = make_prefix_pair(7, 12, 3, 5, projection=True)
    ours(arange(7, 8)).sum().backward()
    assert calls == [(7, 12)]


@PROJECTION
def test_torch_compile_fullgraph(projection):
    """Traced without the Python-side cache or checks: one graph, PEFT's outputs and gradients."""
    ref, ours = make_prefix_pair(7, 12, 3, 5, projection=projection)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    idx = torch.tensor([[6, 0, 3, 3], [1, 2, 5, 4]])
    grad_out = torch.randn(2, 4, 72)
    out = compiled(idx)
    (out * grad_out).sum().backward()
    out_ref, grads_ref = forward_and_grads(ref, idx, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, grads_ref[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- the cache
@pytest.fixture
def counting_head(monkeypatch):
    """Counts how often the projection head runs."""
    calls = []
    original = ptfast.prefix_encoder.fused_prefix_head

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(ptfast.prefix_encoder, "fused_prefix_head", spy)
    return calls


def make(projection=True, **extra):
    return make_prefix_pair(7, 12, 3, 5, projection=projection, **extra)[1]


def uncached(enc, indices):
    """What an uncached forward returns now: PEFT's encoder with the same weights, dtype and mode."""
    ref = PeftPrefixEncoder(prefix_config(7, 12, 3, 5, projection="transform" in enc._modules))
    ref.to(enc.embedding.weight.dtype).load_state_dict(enc.state_dict())
    with torch.no_grad():
        return ref(indices)


def cached(enc, indices=None):
    with torch.no_grad():
        return enc(arange(7) if indices is None else indices)


def assert_fresh(enc, indices=None):
    indices = arange(7) if indices is None else indices
    torch.testing.assert_close(cached(enc, indices), uncached(enc, indices), rtol=0, atol=0)


def test_cached_forward_skips_head_and_does_not_copy(counting_head):
    enc = make()
    first = cached(enc, arange(7, 4))
    for batch in (1, 4, 8):
        out = cached(enc, arange(7, batch))
        assert out.shape == (batch, 7, 72) and out.data_ptr() == first.data_ptr()  # a view of the table
        assert_fresh(enc, arange(7, batch))
    gathered = cached(enc, torch.tensor([[3, 1, 3], [0, 6, 2]]))
    with torch.no_grad():
        assert torch.equal(gathered, enc.table()[torch.tensor([[3, 1, 3], [0, 6, 2]])])
    assert len(counting_head) == 1


def test_cache_used_when_no_parameter_requires_grad(counting_head):
    enc = make().requires_grad_(False)
    a, b = enc(arange(7)), enc(arange(7))
    assert len(counting_head) == 1 and a.grad_fn is None and torch.equal(a, b)


def test_not_cached_when_gradient_can_flow(counting_head):
    enc = make()
    out = enc(arange(7))
    enc(arange(7))
    assert len(counting_head) == 2 and out.requires_grad
    assert enc.table().requires_grad


@PROJECTION
def test_table_is_cached_never_the_parameter(projection):
    enc = make(projection)
    with torch.no_grad():
        table = enc.table()
        assert table is enc.table()
    assert table.data_ptr() != enc.embedding.weight.data_ptr()
    assert torch.equal(table, uncached(enc, arange(7))[0])


def test_without_projection_results_never_alias_the_weight():
    """PEFT's F.embedding returns a copy; ours does too (a gather with grad, the cached copy without)."""
    enc = make(projection=False)
    weight = enc.embedding.weight.detach().clone()
    with_grad = enc(arange(7))
    assert with_grad.grad_fn is not None and with_grad.data_ptr() != enc.embedding.weight.data_ptr()
    out = cached(enc, arange(7))
    out.add_(1.0)  # a caller writing into a result
    assert torch.equal(enc.embedding.weight, weight)
    assert torch.equal(cached(enc), weight.unsqueeze(0))  # the write was seen: recomputed


def test_caller_writing_into_result_is_seen(counting_head):
    enc = make()
    cached(enc).mul_(0)
    assert_fresh(enc)
    assert len(counting_head) == 2


@PROJECTION
def test_stale_after_load_state_dict(projection):
    enc = make(projection)
    cached(enc)
    enc.load_state_dict(make(projection, seed=7).state_dict())
    assert_fresh(enc)
    cached(enc)
    enc.load_state_dict(make(projection, seed=8).state_dict(), assign=True)
    assert_fresh(enc)


@PROJECTION
@pytest.mark.parametrize(
    "optimizer,fused", [("AdamW", False), ("AdamW", True), ("SGD", True)], ids=["AdamW", "AdamW-fused", "SGD-fused"]
)
def test_stale_after_optimizer_step(projection, optimizer, fused):
    """Fused optimizer kernels do not bump version counters."""
    enc = make(projection)
    kwargs = {"lr": 1e-2, "fused": True} if fused else {"lr": 1e-2}
    try:
        opt = getattr(torch.optim, optimizer)(enc.parameters(), **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        pytest.skip(f"fused {optimizer} unavailable here: {err}")
    before = cached(enc).clone()
    enc(arange(7, 2)).square().sum().backward()
    opt.step()
    assert not torch.equal(cached(enc), before)
    assert_fresh(enc)


@PROJECTION
def test_stale_after_to_dtype_and_back(projection):
    enc = make(projection)
    before = cached(enc).clone()
    enc.to(torch.bfloat16)
    assert cached(enc).dtype == torch.bfloat16
    assert_fresh(enc)
    enc.float()
    assert cached(enc).dtype == torch.float32
    assert_fresh(enc)
    assert not torch.equal(cached(enc), before)  # rounded through bf16


@pytest.mark.parametrize("param", ["embedding.weight", "transform.0.weight", "transform.2.bias"])
def test_stale_after_in_place_edit_under_no_grad(param):
    enc = make()
    cached(enc)
    with torch.no_grad():
        enc.get_parameter(param).mul_(1.5)
    assert_fresh(enc)


def test_requires_grad_toggle(counting_head):
    enc = make()
    enc.requires_grad_(False)
    enc(arange(7))
    enc.requires_grad_(True)
    out = enc(arange(7))  # a gradient can flow again: computed, with autograd
    assert out.requires_grad and len(counting_head) == 2
    out.sum().backward()
    assert enc.transform[0].weight.grad is not None


def test_training_flag_of_a_swapped_in_dropout(counting_head):
    """PEFT's head ignores the training flag; a head edited to have dropout is stochastic in training mode: each
    call draws anew, as uncached, and nothing drawn is served later in eval mode."""
    enc = make()
    enc.transform.insert(2, nn.Dropout(0.5))
    enc.eval()
    eval_out = cached(enc).clone()
    with torch.no_grad():
        assert torch.equal(eval_out[0], enc.transform(enc.embedding.weight))  # what running the modules gives
    enc.train()
    first, second = cached(enc).clone(), cached(enc).clone()
    assert not torch.equal(first, second) and not torch.equal(first, eval_out)
    enc.eval()
    assert torch.equal(cached(enc), eval_out)
    assert not counting_head  # no longer PEFT's plain head: the modules themselves ran


def test_a_dropout_in_training_gives_each_row_its_own_draw():
    """With a dropout in the head, in training mode, every call (with or without a gradient) is PEFT's computation
    on its own rows: equal to PEFT's encoder on the same seed, each row of a batch its own draw."""
    ref, enc = make_prefix_pair(7, 12, 3, 5, projection=True)
    for e in (ref, enc):
        e.transform.insert(2, nn.Dropout(0.5))
        e.train()
    for batch, grad in ((3, True), (3, False), (1, True)):
        with torch.set_grad_enabled(grad):
            torch.manual_seed(batch)
            got = enc(arange(7, batch))
            torch.manual_seed(batch)
            expected = ref(arange(7, batch))
        assert torch.equal(got, expected), (batch, grad)
        assert batch == 1 or not torch.equal(got[0], got[1])


def test_forward_hook_on_head_runs_and_is_seen():
    enc = make()
    plain = cached(enc).clone()
    handle = enc.transform[2].register_forward_hook(lambda module, args, out: out * 2)
    torch.testing.assert_close(cached(enc), plain * 2, rtol=0, atol=0)
    handle.remove()
    assert torch.equal(cached(enc), plain)


def test_process_wide_hook_registered_after_caching():
    enc = make()
    plain = cached(enc).clone()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 2 if isinstance(module, nn.Linear) else None
    )
    try:
        with torch.no_grad():
            expected = enc.transform(enc.embedding.weight)  # what running the modules gives under the hook
        assert torch.equal(cached(enc)[0], expected)
    finally:
        handle.remove()
    assert torch.equal(cached(enc), plain)


@pytest.mark.gpu
@PROJECTION
def test_stale_after_to_device(projection):
    enc = make(projection)
    on_cpu = cached(enc).clone()
    enc.cuda()
    on_gpu = cached(enc, arange(7).cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="on cpu but the encoder's weights are on cuda"):
        cached(enc)
    enc.cpu()
    assert torch.equal(cached(enc), on_cpu)


def test_autocast_is_part_of_the_key():
    enc = make()
    plain = cached(enc).clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = cached(enc)
        expected = uncached(enc, arange(7))
    assert under.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(under, expected)
    assert torch.equal(cached(enc), plain) and cached(enc).dtype == torch.float32


def test_writes_through_data_need_invalidate_cache():
    enc = make()
    cached(enc)
    enc.transform[0].weight.data.mul_(2)  # invisible to version counters (documented)
    enc.invalidate_cache()
    assert_fresh(enc)


def test_inference_mode_calls():
    enc = make()
    with torch.inference_mode():
        out = enc(arange(7, 2))
    assert torch.equal(out, uncached(enc, arange(7, 2)))
    cached(enc).add_(0)  # the cached table is a normal tensor, writable outside inference mode


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("projection", [True, False], ids=["projection", "no-projection"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize(
    "indices,error,match",
    [
        (torch.tensor([[0, 7]]), IndexError, r"out of range.*\[0, 7\].*7 virtual tokens"),
        (torch.tensor([[-1, 2]]), IndexError, r"out of range.*\[-1, 2\]"),
        (torch.tensor([[0.0, 1.0]]), TypeError, "integer"),
        (torch.tensor([0, 1]), ValueError, r"shape \(batch, num_tokens\).*1 dims"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "3 dims"),
        (torch.zeros(1, 2, dtype=torch.long, device="meta"), ValueError, "on meta but the encoder's weights are on"),
        ([[0, 1]], TypeError, "torch.Tensor"),
    ],
    ids=["too-large", "negative", "float", "rank-1", "rank-3", "device", "list"],
)
def test_bad_indices_raise_clear_errors(indices, error, match, grad, projection):
    enc = make(projection)
    with torch.set_grad_enabled(grad), pytest.raises(error, match=match):
        enc(indices)


def test_bad_index_after_good_one_still_raises():
    enc = make()
    idx = torch.tensor([[0, 1, 2]])
    cached(enc, idx)
    idx[0, 1] = 9
    with pytest.raises(IndexError, match="out of range"):
        cached(enc, idx)


def test_int32_indices_and_empty_batch():
    enc = make()
    idx = torch.tensor([[4, 0, 2]])
    assert torch.equal(enc(idx.int()), enc(idx))
    assert enc(torch.zeros(0, 7, dtype=torch.long)).shape == (0, 7, 72)


# ---------------------------------------------------------------------------------------------------- conversions
@PROJECTION
def test_from_peft_copies_weights_dtype_mode_and_flags(projection):
    ref, _ = make_prefix_pair(7, 12, 3, 5, projection=projection, dtype=torch.bfloat16)
    ref.embedding.weight.requires_grad_(False)
    ref.eval()
    ours = PrefixEncoder.from_peft(ref)
    assert type(ours) is PrefixEncoder and not ours.training
    for (n, p), (m, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n == m and q is not p and q.dtype == torch.bfloat16 and q.requires_grad == p.requires_grad
        assert torch.equal(p, q)
    with torch.no_grad():
        assert torch.equal(ours(arange(7, 2)), ref(arange(7, 2)))
    if projection:
        assert (ours.token_dim, ours.num_layers, ours.hidden_size, ours.output_size) == (12, 3, 5, 72)
    else:  # PEFT's encoder records only the table's width
        assert (ours.token_dim, ours.num_layers, ours.output_size) == (None, None, 72)


def test_from_peft_can_share_parameters():
    ref, _ = make_prefix_pair(7, 12, 3, 5, projection=True)
    ours = PrefixEncoder.from_peft(ref, share_parameters=True)
    assert all(p is q for p, q in zip(ref.parameters(), ours.parameters()))
    torch.optim.SGD(ref.parameters(), lr=0.1)  # an optimizer holding PEFT's parameters trains ours
    before = cached(ours).clone()
    ref(arange(7)).sum().backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    assert not torch.equal(cached(ours), before)
    assert torch.equal(cached(ours), cached(ref))


def test_from_peft_inference_mode_encoder():
    ref, _ = make_prefix_pair(4, 6, 2, 3, projection=True, inference_mode=True)
    ours = PrefixEncoder.from_peft(ref)
    assert "transform" not in ours._modules and ours.prefix_projection
    assert torch.equal(cached(ours, arange(4)), ref.embedding.weight.detach().unsqueeze(0))


@PROJECTION
def test_pickle_deepcopy_and_torch_save(projection):
    enc = make(projection).eval()
    expected = cached(enc).clone()
    buffer = io.BytesIO()
    torch.save(enc, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert type(other) is PrefixEncoder and other._cache.table is None and other._index_check is None
        assert torch.equal(cached(other), expected)
        with torch.no_grad():
            other.embedding.weight.add_(1.0)  # the copy's own parameters: the original is untouched
        assert_fresh(other)
    assert torch.equal(cached(enc), expected)


def test_load_prompt_embeddings_and_peft_checkpoint_hook():
    plain = make(projection=False)
    table = torch.randn(7, 72)
    plain.load_prompt_embeddings(table)
    assert torch.equal(cached(plain)[0], table)
    plain._load_adapter_state_dict({"prompt_embeddings": table * 2})
    assert torch.equal(cached(plain)[0], table * 2)
    with pytest.raises(ValueError, match="Invalid `prompt_embeddings` shape"):
        plain.load_prompt_embeddings(torch.randn(7, 70))
    projected = make()
    with pytest.raises(ValueError, match="prefix_projection=True"):
        projected.load_prompt_embeddings(table)
    with pytest.raises(RuntimeError, match=r"only the projected table \(7, 72\).*ptfast.load_for_training"):
        projected._load_adapter_state_dict({"prompt_embeddings": table})


# ---------------------------------------------------------------------------------------------------- fused_prefix_head
def test_fused_prefix_head_is_peft_head_op_for_op():
    head = nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 18))
    x = torch.randn(2, 3, 12, requires_grad=True)
    params = (head[0].weight, head[0].bias, head[2].weight, head[2].bias)
    out = fused_prefix_head(x, *params)
    expected = head(x)
    assert torch.equal(out, expected)
    grads = torch.autograd.grad(out.sum(), (x, *params))
    expected_grads = torch.autograd.grad(expected.sum(), (x, *params))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert torch.autograd.gradcheck(
        prefix_head_reference, tuple(t.detach().double().requires_grad_() for t in (x[0], *params))
    )


_X, _W1, _B1, _W2, _B2 = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), torch.randn(6, 5), torch.randn(6)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((_X.long(), _W1, _B1, _W2, _B2), TypeError, "x must be a floating-point tensor"),
        ((_X, _W1.double(), _B1, _W2, _B2), TypeError, "share x's dtype torch.float32, but w1 is torch.float64"),
        ((_X, _W1, _B1.to("meta"), _W2, _B2), ValueError, "b1 is on meta"),
        ((_X, _W1, _B1, _W2, [0.0]), TypeError, "b2 must be a torch.Tensor"),
        ((_X, _W1[:, :3], _B1, _W2, _B2), ValueError, r"w1 has shape \(5, 3\), expected \(5, 4\)"),
        ((_X, _W1, _B1, _W2[:, :4], _B2), ValueError, r"w2 has shape \(6, 4\), expected \(6, 5\)"),
        ((_X, _W1, _B1, _W2, _B2[:5]), ValueError, r"b2 has shape \(5,\), expected \(6,\)"),
        ((_X, _W1, _B1.unsqueeze(0), _W2, _B2), ValueError, "b1 must be 1-D"),
        ((_X[0, 0], _W1, _B1, _W2, _B2), ValueError, "0-d tensor"),
    ],
    ids=["int-x", "dtype", "device", "not-tensor", "w1-shape", "w2-shape", "b2-shape", "b1-rank", "0-d"],
)
def test_fused_prefix_head_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fused_prefix_head(*args)


# ---------------------------------------------------------------------------------------------------- checkpoints
def prefix_model(projection=True, seed=0, **extra):
    config = prefix_config(3, None, None, 16, projection=projection, **extra)
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama_causal_lm(), config)


def train(model, steps=2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        ids, mask = random_batch(2, 6, seed=step)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@PROJECTION
def test_full_prefix_encoder_state_resume(tmp_path, projection):
    src = prefix_model(projection)
    train(src)
    src.save_pretrained(tmp_path)
    paths = save_encoder_state(src, tmp_path)
    assert paths == [str(tmp_path / ENCODER_STATE_FILE)]
    encoder = src.prompt_encoder["default"]
    with safe_open(paths[0], "pt") as f:
        assert sorted(f.keys()) == sorted(encoder.state_dict())
        assert f.metadata()["peft_type"] == "PREFIX_TUNING"
        assert f.metadata()["prefix_projection"] == str(projection)

    # PEFT's own file is the table only; plain PEFT still loads the directory, ignoring ours
    plain = PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path)
    torch.testing.assert_close(
        plain.prompt_encoder["default"].embedding.weight, src.get_prompt_embedding_to_save("default"), rtol=0, atol=0
    )
    # and PEFT's loader fills ptfast's inference-mode encoder through the _load_adapter_state_dict hook
    plain.prompt_encoder["default"] = PrefixEncoder.from_peft(plain.prompt_encoder["default"])
    with torch.no_grad():
        plain.prompt_encoder["default"].embedding.weight.zero_()
    set_peft_model_state_dict(plain, load_peft_weights(str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(plain.prompt_encoder["default"].table(), src.get_prompt_embedding_to_save("default"))

    restored = load_for_training(tiny_llama_causal_lm(), tmp_path, patch=False)
    assert not restored.peft_config["default"].inference_mode
    for (n, p), (m, q) in zip(encoder.named_parameters(), restored.prompt_encoder["default"].named_parameters()):
        assert n == m and q.requires_grad and torch.equal(p, q), n

    # the same through ptfast's encoder: load_encoder_state into a model whose encoder was swapped for ours
    manual_config = PeftConfig.from_pretrained(tmp_path)
    manual_config.inference_mode = False
    manual = get_peft_model(tiny_llama_causal_lm(), manual_config)
    manual.prompt_encoder["default"] = PrefixEncoder.from_peft(manual.prompt_encoder["default"], share_parameters=True)
    with torch.no_grad():
        stale = manual.prompt_encoder["default"].table().clone()
    load_encoder_state(manual, tmp_path)
    with torch.no_grad():
        assert not torch.equal(manual.prompt_encoder["default"].table(), stale)
    assert torch.equal(manual.get_prompt_embedding_to_save("default"), src.get_prompt_embedding_to_save("default"))

    # training continues identically (fresh AdamW on both sides), PEFT's encoder and ours alike
    src_losses = train(copy.deepcopy(src))
    assert train(restored) == pytest.approx(src_losses, rel=1e-5)
    assert train(manual) == pytest.approx(src_losses, rel=1e-5)


def test_prefix_checkpoint_errors(tmp_path):
    src = prefix_model(projection=True)
    src.save_pretrained(tmp_path)
    save_encoder_state(src, tmp_path)
    inference_only = PeftModel.from_pretrained(tiny_llama_causal_lm(), tmp_path)
    with pytest.raises(ValueError, match="without a projection head .* holds the projection head"):
        load_encoder_state(inference_only, tmp_path)
    no_projection = prefix_model(projection=False)
    with pytest.raises(ValueError, match="without a projection head"):
        load_encoder_state(no_projection, tmp_path)

    save_encoder_state(no_projection, tmp_path / "plain")
    with pytest.raises(ValueError, match=r"missing keys \['transform.0.bias'.*unexpected keys \[\]"):
        load_encoder_state(src, tmp_path / "plain")

    # PEFT's table-only checkpoint cannot resume a projection encoder; ptfast's hook says so
    trainable = prefix_model(projection=True, seed=3)
    trainable.prompt_encoder["default"] = PrefixEncoder.from_peft(trainable.prompt_encoder["default"])
    with pytest.raises(RuntimeError, match="only the projected table"):
        trainable.load_adapter(tmp_path, "default", is_trainable=True)


@PROJECTION
def test_refresh_after_values_changed(projection, monkeypatch, counting_head):
    """After only values changed (an SGD step here) the table is refreshed by the computation chosen when it was
    computed in full, without choosing again, and equals PEFT's encoder on the new weights."""
    enc = make(projection=projection)
    fills = []
    original = PrefixEncoder._bind_table
    monkeypatch.setattr(PrefixEncoder, "_bind_table", lambda self: fills.append(1) or original(self))
    before = cached(enc).clone()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    enc(arange(7, 2)).square().sum().backward()
    opt.step()
    runs = len(counting_head)
    refreshed = cached(enc)
    assert len(fills) == 1 and not torch.equal(refreshed, before)
    assert len(counting_head) == runs + projection  # the projection ran once more, as the refresh
    assert_fresh(enc)
    refreshed.mul_(0)  # a write into the table: the next call computes, it never reaches the parameter
    assert not torch.equal(enc.embedding.weight, torch.zeros_like(enc.embedding.weight))
    assert_fresh(enc)


def test_bias_set_to_none_is_seen():
    """``layer.bias = None`` runs no registration hook; the table is computed by the modules from then on, after an
    optimizer step too."""
    enc = make()
    cached(enc)
    enc.transform[2].bias = None
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    for _ in range(2):
        with torch.no_grad():
            expected = enc.transform(enc.embedding.weight)
        torch.testing.assert_close(cached(enc)[0], expected, rtol=1e-5, atol=1e-6)
        enc(arange(7, 2)).square().sum().backward()
        opt.step()


@PROJECTION
def test_forward_hook_on_the_embedding_runs_as_in_peft(projection):
    """PEFT calls the embedding module on the prefix indices, so its forward hooks run: so do ours."""
    enc = make(projection=projection)
    ref = PeftPrefixEncoder(prefix_config(7, 12, 3, 5, projection=projection))
    ref.load_state_dict(enc.state_dict())
    cached(enc)
    for module in (enc.embedding, ref.embedding):
        module.register_forward_hook(lambda module, args, out: out * 2 + 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(arange(7, 2)), ref(arange(7, 2)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- train steps
@PROJECTION
def test_prepared_train_steps_match_peft(hit_check, projection, monkeypatch):
    """With the native check, train steps reuse the computation prepared at the first (``TableCache.trained``: no
    full computation); with either check they give bitwise PEFT's outputs and gradients step after step, and a
    layer put straight into the projection's dict is seen."""
    ref, ours = make_prefix_pair(7, 12, 3, 5, projection=projection)
    full = []
    original = PrefixEncoder._compute_table
    monkeypatch.setattr(PrefixEncoder, "_compute_table", lambda self: full.append(1) or original(self))

    def step():
        grad = torch.randn(1, 7, 72)
        for p in (*ours.parameters(), *ref.parameters()):
            p.grad = None
        got, expected = ours(arange(7)), ref(arange(7))
        got.backward(grad)
        expected.backward(grad)
        assert torch.equal(got, expected)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), name
        with torch.no_grad():
            for p in (*ours.parameters(), *ref.parameters()):
                p.sub_(1e-2 * p.grad)

    for _ in range(3):
        step()
    if projection:  # (without one, a train step indexes the embedding itself, as PEFT does: no table)
        assert len(full) == (0 if hit_check == "native" else 3)
        layer = nn.Linear(5, 72)
        twin = nn.Linear(5, 72)
        twin.load_state_dict(layer.state_dict())
        ours.transform._modules["2"], ref.transform._modules["2"] = layer, twin
        for _ in range(2):
            step()
