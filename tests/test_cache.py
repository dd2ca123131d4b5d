"""The cached virtual-token table: used when no gradient can flow, and never stale.

Every staleness test first fills the cache, then changes the encoder, then compares the cached forward with an
uncached reference computed by PEFT's encoder from the current weights. Each would fail if the cache were never
invalidated.
"""

import warnings

import pytest
import torch
from peft import PromptEncoderConfig as PeftConfig
from peft.tuners.p_tuning import PromptEncoder as PeftEncoder

import ptfast
from ptfast import PromptEncoder
from tests.helpers.settings import fp32_settings_restored

T, D, H = 7, 48, 19

# Every cache test runs on each MLP-head backend (eager, and Triton where it can run: the interpreter on CPU).
pytestmark = pytest.mark.usefixtures("backend", "hit_check")


def make(kind="MLP", *, token_dim=D, hidden=H, **extra):
    cfg = PeftConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=T,
        token_dim=token_dim,
        encoder_hidden_size=hidden,
        num_transformer_submodules=1,
        encoder_reparameterization_type=kind,
        **extra,
    )
    return PromptEncoder(cfg), cfg


def arange(batch=1):
    return torch.arange(T).unsqueeze(0).expand(batch, -1)


def uncached(enc, cfg, indices):
    """What an uncached forward returns now: PEFT's encoder with the same weights, dtype and mode."""
    ref = PeftEncoder(cfg).to(enc.embedding.weight.dtype)
    ref.load_state_dict(enc.state_dict())
    ref.train(enc.training)
    with torch.no_grad():
        return ref(indices)


def cached(enc, indices=None):
    with torch.no_grad():
        return enc(arange() if indices is None else indices)


@pytest.fixture
def counting_head(monkeypatch):
    """Counts how often the MLP head runs: as ``fused_mlp_head``, as the table's refresh (``bind_mlp_head``), or as
    a prepared train step (``bind_mlp_head_train``)."""
    calls = []
    fused, bind, bind_train = (
        ptfast.encoder.fused_mlp_head,
        ptfast.encoder.bind_mlp_head,
        ptfast.encoder.bind_mlp_head_train,
    )

    def fused_spy(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    def bind_spy(*args):
        refresh = bind(*args)

        def counted():
            calls.append(args[0].shape)
            return refresh()

        return counted

    def bind_train_spy(*args):
        step = bind_train(*args)
        if step is None:
            return None

        def counted():
            out = step()
            if out is not None:  # else the full computation runs, and counts
                calls.append(args[0].shape)
            return out

        return counted

    monkeypatch.setattr(ptfast.encoder, "fused_mlp_head", fused_spy)
    monkeypatch.setattr(ptfast.encoder, "bind_mlp_head", bind_spy)
    monkeypatch.setattr(ptfast.encoder, "bind_mlp_head_train", bind_train_spy)
    return calls


# ---------------------------------------------------------------------------- when the cache is used
def test_cached_forward_skips_head_and_does_not_copy(counting_head):
    enc, cfg = make()
    first = cached(enc, arange(4))
    assert len(counting_head) == 1
    for batch in (1, 4, 8):
        out = cached(enc, arange(batch))
        assert out.shape == (batch, T, D)
        assert out.data_ptr() == first.data_ptr()  # a view of the table, no copy
        torch.testing.assert_close(out, uncached(enc, cfg, arange(batch)), rtol=1e-5, atol=1e-6)
    assert len(counting_head) == 1
    gathered = cached(enc, torch.tensor([[3, 1, 3], [0, 6, 2]]))
    assert len(counting_head) == 1
    assert torch.equal(gathered, enc.table()[torch.tensor([[3, 1, 3], [0, 6, 2]])])


def test_cache_used_when_no_parameter_requires_grad(counting_head):
    enc, _ = make()
    enc.requires_grad_(False)
    a, b = enc(arange()), enc(arange())  # grad mode on, but nothing to differentiate
    assert len(counting_head) == 1 and a.grad_fn is None and torch.equal(a, b)


def test_not_cached_when_gradient_can_flow(counting_head):
    enc, _ = make()
    out = enc(arange())
    enc(arange())
    assert len(counting_head) == 2 and out.requires_grad


def test_table_is_cached_and_matches_uncached():
    enc, cfg = make()
    with torch.no_grad():
        assert enc.table() is enc.table()
    torch.testing.assert_close(cached(enc)[0], uncached(enc, cfg, arange())[0], rtol=1e-5, atol=1e-6)
    assert enc.table().requires_grad  # with grad flowing, computed now


def test_inference_mode_tensors_are_fine():
    enc, cfg = make()
    with torch.inference_mode():
        out = enc(arange(2))
        again = enc(torch.arange(T).unsqueeze(0))  # an inference tensor as indices
    torch.testing.assert_close(out, uncached(enc, cfg, arange(2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, out[:1], rtol=0, atol=0)
    cached(enc).add_(0)  # the cache is a normal tensor, usable and writable outside inference mode


def test_tensors_without_memory_are_never_cached():
    """A wrapper subclass (FSDP's DTensor, say) has no memory of its own to record or hold (its data_ptr is 0): the
    snapshot refuses it, so such a module is never cached, and nothing raises."""
    from ptfast._cache import Snapshot

    class NoMemory(torch.Tensor):
        @staticmethod
        def __new__(cls, like):
            return torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(str(func))

    module = torch.nn.Linear(3, 2)
    assert Snapshot.take(module) is not None
    module.register_buffer("sharded", NoMemory(torch.randn(4)))
    assert Snapshot.take(module) is None


# ---------------------------------------------------------------------------- staleness
def assert_fresh(enc, cfg, indices=None):
    indices = arange() if indices is None else indices
    torch.testing.assert_close(cached(enc, indices), uncached(enc, cfg, indices), rtol=1e-5, atol=1e-6)


def test_stale_after_load_state_dict():
    enc, cfg = make()
    cached(enc)
    enc.load_state_dict(make()[0].state_dict())
    assert_fresh(enc, cfg)


def test_stale_after_load_state_dict_assign():
    enc, cfg = make()
    cached(enc)
    enc.load_state_dict(make()[0].state_dict(), assign=True)
    assert_fresh(enc, cfg)


def test_stale_after_dtype_round_trip():
    """half() then float() rounds the weights; storage may even come back at the old address."""
    enc, cfg = make()
    before = cached(enc).clone()
    enc.half()
    assert cached(enc).dtype == torch.float16
    enc.float()
    assert not torch.equal(cached(enc), before)
    assert_fresh(enc, cfg)


def test_stale_after_to_dtype(backend):
    if backend == "triton":
        pytest.skip("float64 has no Triton kernel (forcing Triton raises; test_encoder_triton checks the message)")
    enc, cfg = make()
    cached(enc)
    enc.to(torch.float64)
    assert cached(enc).dtype == torch.float64
    assert_fresh(enc, cfg)


@pytest.mark.gpu
def test_stale_after_to_device():
    enc, cfg = make()
    cached(enc)
    enc.cuda()
    out = cached(enc, arange().cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), uncached(enc.cpu(), cfg, arange()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("param", ["embedding.weight", "mlp_head.0.weight", "mlp_head.4.bias"])
def test_stale_after_in_place_edit_under_no_grad(param):
    enc, cfg = make()
    cached(enc)
    with torch.no_grad():
        enc.get_parameter(param).add_(0.5)
    assert_fresh(enc, cfg)


def test_requires_grad_toggle():
    enc, cfg = make()
    enc.requires_grad_(False)
    frozen = enc(arange())
    assert frozen.grad_fn is None
    enc.requires_grad_(True)
    live = enc(arange())
    assert live.grad_fn is not None
    live.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    with torch.no_grad():
        enc.mlp_head[2].weight.mul_(1.5)
    enc.requires_grad_(False)
    assert not torch.equal(enc(arange()), frozen)
    assert_fresh(enc, cfg)


def test_swapped_submodule_is_seen():
    enc, cfg = make()
    cached(enc)
    enc.mlp_head[4] = torch.nn.Linear(H, D)
    assert_fresh(enc, cfg)


def test_lstm_dropout_train_eval():
    torch.manual_seed(0)
    enc, cfg = make("LSTM", encoder_num_layers=2, encoder_dropout=0.5)
    enc.eval()
    evaluated = cached(enc).clone()
    assert_fresh(enc, cfg)
    enc.train()
    a, b = cached(enc), cached(enc)
    assert not torch.equal(a, evaluated) and not torch.equal(a, b)  # dropout is live: never served from a cache
    enc.eval()
    assert torch.equal(cached(enc), evaluated)


def test_caller_writing_into_forward_result():
    enc, cfg = make()
    out = cached(enc)
    out.add_(1.0)  # a view of the cached table
    assert_fresh(enc, cfg)


def test_caller_writing_into_table():
    enc, cfg = make()
    with torch.no_grad():
        enc.table().zero_()
    assert_fresh(enc, cfg)
    assert enc.table().abs().sum() > 0


def test_caller_writing_into_inference_mode_table():
    enc, cfg = make(inference_mode=True)
    weight = enc.embedding.weight.detach().clone()
    with torch.no_grad():
        enc.table().zero_()
        enc(arange()).mul_(3)
    assert torch.equal(enc.embedding.weight, weight)  # the parameter is never handed out
    assert torch.equal(cached(enc)[0], weight)


def test_stale_after_submodule_dtype_change(backend):
    """``.double()`` on the head alone never reaches the encoder's ``_apply``, and bumps no version counter: the
    snapshot sees the parameters' new memory. The next call computes, and (as PEFT's encoder does) refuses the
    mixed dtypes instead of serving the old fp32 table."""
    enc, cfg = make()
    cached(enc)
    enc.mlp_head.double()
    with pytest.raises((RuntimeError, TypeError), match="dtype|double|Double|float"):
        cached(enc)
    peft = PeftEncoder(cfg)
    peft.mlp_head.double()
    with pytest.raises(RuntimeError):
        peft(arange())
    with torch.no_grad():
        enc.mlp_head[4].bias.add_(1.0)  # so that a stale table differs from the fresh one after the round trip
    enc.mlp_head.float()
    assert_fresh(enc, cfg)


def test_stale_after_assigning_data():
    """``p.data = t`` keeps the version counter but not the memory."""
    enc, cfg = make()
    before = cached(enc).clone()
    weight = enc.mlp_head[4].weight
    weight.data = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(cached(enc), before)
    assert_fresh(enc, cfg)


def test_stale_after_assigning_data_twice(backend):
    """Two ``p.data = t`` in a row without a call between: the first frees the cached weight's memory, and the
    second's tensor may be allocated right there, at the recorded address with the same version counter, unless the
    snapshot holds that memory. Many sizes, since where the allocator puts a tensor depends on its size."""
    if backend == "triton":
        pytest.skip("the cache logic is the backends' common part; the interpreter would take minutes here")
    stale = []
    for width in (16, 32, 48, 64, 100, 128, 256):
        for hidden in (8, 16, 19, 32, 64):
            enc, cfg = make(token_dim=width, hidden=hidden)
            weight = enc.mlp_head[4].weight
            weight.data = torch.zeros(weight.shape)
            before = cached(enc).clone()
            weight.data = torch.ones(weight.shape)
            weight.data = torch.full(weight.shape, 5.0)
            if torch.equal(cached(enc), before):
                stale.append((width, hidden))
            else:
                assert_fresh(enc, cfg)
    assert not stale, f"stale tables at (token_dim, hidden) {stale}"


@pytest.mark.parametrize("view", ["transposed", "narrowed"])
def test_stale_after_assigning_a_view_of_the_same_memory(view):
    """``p.data = p.data.t()`` (or a narrower view) keeps the address and the version counter; the sizes and strides
    show it. The square layer (H, H) keeps its shape when transposed, so only the strides differ."""
    enc, cfg = make()
    weight = enc.mlp_head[2].weight
    before = cached(enc).clone()
    if view == "transposed":
        weight.data = weight.data.t()
        assert not torch.equal(cached(enc), before)
        assert_fresh(enc, cfg)
    else:
        weight.data = weight.data[:-1]
        with pytest.raises((RuntimeError, ValueError)):  # the head no longer fits together, as PEFT's would not
            cached(enc)


def test_writes_through_data_need_invalidate_cache():
    """The documented limit: an in-place write through .data bypasses version counters and keeps the memory, so
    only invalidate_cache() can tell."""
    enc, cfg = make()
    before = cached(enc).clone()
    enc.mlp_head[4].bias.data.add_(1.0)
    assert torch.equal(cached(enc), before)  # stale, as documented
    enc.invalidate_cache()
    assert_fresh(enc, cfg)


def test_lstm_non_arange_indices_are_not_served_from_table():
    """The LSTM reads whole rows: only the canonical arange row may come from the table."""
    enc, cfg = make("LSTM")
    for idx in (torch.tensor([[2, 0, 1]]), torch.arange(T).flip(0).unsqueeze(0), arange(3)):
        assert_fresh(enc, cfg, idx)


def test_inference_mode_output_with_grad_is_not_the_leaf():
    enc, _ = make(inference_mode=True)
    out = enc(arange())
    assert out.requires_grad and out._base is not None
    out.add_(1.0)  # allowed on a view of a non-leaf, as on PEFT's repeated prompts
    assert not torch.equal(out[0], enc.embedding.weight)


def _head_now(enc):
    """The table as the modules themselves compute it now (whatever they are), on PEFT's (1, T, D) rows."""
    with torch.no_grad():
        return enc.mlp_head(enc.embedding.weight[None])[0]


def test_swapped_in_layer_without_bias():
    enc, _ = make()
    cached(enc)
    enc.mlp_head[4] = torch.nn.Linear(H, D, bias=False)
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)


def test_swapped_activation_is_seen():
    """A parameterless submodule swap changes the computation: the head's own modules run, and the key sees it."""
    enc, _ = make()
    cached(enc)
    enc.mlp_head[1] = torch.nn.GELU()
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)


def test_forward_hook_on_head_runs_and_is_seen():
    enc, _ = make()
    cached(enc)
    handle = enc.mlp_head[4].register_forward_hook(lambda module, args, out: out * 2)
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)
    handle.remove()
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer,fused",
    [("AdamW", False), ("Adam", True), ("AdamW", True), ("SGD", True), ("Adagrad", True)],
    ids=["AdamW", "Adam-fused", "AdamW-fused", "SGD-fused", "Adagrad-fused"],
)
def test_stale_after_optimizer_step(optimizer, fused):
    """Fused kernels (the Hugging Face Trainer's default AdamW) do not bump version counters."""
    enc, cfg = make()
    kwargs = {"lr": 1e-2, "fused": True} if fused else {"lr": 1e-2}
    try:
        opt = getattr(torch.optim, optimizer)(enc.parameters(), **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        pytest.skip(f"fused {optimizer} unavailable here: {err}")
    before = cached(enc).clone()
    enc(arange(2)).square().sum().backward()
    opt.step()
    assert not torch.equal(cached(enc), before)
    assert_fresh(enc, cfg)


def test_autocast_is_part_of_the_key(backend):
    if backend == "triton":
        pytest.skip("under autocast the head runs eagerly, as PEFT computes it (auto backend; tested on CUDA)")
    enc, cfg = make()
    plain = cached(enc).clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = cached(enc)
        with torch.no_grad():
            expected = uncached(enc, cfg, arange())
    assert under.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(under, expected, rtol=0, atol=0)
    assert torch.equal(cached(enc), plain) and cached(enc).dtype == torch.float32


def test_parameters_made_under_inference_mode():
    """Inference tensors have no version counter: such an encoder works, uncached."""
    with torch.inference_mode():
        enc, cfg = make()
        out = enc(arange())
    with torch.no_grad():
        torch.testing.assert_close(enc(arange()), out, rtol=0, atol=0)


# ---------------------------------------------------------------------------- what else the key covers
def test_training_flag_of_a_swapped_in_dropout():
    """Mode is in the key: a train-mode no-grad table must not be served after eval()."""
    enc, _ = make()
    enc.mlp_head[1] = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.5))
    enc.train()
    cached(enc)
    enc.eval()
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)


def _dropout_in_the_head(enc):
    enc.mlp_head[1] = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.5))


def _batchnorm_in_the_head(enc):
    enc.mlp_head[1] = torch.nn.Sequential(torch.nn.BatchNorm1d(T), torch.nn.ReLU())  # (B, T, H): T channels


@pytest.mark.parametrize(
    "kind, edit",
    [("MLP", _dropout_in_the_head), ("MLP", _batchnorm_in_the_head), ("LSTM", None)],
    ids=["dropout", "batchnorm", "lstm-dropout"],
)
def test_a_module_that_computes_differently_in_training_runs_as_in_peft(kind, edit):
    """A module whose training mode computes differently (a dropout draws, a BatchNorm updates its running
    statistics and normalizes over the batch; an LSTM with dropout between layers), in training mode: each call,
    with or without a gradient, is PEFT's computation on its own rows (equal to PEFT's encoder on the same seed, every
    row its own draw), nothing is cached, and the buffers move as PEFT's do. Back in eval mode the table is cached."""
    extra = {"encoder_num_layers": 2, "encoder_dropout": 0.5} if kind == "LSTM" else {}
    enc, cfg = make(kind, **extra)
    ref = PeftEncoder(cfg)
    if edit is not None:
        edit(enc)
        edit(ref)
    ref.load_state_dict(enc.state_dict())
    enc.train()
    ref.train()
    for batch, grad in ((1, False), (3, False), (3, True), (1, True)):
        with torch.set_grad_enabled(grad):
            torch.manual_seed(batch)
            got = enc(arange(batch))
            torch.manual_seed(batch)
            expected = ref(arange(batch))
        assert torch.equal(got, expected), (batch, grad)
        if batch > 1 and edit is not _batchnorm_in_the_head:
            assert not torch.equal(got[0], got[1])  # each row its own draw
        for (name, a), b in zip(enc.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), name  # running statistics updated as PEFT's
    assert not torch.equal(cached(enc), cached(enc)) or edit is _batchnorm_in_the_head  # a fresh draw each call
    enc.eval()
    first = cached(enc)
    assert cached(enc).data_ptr() == first.data_ptr()  # eval mode: the table is cached


def test_buffers_of_a_batchnorm_in_the_head():
    """A train-mode forward updates running statistics (buffer versions): the eval table sees the new ones."""
    enc, _ = make()
    _batchnorm_in_the_head(enc)
    enc.eval()
    cached(enc)
    enc.train()
    cached(enc)  # updates running_mean / running_var in place
    enc.eval()
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        enc.mlp_head[1][0].running_mean.add_(0.5)  # a buffer alone changes, in the same mode
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)


def test_backend_choice_is_in_the_key(counting_head, monkeypatch):
    monkeypatch.delenv("PTFAST_BACKEND", raising=False)
    enc, _ = make()
    cached(enc)
    cached(enc)
    assert len(counting_head) == 1
    monkeypatch.setenv("PTFAST_BACKEND", "eager")
    cached(enc)
    assert len(counting_head) == 2  # another backend can round differently: computed again


def test_cpu_thread_count_is_in_the_key(counting_head):
    """CPU matmuls may split their sums differently with another thread count (the last bits move): a table cached
    at one count is computed again at another, and served again once the count is back."""
    enc, _ = make()
    old = torch.get_num_threads()
    cached(enc)
    try:
        torch.set_num_threads(1 if old != 1 else 2)
        cached(enc)
        assert len(counting_head) == 2
    finally:
        torch.set_num_threads(old)
    cached(enc)
    assert len(counting_head) == 3  # and back (the table of the other count is the one cached)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no fp32_precision")
def test_fp32_matmul_precision_is_in_the_key(counting_head):
    enc, _ = make()
    cached(enc)
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if old != "tf32" else "ieee"
    try:
        cached(enc)
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    assert len(counting_head) == 2
    cached(enc)
    assert len(counting_head) == 3  # and back


@pytest.mark.parametrize("setting", ["mkldnn", "mkldnn.matmul", "mkldnn.rnn"])
def test_onednn_fp32_precision_is_in_the_key(counting_head, setting):
    """oneDNN's fp32 precision (``torch.backends.mkldnn[.matmul|.rnn].fp32_precision = "bf16"``) changes what the
    head computes on CPUs with bf16 support: a table cached before does not serve after."""
    owner = torch.backends
    for part in setting.split("."):
        owner = getattr(owner, part)
    enc, _ = make()
    cached(enc)
    old = owner.fp32_precision
    owner.fp32_precision = "bf16" if old != "bf16" else "ieee"
    try:
        cached(enc)
    finally:
        owner.fp32_precision = old
    assert len(counting_head) == 2
    cached(enc)
    assert len(counting_head) == 3  # and back


def test_process_wide_hook_registered_after_caching():
    enc, cfg = make()
    before = cached(enc).clone()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 3 if isinstance(module, torch.nn.Linear) else None
    )
    try:
        now = cached(enc)
        expected = uncached(enc, cfg, arange())  # PEFT's encoder runs under the same hook
    finally:
        handle.remove()
    torch.testing.assert_close(now, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(now, before)
    torch.testing.assert_close(cached(enc), before, rtol=0, atol=0)  # removed: back to the plain table


def test_device_is_checked_on_a_hit_too():
    """load_state_dict(assign=True) onto another device (meta here): CPU indices must fail, as in PEFT."""
    enc, _ = make()
    idx = arange()
    cached(enc, idx)
    cached(enc, idx)  # these very indices were validated against the CPU table
    meta_state = {k: torch.empty_like(v, device="meta") for k, v in enc.state_dict().items()}
    enc.load_state_dict(meta_state, assign=True)
    with pytest.raises(ValueError, match="meta"):
        cached(enc, idx)


def test_results_are_views_of_one_table_by_contract():
    """Documented: under no_grad, arange calls return views of the cached table. A write into one result shows in
    the others (clone() before editing in place), and the next call recomputes, so the encoder stays right."""
    enc, cfg = make()
    a, b = cached(enc), cached(enc)
    assert a.data_ptr() == b.data_ptr()
    expected = uncached(enc, cfg, arange())
    a.mul_(0)
    assert torch.equal(b, torch.zeros_like(b))  # aliasing, as the README says
    torch.testing.assert_close(cached(enc), expected, rtol=1e-5, atol=1e-6)  # the cache saw the write
    safe = cached(enc).clone()
    safe.mul_(0)
    torch.testing.assert_close(cached(enc), expected, rtol=1e-5, atol=1e-6)


def test_a_deleted_encoder_is_freed():
    """The cache's global bookkeeping holds modules weakly: a dropped encoder (and its weights) can be collected."""
    import gc
    import weakref

    enc, _ = make()
    cached(enc)
    cached(enc)
    ref = weakref.ref(enc)
    del enc
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------- refreshing after only values changed
def _sgd_step(enc):
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    enc(arange(2)).square().sum().backward()
    opt.step()


@pytest.mark.parametrize(
    "change",
    [
        lambda enc: torch.nn.init.normal_(enc.mlp_head[2].weight),
        lambda enc: enc.load_state_dict(make()[0].state_dict()),
        _sgd_step,
    ],
    ids=["in-place init", "load_state_dict", "SGD step"],
)
def test_refresh_after_values_changed_is_the_full_computation(counting_fills, counting_head, change):
    """When only values changed (the same tensors in the same modules, modes and settings), the table is refreshed
    by the computation prepared when it was first computed, and it is exactly what a full computation returns."""
    enc, cfg = make()
    before = cached(enc).clone()
    change(enc)
    fills, runs = len(counting_fills), len(counting_head)
    refreshed = cached(enc).clone()
    assert (len(counting_fills), len(counting_head)) == (fills, runs + 1)  # the head ran, as a refresh
    assert not torch.equal(refreshed, before)
    assert torch.equal(cached(enc), refreshed)  # and cached again: no run at all
    assert (len(counting_fills), len(counting_head)) == (fills, runs + 1)
    enc.invalidate_cache()
    full = cached(enc)
    assert len(counting_fills) == fills + 1
    assert torch.equal(refreshed, full)
    torch.testing.assert_close(full, uncached(enc, cfg, arange()), rtol=1e-5, atol=1e-6)


def _swap_in_a_copy(enc):
    layer = enc.mlp_head[2]
    layer.weight.data = layer.weight.data.clone()  # another address: the prepared computation reads the old one


@pytest.fixture
def counting_fills(monkeypatch):
    """Counts the full computations of a table to be cached (each asks the encoder for the table's refresh); a
    refresh is not one."""
    calls = []
    original = PromptEncoder._bind_table

    def spy(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(PromptEncoder, "_bind_table", spy)
    return calls


@pytest.mark.parametrize(
    "change",
    [
        lambda enc: enc.train(not enc.training),
        lambda enc: enc.mlp_head[0].register_forward_hook(lambda module, args, out: out * 2),
        _swap_in_a_copy,
    ],
    ids=["mode", "forward hook", "memory replaced"],
)
def test_more_than_values_changed_computes_in_full(counting_fills, change):
    """A change beyond values (a mode, a hook, a tensor's memory) is no refresh: the table is computed in full, and
    is what the modules compute now."""
    enc, _ = make()
    cached(enc)
    with torch.no_grad():
        enc.mlp_head[4].bias.add_(1.0)  # values change too
    change(enc)
    assert len(counting_fills) == 1
    now = cached(enc)
    assert len(counting_fills) == 2
    torch.testing.assert_close(now[0], _head_now(enc), rtol=1e-5, atol=1e-6)  # the modules, hooks included


def test_refresh_of_an_inference_mode_encoder_is_a_copy(counting_fills):
    """``inference_mode=True`` (the saved table only): the refresh copies the embedding, so writes into a result
    never reach the parameter."""
    enc, cfg = make(inference_mode=True)
    cached(enc)
    with torch.no_grad():
        enc.embedding.weight.add_(1.0)
    out = cached(enc)
    assert len(counting_fills) == 1  # refreshed
    assert torch.equal(out[0], enc.embedding.weight) and out.data_ptr() != enc.embedding.weight.data_ptr()
    out.mul_(0)
    assert not torch.equal(enc.embedding.weight, torch.zeros_like(enc.embedding.weight))


def test_refresh_under_inference_mode_is_a_normal_tensor(counting_fills):
    """Refreshed inside ``torch.inference_mode``, the table is still a normal tensor (a version counter, writable
    outside), like a table computed in full there."""
    enc, cfg = make()
    cached(enc)
    with torch.no_grad():
        enc.mlp_head[0].weight.mul_(1.5)
    with torch.inference_mode():
        out = enc(arange())
    assert len(counting_fills) == 1 and not out.is_inference()
    torch.testing.assert_close(out, uncached(enc, cfg, arange()), rtol=1e-5, atol=1e-6)
    cached(enc).add_(0)


# ---------------------------------------------------------------------------- tensors swapped into the modules' dicts
# torch.func.functional_call (torch.nn.utils.stateless) and accelerate's set_module_tensor_to_device put tensors
# straight into a module's ``_parameters`` / ``_buffers`` dicts: no registration hook runs, no version moves.
def _fresh_parameters(enc):
    return {name: torch.randn_like(p) for name, p in enc.named_parameters()}


def test_functional_call_with_other_parameters_is_not_served_from_the_cache():
    from torch.func import functional_call

    enc, cfg = make()
    own = cached(enc).clone()
    other = _fresh_parameters(enc)
    with torch.no_grad():
        got = functional_call(enc, other, (arange(),))
    reference, _ = make()
    reference.load_state_dict(other)
    assert torch.equal(got, cached(reference))
    assert torch.equal(cached(enc), own)  # and the module's own parameters again afterwards


def test_functional_call_first_then_own_parameters():
    """The first table computed while other tensors were swapped in must not be served for the module's own."""
    from torch.func import functional_call

    enc, cfg = make()
    with torch.no_grad():
        functional_call(enc, _fresh_parameters(enc), (arange(),))
    torch.testing.assert_close(cached(enc), uncached(enc, cfg, arange()), rtol=1e-5, atol=1e-6)


def test_functional_call_with_tensors_that_require_grad():
    """The module's own parameters are frozen (its table is cached); the swapped-in ones require grad: the output
    carries their gradient."""
    from torch.func import functional_call

    enc, _ = make()
    enc.requires_grad_(False)
    enc(arange())  # cached: nothing requires grad
    other = {name: t.requires_grad_() for name, t in _fresh_parameters(enc).items()}
    out = functional_call(enc, other, (arange(),))
    assert out.requires_grad
    out.sum().backward()
    assert all(t.grad is not None for t in other.values())


def test_parameter_assigned_into_the_dict_directly():
    """accelerate's set_module_tensor_to_device: ``module._parameters[name] = Parameter(new)``."""
    enc, cfg = make()
    cached(enc)
    layer = enc.mlp_head[2]
    layer._parameters["weight"] = torch.nn.Parameter(torch.randn_like(layer.weight))
    torch.testing.assert_close(cached(enc), uncached(enc, cfg, arange()), rtol=1e-5, atol=1e-6)


def test_bias_set_to_none_is_seen(counting_fills):
    """``layer.bias = None`` runs no registration hook: the place that held the bias now holds None, so the table is
    computed in full (the head is no longer PEFT's plain one), after values changed too."""
    enc, _ = make()
    cached(enc)
    enc.mlp_head[2].bias = None
    with torch.no_grad():
        enc.mlp_head[0].weight.mul_(1.1)
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)
    _sgd_step(enc)
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)
    enc.mlp_head[2].bias = torch.nn.Parameter(torch.randn(H))  # and back: registered, so seen as well
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["module", "process-wide"])
def test_backward_hooks_are_part_of_the_key(counting_fills, kind):
    """A backward hook makes the head's own modules run (on the Triton backend another rounding than the fused op):
    a table computed before it is not refreshed after it."""
    enc, _ = make()
    cached(enc)
    hook = lambda module, grad_in, grad_out: None  # noqa: E731
    if kind == "module":
        handle = enc.mlp_head[2].register_full_backward_hook(hook)
    else:
        handle = torch.nn.modules.module.register_module_full_backward_hook(hook)
    try:
        with torch.no_grad():
            enc.mlp_head[0].weight.mul_(1.1)
        fills = len(counting_fills)
        now = cached(enc)
        # a process-wide hook would also run on the embedding: then the modules run on the indices, uncached
        assert len(counting_fills) == fills + (kind == "module")
        torch.testing.assert_close(now[0], _head_now(enc), rtol=1e-6, atol=1e-7)
    finally:
        handle.remove()


def test_hook_removed_then_another_prepended():
    """A removal and a ``prepend=True`` registration leave the hook dict's length and last key as they were."""
    enc, _ = make()
    layer = enc.mlp_head[0]
    first = layer.register_forward_hook(lambda module, args, out: out * 2)
    layer.register_forward_hook(lambda module, args, out: out + 0)
    cached(enc)
    first.remove()
    layer.register_forward_hook(lambda module, args, out: out * 5, prepend=True)
    assert torch.equal(cached(enc)[0], _head_now(enc))


@pytest.mark.parametrize("rows", [6, 4])
def test_index_check_after_the_row_count_changed(rows):
    """Indices validated against a 5-row table are checked again after the embedding is replaced with another row
    count: the arange view of the new table, or an IndexError naming the range."""
    enc = PromptEncoder(dict(num_virtual_tokens=5, token_dim=D, encoder_hidden_size=H))
    idx = torch.arange(5)[None]
    cached(enc, idx)
    cached(enc, idx)
    enc.embedding = torch.nn.Embedding(rows, D)
    enc.total_virtual_tokens = rows
    if rows < 5:
        for _ in range(2):
            with pytest.raises(IndexError, match="out of range"):
                cached(enc, idx)
        return
    for _ in range(2):
        out = cached(enc, idx)
        assert out.shape == (1, 5, D)
        torch.testing.assert_close(out[0], _head_now(enc)[:5], rtol=1e-5, atol=1e-6)


def test_indices_viewed_as_another_dtype_are_rejected():
    enc, _ = make()
    idx = arange()
    cached(enc, idx)
    cached(enc, idx)
    with pytest.raises(TypeError, match="integer"):
        cached(enc, idx.view(torch.float64))


@pytest.mark.parametrize("setting", ["backend", "precision", "autocast"])
def test_a_setting_changed_with_the_values_computes_in_full(counting_fills, monkeypatch, backend, setting):
    """Values and a setting changed together: not a refresh (the setting decides how the table is computed)."""
    if setting == "autocast" and backend == "triton":
        pytest.skip("under autocast the head runs eagerly (test_autocast_is_part_of_the_key)")
    enc, cfg = make()
    cached(enc)
    with torch.no_grad():
        enc.mlp_head[0].weight.mul_(1.1)
    fills = len(counting_fills)
    if setting == "backend":
        monkeypatch.setenv("PTFAST_BACKEND", "eager" if backend == "triton" else "triton")
        if backend == "eager":
            pytest.importorskip("triton")
        cached(enc)
    elif setting == "precision":
        with fp32_settings_restored():
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if old == "highest" else "highest")
            cached(enc)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cached(enc).dtype == torch.bfloat16
    assert len(counting_fills) == fills + 1


def test_a_registration_during_a_refresh_is_seen_next_time():
    """Another thread swaps the head while this one refreshes: the refreshed table answers the call it was read for,
    and the next call computes the new head's table (the new snapshot keeps the old structure generation)."""
    enc, _ = make()
    cached(enc)
    entry = enc._cache.entry
    new_head = torch.nn.Sequential(
        torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, H), torch.nn.ReLU(), torch.nn.Linear(H, D)
    )

    def racing_refresh():
        out = entry.refresh()
        enc.mlp_head = new_head  # "the other thread", between the lookup's reading and the snapshot's retake
        return out

    enc._cache.entry = entry._replace(refresh=racing_refresh)
    with torch.no_grad():
        enc.mlp_head[0].weight.mul_(1.1)
    cached(enc)
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        new_head[0].weight.mul_(1.1)
    torch.testing.assert_close(cached(enc)[0], _head_now(enc), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_forward_hook_on_the_embedding_runs_as_in_peft(grad):
    """PEFT calls the embedding module on the indices, so its forward hooks run; the table is computed from the
    embedding's weight, so with such a hook the modules run on the indices instead (and nothing is cached)."""
    enc, cfg = make()
    ref = PeftEncoder(cfg)
    ref.load_state_dict(enc.state_dict())
    cached(enc)
    indices = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]])
    handles = [m.register_forward_hook(lambda module, args, out: out * 2 + 1) for m in (enc.embedding, ref.embedding)]
    with torch.set_grad_enabled(grad):
        for _ in range(2):
            torch.testing.assert_close(enc(indices), ref(indices), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(enc(arange(2)), ref(arange(2)), rtol=1e-5, atol=1e-6)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(cached(enc), uncached(enc, cfg, arange()), rtol=1e-5, atol=1e-6)


def test_table_with_an_embedding_hook_is_not_cached():
    """``table()`` with a hook on the embedding computes PEFT's arange row, hook included, and caches nothing that a
    later forward could serve."""
    enc, cfg = make()
    ref = PeftEncoder(cfg)
    ref.load_state_dict(enc.state_dict())
    for module in (enc.embedding, ref.embedding):
        module.register_forward_hook(lambda module, args, out: out * 2 + 1)
    with torch.no_grad():
        torch.testing.assert_close(enc.table(), ref(arange())[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(enc(arange(2)), ref(arange(2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["pre", "full", "process-wide"])
def test_backward_hooks_on_the_embedding_run_as_in_peft(kind):
    """PEFT's embedding module runs in the graph, so its backward hooks run and may change the gradient: ours do
    too, as often, with the same gradients."""
    enc, cfg = make()
    ref = PeftEncoder(cfg)
    ref.load_state_dict(enc.state_dict())
    fired = {enc.embedding: 0, ref.embedding: 0}

    def count(module):
        if module in fired:
            fired[module] += 1

    handles = []
    for module in (enc.embedding, ref.embedding):
        if kind == "pre":
            handles.append(module.register_full_backward_pre_hook(lambda m, grad_out: count(m) or (grad_out[0] * 3,)))
        elif kind == "full":
            handles.append(module.register_full_backward_hook(lambda m, grad_in, grad_out: count(m)))
    if kind == "process-wide":
        handles.append(torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: count(m)))
    try:
        grad = torch.randn(2, T, D)
        enc(arange(2)).backward(grad)
        ref(arange(2)).backward(grad)
    finally:
        for handle in handles:
            handle.remove()
    assert fired[enc.embedding] == fired[ref.embedding] == 1, fired
    for (name, ours), theirs in zip(enc.named_parameters(), ref.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_forward_runs_the_embedding_hook():
    enc, cfg = make()
    ref = PeftEncoder(cfg)
    ref.load_state_dict(enc.state_dict())
    for module in (enc.embedding, ref.embedding):
        module.register_forward_hook(lambda module, args, out: out * 2 + 1)
    compiled = torch.compile(enc, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(arange(2)), ref(arange(2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_a_traced_encoder_follows_its_weights_and_indices(kind):
    """``torch.jit.trace`` records the computation, not the cache: traced after a table was cached, the graph still
    reads the weights (an optimizer step is seen) and indexes with the indices it is given, as PEFT's traced encoder
    does."""
    enc, cfg = make(kind)
    cached(enc)  # a table cached before tracing must not become a constant of the graph
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(enc, (arange(),), check_trace=False)
    with torch.no_grad():
        enc.mlp_head[0].weight.mul_(1.5)
        reversed_rows = torch.arange(T - 1, -1, -1).unsqueeze(0)
        for indices in (arange(), reversed_rows):
            torch.testing.assert_close(traced(indices), uncached(enc, cfg, indices), rtol=1e-5, atol=1e-6)


def test_a_compiled_encoder_with_a_dropout_in_training_draws_per_row():
    """Under torch.compile too, a module that computes differently in training mode runs PEFT's computation on the
    rows themselves: every row of the batch its own dropout draw."""
    enc, _ = make()
    _dropout_in_the_head(enc)
    enc.train()
    compiled = torch.compile(enc, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(arange(3))
    assert not torch.equal(out[0], out[1])
    enc.eval()
    with torch.no_grad():
        out = compiled(arange(3))
    assert torch.equal(out[0], out[1])  # eval: one table for every row


def test_a_dropout_probability_set_after_a_call_counts_at_once():
    """A dropout of probability 0 in training mode computes as in eval mode, but its probability is no key (the
    table is not cached): set to 0.5 after a call, the next calls draw, per row, as PEFT's encoder does on the same
    seed."""
    enc, cfg = make()
    ref = PeftEncoder(cfg)
    for e in (enc, ref):
        e.mlp_head[1] = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.0))
    ref.load_state_dict(enc.state_dict())
    enc.train()
    ref.train()
    before = cached(enc).clone()
    for e in (enc, ref):
        e.mlp_head[1][1].p = 0.5
    for batch in (1, 3):
        torch.manual_seed(batch)
        got = cached(enc, arange(batch))
        torch.manual_seed(batch)
        assert torch.equal(got, cached(ref, arange(batch)))
        assert not torch.equal(got[0], before[0])
        assert batch == 1 or not torch.equal(got[0], got[1])


def test_a_dropout_inserted_without_a_registration_draws_per_row_in_training():
    """``Sequential.insert`` writes the ``_modules`` dict itself (no registration hook runs): a train step after it
    still sees the dropout, and every row of the batch gets its own draw, as PEFT's encoder on the same seed."""
    enc, cfg = make()
    ref = PeftEncoder(cfg)
    ref.load_state_dict(enc.state_dict())
    enc.train()
    ref.train()
    enc(arange(3)).sum().backward()  # the train step is recorded (and prepared where it can be)
    for e in (enc, ref):
        e.mlp_head.insert(2, torch.nn.Dropout(0.5))
    torch.manual_seed(0)
    got = enc(arange(3))
    torch.manual_seed(0)
    assert torch.equal(got, ref(arange(3)))
    assert not torch.equal(got[0], got[1])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_head_reading_across_positions_gathers_no_table_rows(compiled):
    """A head edited to read across the T positions (a BatchNorm1d over them, eval mode) computes its table on PEFT's
    (1, T, D) rows; indices other than the arange row run the modules on those indices, as PEFT does, since a
    table row is then not a function of its token alone."""
    enc, cfg = make()
    ref = PeftEncoder(cfg)
    for e in (enc, ref):
        _batchnorm_in_the_head(e)
    with torch.no_grad():
        enc.mlp_head[1][0].running_mean.uniform_(-1, 1)
        enc.mlp_head[1][0].running_var.uniform_(0.5, 2)
    ref.load_state_dict(enc.state_dict())
    enc.eval()
    ref.eval()
    run = torch.compile(enc, backend="eager", fullgraph=True) if compiled else enc
    reversed_rows = torch.arange(T - 1, -1, -1).unsqueeze(0)
    with torch.no_grad():
        for indices in (arange(), reversed_rows, arange(2)):
            torch.testing.assert_close(run(indices), ref(indices), rtol=1e-5, atol=1e-6)
