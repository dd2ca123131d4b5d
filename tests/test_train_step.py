"""The prepared train step: in training, the table is computed with autograd by the step prepared at an earlier
step (``TableCache.trained``, ``bind_mlp_head_train``), never stale.

Every test trains ptfast's encoder next to PEFT's with the same weights and the same gradients, and compares
outputs and gradients step by step. On the eager backend (op for op PEFT's head) they are bitwise equal; on the
Triton backend (the interpreter on CPU) within fp32 rounding. Each change test first prepares the step, then
changes the encoder, and would fail if the prepared step were used after a change it cannot follow.
"""

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
from peft import PromptEncoderConfig as PeftConfig
from peft.tuners.p_tuning import PromptEncoder as PeftEncoder

from ptfast import PromptEncoder, _cache
from ptfast._cache import Snapshot
from ptfast.ops import mlp_head as head_ops

T, D, H = 7, 48, 19  # H square layer: w2 is (H, H), so a transpose keeps its shape

pytestmark = pytest.mark.usefixtures("backend")


def _config():
    return PeftConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=T, token_dim=D, encoder_hidden_size=H, num_transformer_submodules=1
    )


def make():
    cfg = _config()
    ours = PromptEncoder(cfg)
    ref = PeftEncoder(cfg)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


IDX = torch.arange(T).unsqueeze(0)


def step(ours, ref, backend):
    """One train step of both encoders on the same fresh gradient; checks outputs and parameter gradients."""
    for p in (*ours.parameters(), *ref.parameters()):
        p.grad = None
    grad = torch.randn(1, T, D)
    got, expected = ours(IDX), ref(IDX)
    assert got.requires_grad
    got.backward(grad)
    expected.backward(grad)
    pairs = [(got, expected)] + [(p.grad, q.grad) for p, q in zip(ours.parameters(), ref.parameters())]
    for a, b in pairs:
        assert (a is None) == (b is None)
        if a is None:  # a frozen parameter: no gradient on either side
            continue
        if backend == "eager":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return got


def sgd(*encoders):
    with torch.no_grad():
        for enc in encoders:
            for p in enc.parameters():
                p.sub_(1e-2 * p.grad)


def train_steps(ours, ref, backend, n):
    """``n`` train steps of both encoders (``step``), each followed by an SGD update."""
    for _ in range(n):
        step(ours, ref, backend)
        sgd(ours, ref)


@pytest.fixture
def full_computations(monkeypatch):
    """Counts the tables computed in full (``_compute_table``), which a prepared step replaces."""
    calls = []
    original = PromptEncoder._compute_table

    def spy(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(PromptEncoder, "_compute_table", spy)
    return calls


@pytest.fixture
def walks(monkeypatch):
    """Counts the walks of a module tree (``Snapshot.take``)."""
    calls = []
    take = Snapshot.take.__func__

    def spy(cls, *args, **kwargs):
        calls.append(1)
        return take(cls, *args, **kwargs)

    monkeypatch.setattr(Snapshot, "take", classmethod(spy))
    return calls


def test_train_steps_use_the_prepared_step(native_check_module, full_computations, backend):
    """Every train step after the first is the prepared one (no full computation), and each matches PEFT with the
    weights the optimizer left."""
    ours, ref = make()
    train_steps(ours, ref, backend, 4)
    assert full_computations == []
    assert isinstance(ours._cache.train.step, head_ops._LayoutChecked)


def _move_memory(ours, ref):
    layer = ours.mlp_head[2]
    layer.weight.data = layer.weight.data.clone()  # another address: the prepared step would read the old memory


def _transpose(ours, ref):
    """Same memory, transposed strides: the prepared step would read it as before."""
    for enc in (ours, ref):
        layer = enc.mlp_head[2]
        layer.weight.data = layer.weight.data.t()


def _hook(ours, ref):
    for enc in (ours, ref):
        enc.mlp_head[0].register_forward_hook(lambda module, args, out: out * 2)


def _activation(ours, ref):
    for enc in (ours, ref):
        enc.mlp_head[1] = torch.nn.Tanh()


def _eval_mode(ours, ref):
    ours.eval()
    ref.eval()


def _assign_parameter(ours, ref):
    """A new Parameter at the place (``module.weight = Parameter(...)``): another tensor there."""
    new = torch.nn.Parameter(torch.randn(H, H) * 0.1)
    ours.mlp_head[2].weight = new
    ref.mlp_head[2].weight = torch.nn.Parameter(new.detach().clone())


def _put_into_the_dict(ours, ref):
    """A new Parameter put straight into the module's dict (as ``functional_call`` and accelerate do): no hook runs."""
    new = torch.randn(H, H) * 0.1
    ours.mlp_head[2]._parameters["weight"] = torch.nn.Parameter(new)
    ref.mlp_head[2]._parameters["weight"] = torch.nn.Parameter(new.clone())


def _alias_into_the_dict(ours, ref):
    """A new Parameter over the same memory (same address, same version counter) put into the dict: autograd must
    give the gradient to it, not to the Parameter the step was prepared with."""
    ours.mlp_head[2]._parameters["weight"] = torch.nn.Parameter(ours.mlp_head[2].weight.detach())
    ref.mlp_head[2]._parameters["weight"] = torch.nn.Parameter(ref.mlp_head[2].weight.detach())


def _module_into_the_dict(ours, ref):
    """A layer put straight into the head's ``_modules`` dict (no registration hook runs)."""
    new = torch.nn.Linear(H, H)
    ours.mlp_head._modules["2"] = new
    twin = torch.nn.Linear(H, H)
    twin.load_state_dict(new.state_dict())
    ref.mlp_head._modules["2"] = twin


def _parameters_dict_replaced(ours, ref):
    """A module's whole ``_parameters`` dict replaced (as ZeRO-3 style wrappers do)."""
    for enc in (ours, ref):
        layer = enc.mlp_head[4]
        layer._parameters = {k: torch.nn.Parameter(v.detach().clone()) for k, v in layer._parameters.items()}


@pytest.mark.parametrize(
    "change",
    [
        _move_memory,
        _transpose,
        _hook,
        _activation,
        _eval_mode,
        _assign_parameter,
        _put_into_the_dict,
        _alias_into_the_dict,
        _module_into_the_dict,
        _parameters_dict_replaced,
    ],
    ids=[
        "memory replaced",
        "transposed in place",
        "forward hook",
        "activation swapped",
        "eval mode",
        "parameter",
        "put into the dict",
        "alias put into the dict",
        "module put into the dict",
        "parameters dict replaced",
    ],
)
def test_changes_beyond_values_are_seen(native_check_module, backend, change):
    """After a change beyond values, train steps compute what the modules compute now (PEFT's, changed alike)."""
    ours, ref = make()
    train_steps(ours, ref, backend, 3)  # the step is prepared, and used
    change(ours, ref)
    train_steps(ours, ref, backend, 3)


def _hook_on_the_new_layer(ours, ref):
    for enc in (ours, ref):
        enc.mlp_head[2].register_forward_hook(lambda module, args, out: out * 2)


def _put_into_the_new_layer(ours, ref):
    new = torch.randn(H, H) * 0.1
    ours.mlp_head[2]._parameters["weight"] = torch.nn.Parameter(new)
    ref.mlp_head[2]._parameters["weight"] = torch.nn.Parameter(new.clone())


def _extra_layer_put_into_the_dict(ours, ref):
    """A sixth layer put straight into the head's dict: no longer PEFT's head, so the modules run."""
    for enc in (ours, ref):
        enc.mlp_head._modules["5"] = torch.nn.Tanh()


@pytest.mark.parametrize(
    "then",
    [_hook_on_the_new_layer, _put_into_the_new_layer, _extra_layer_put_into_the_dict],
    ids=["hook on it", "tensor put into it", "another layer put into the dict"],
)
@pytest.mark.parametrize("first", [_module_into_the_dict, _parameters_dict_replaced], ids=["module", "parameters"])
def test_changes_after_a_put_into_a_dict_are_seen(native_check_module, backend, first, then):
    """After a module put straight into a dict (or a replaced ``_parameters`` dict), the tree is recorded again by a
    fresh walk: changes to the new objects are seen at later steps as well."""
    ours, ref = make()
    train_steps(ours, ref, backend, 2)
    first(ours, ref)
    train_steps(ours, ref, backend, 2)
    if then is _put_into_the_new_layer and first is _parameters_dict_replaced:
        for enc in (ours, ref):  # the replaced dict is the last layer's: put into that one
            enc.mlp_head[4]._parameters["bias"] = torch.nn.Parameter(torch.zeros(D) + 0.5)
    else:
        then(ours, ref)
    train_steps(ours, ref, backend, 2)


def test_matmul_precision_change_prepares_again(native_check_module, backend):
    """The fp32 matmul precision is part of the record: a change records the tree again, and the step prepared
    then computes with the new precision (on the Triton backend, the precision of its kernels)."""
    ours, ref = make()
    step(ours, ref, backend)
    first = ours._cache.train
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if old != "tf32" else "ieee"
    try:
        step(ours, ref, backend)
        assert ours._cache.train is not first
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    again = ours._cache.train
    step(ours, ref, backend)
    assert ours._cache.train is not again  # and back


def test_without_the_native_check_nothing_is_prepared(monkeypatch, full_computations, walks, backend):
    """Without the C++ check (not built, or PTFAST_NO_NATIVE) every train step is the full computation."""
    from ptfast import native

    monkeypatch.setattr(native, "table_check_module", lambda: None)
    ours, ref = make()
    train_steps(ours, ref, backend, 3)
    assert len(full_computations) == 3 and ours._cache.train.step is None
    assert walks == []  # nothing can be prepared: the tree is not walked


def test_an_extension_loaded_later_prepares_the_step(monkeypatch, native_check_module, full_computations, backend):
    """Without the C++ check at first (the extension loads later in the process, say for prepend_prompts), the
    train steps are prepared once it is there: it is looked for again after the waits."""
    from ptfast import native

    monkeypatch.setattr(native, "table_check_module", lambda: None)
    ours, ref = make()
    train_steps(ours, ref, backend, 3)  # looked for at steps 1 and 3: the next wait is 2 steps
    monkeypatch.setattr(native, "table_check_module", lambda: native_check_module)
    # two full steps, then a recording that prepares the step and runs it, and a prepared step
    train_steps(ours, ref, backend, 4)
    assert len(full_computations) == 5 and isinstance(ours._cache.train.step, head_ops._LayoutChecked)


def test_a_hooked_tree_is_not_walked_at_every_step(native_check_module, walks, backend):
    """With a hook in the tree no native record is made (hooks are Python's to compare): the train steps compute in
    full, and the tree is walked again only after 1, 2, 4, ... full steps, not at every step."""
    ours, ref = make()
    _hook(ours, ref)
    walked_at = []
    for n in range(1, 13):
        before = len(walks)
        step(ours, ref, backend)
        sgd(ours, ref)
        walked_at += [n] * (len(walks) - before)
    assert walked_at == [1, 3, 6, 11] and ours._cache.train.native is None
    assert ours._cache.train.snapshot is None  # nothing held for a tree it does not prepare


def test_the_wait_between_recordings_doubles_up_to_a_bound():
    """A tree that stays unprepared costs at most one walk per _MAX_RETRY_WAIT steps; a prepared one, or another
    tree, starts again at one step."""
    ours, other = PromptEncoder(_config()), PromptEncoder(_config())
    unprepared = _cache.TrainRecord(ours, 0, None, None, None, None, 1, 1)
    waits = []
    for _ in range(9):
        waits.append(_cache._retry_wait(unprepared, ours))
        unprepared = unprepared._replace(wait=waits[-1])
    assert waits == [2, 4, 8, 16, 32, 64, 64, 64, 64] and _cache._MAX_RETRY_WAIT == 64
    assert _cache._retry_wait(unprepared, other) == 1
    assert _cache._retry_wait(unprepared._replace(native=(None, None)), ours) == 1
    assert _cache._retry_wait(None, ours) == 1


def test_a_removed_hook_lets_the_step_be_prepared_again(native_check_module, full_computations, walks, backend):
    """Removing a hook registers nothing, yet the train steps are prepared again a few steps later (the tree is
    recorded again after the wait), each one matching PEFT."""
    ours, ref = make()
    handles = [enc.mlp_head[0].register_forward_hook(lambda module, args, out: out * 2) for enc in (ours, ref)]
    train_steps(ours, ref, backend, 3)  # recorded at steps 1 and 3: the next wait is 2 steps
    for handle in handles:
        handle.remove()
    train_steps(ours, ref, backend, 3)  # two full steps, then a recording that prepares the step
    assert len(full_computations) == 5 and isinstance(ours._cache.train.step, head_ops._LayoutChecked)
    walked = len(walks)
    train_steps(ours, ref, backend, 3)
    assert len(full_computations) == 5 and len(walks) == walked


def test_a_tensor_subclass_at_a_place_is_not_walked_at_every_step(native_check_module, walks, backend):
    """A tensor subclass at a place (the native check leaves those to Python) prepares nothing; the tree is walked
    again only after the waits (steps 1 and 3 of 5)."""

    class Tagged(torch.nn.Parameter):
        pass

    ours, ref = make()
    ours.mlp_head[0]._parameters["bias"] = Tagged(ours.mlp_head[0].bias.detach().clone())
    train_steps(ours, ref, backend, 5)
    assert len(walks) == 2 and ours._cache.train.step is None


def test_functional_call_with_fast_weights(native_check_module, backend):
    """``torch.func.functional_call`` in training with non-leaf fast weights (MAML-style) and with detached
    aliases of the parameters: each call computes with the tensors passed, gradients flow to them alone, and
    nothing keeps the fast weights alive afterwards."""
    ours, ref = make()
    for _ in range(3):  # the step is prepared
        step(ours, ref, backend)
    for enc in (ours, ref):
        for p in enc.parameters():
            p.grad = None
    # detached aliases: no gradient reaches the module's own parameters
    aliases = {k: v.detach() for k, v in ours.named_parameters()}
    out = torch.func.functional_call(ours, aliases, (IDX,))
    assert not out.requires_grad
    # non-leaf fast weights: the gradient reaches the tensors they were made from
    base = {k: v.detach().clone().requires_grad_() for k, v in ours.named_parameters()}
    fast = {k: v * 1.0 for k, v in base.items()}
    got = torch.func.functional_call(ours, fast, (IDX,))
    ref_base = {k: v.detach().clone().requires_grad_() for k, v in ref.named_parameters()}
    expected = torch.func.functional_call(ref, {k: v * 1.0 for k, v in ref_base.items()}, (IDX,))
    grad = torch.randn(1, T, D)
    got.backward(grad)
    expected.backward(grad)
    for name, tensor in base.items():
        torch.testing.assert_close(tensor.grad, ref_base[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in ours.parameters())
    watched = weakref.ref(fast["mlp_head.2.weight"])
    del fast, got
    gc.collect()
    assert watched() is None  # the train record does not hold the fast weights (nor their graph)
    for _ in range(2):  # the module's own parameters train as before: in full, then recorded again and prepared
        step(ours, ref, backend)
    assert isinstance(ours._cache.train.step, head_ops._LayoutChecked)


def test_a_no_grad_full_computation_drops_the_train_record(native_check_module, backend):
    ours, ref = make()
    step(ours, ref, backend)
    assert ours._cache.train is not None
    ours.invalidate_cache()
    step(ours, ref, backend)
    with torch.no_grad():
        ours(IDX)  # a table computed in full, cached
    assert ours._cache.train is None


def test_importing_ptfast_under_inference_mode(tmp_path):
    """ptfast imported inside ``torch.inference_mode()`` trains like any other process (the train record's
    placeholder table is a normal tensor)."""
    code = (
        "import torch\n"
        "with torch.inference_mode():\n"
        "    from ptfast import PromptEncoder, PromptEncoderConfig\n"
        "enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=5, token_dim=16, encoder_hidden_size=8))\n"
        "for _ in range(3):\n"
        "    enc(torch.arange(5)[None]).sum().backward()\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_an_eval_call_between_train_steps(native_check_module, backend):
    """Evaluation under no_grad in the middle of training: the cached table and the prepared step live side by
    side, each right for the weights of its call."""
    ours, ref = make()
    for _ in range(3):
        step(ours, ref, backend)
        sgd(ours, ref)
        with torch.no_grad():
            got, expected = ours(IDX), ref(IDX)
        if backend == "eager":
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_frozen_parameters_get_no_gradient(native_check_module, backend):
    """Parameters frozen after the step was prepared: autograd gives them no gradient, the others PEFT's."""
    ours, ref = make()
    step(ours, ref, backend)
    step(ours, ref, backend)
    for enc in (ours, ref):
        enc.embedding.weight.requires_grad_(False)
        enc.mlp_head[0].bias.requires_grad_(False)
    step(ours, ref, backend)
    assert ours.embedding.weight.grad is None and ours.mlp_head[0].bias.grad is None
    assert ours.mlp_head[4].weight.grad is not None


def test_second_derivative_through_a_prepared_triton_step_raises(native_check_module, monkeypatch):
    """The prepared step is ``fused_mlp_head``'s Triton autograd: first order only, as there (the eager backend's
    ops differentiate twice, like PEFT's)."""
    monkeypatch.setenv("PTFAST_BACKEND", "triton")
    ours, _ = make()
    for _ in range(2):
        ours(IDX).sum().backward()
    out = ours(IDX)
    (g,) = torch.autograd.grad(out.square().sum(), ours.mlp_head[4].weight, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_layout_key_sees_memory_and_layout(native_check_module):
    """``layout_key`` / ``same_layout``: the same tensors in the same memory and layout, whatever their values."""
    a, p = torch.randn(3, 5), torch.nn.Parameter(torch.randn(4))
    key = native_check_module.layout_key((a, p))
    assert native_check_module.same_layout((a, p), key)
    a.add_(1.0)  # values only
    assert native_check_module.same_layout((a, p), key)
    for changed in ((a.t(), p), (a[:2], p), (a, p.data[:3]), (a.clone(), p), (a.double(), p), (p, a)):
        assert not native_check_module.same_layout(changed, key)
    with torch.inference_mode():
        inf = torch.randn(3)
    assert native_check_module.layout_key((inf,)) is None
    assert not native_check_module.same_layout((a,), b"not a key")


@pytest.mark.parametrize(
    "change",
    [
        lambda w: setattr(w, "data", w.data.t()),  # the same memory, transposed
        lambda w: setattr(w, "data", w.data.clone()),  # other memory
        lambda w: setattr(w, "data", w.data[:5]),  # the same memory, fewer rows
        lambda w: setattr(w, "data", w.data.double()),  # another dtype
    ],
    ids=["transposed", "moved", "narrowed", "dtype"],
)
def test_prepared_step_refuses_tensors_in_a_new_layout(native_check_module, backend, change):
    """``bind_mlp_head_train``'s step computes nothing once a bound tensor's memory, dtype, shape or strides changed
    (the prepared Triton launches would read it as before): the caller then computes in full."""
    ours, _ = make()
    tensors = (ours.embedding.weight, *ours._fused_head_inputs()[1:])
    step = head_ops.bind_mlp_head_train(*tensors)
    out = step()
    assert out is not None and out.requires_grad
    change(tensors[3])  # w2, square
    assert step() is None
