"""The encoder on the Triton backend: parity with PEFT through the kernels (launches counted), torch.compile.

Without CUDA the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1) on small CPU shapes;
the `gpu` tests at the end check that the encoder takes the Triton path by default on CUDA. The cache tests run on
both backends through the ``backend`` fixture (tests/conftest.py).
"""

import pytest
import torch

import ptfast
from ptfast.kernels import mlp_head as kernels
from tests.helpers import encoders as encoder_tests

INTERPRETED = type(kernels._linear_kernel).__name__ == "InterpretedFunction"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs the CPU-tensor tests under TRITON_INTERPRET=1")

SMALL_MLP = [
    pytest.param("MLP", 7, 100, 37, 1, id="MLP-T7-D100-H37"),
    pytest.param("MLP", 5, 60, 33, 2, id="MLP-T5x2-D60-H33"),
]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("PTFAST_BACKEND", "triton")


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton forward launches, to prove the encoder really goes through the kernels."""
    calls = []
    original = kernels.mlp_head_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "mlp_head_forward", spy)
    return calls


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("kind,nvt,dim,hidden,subs", SMALL_MLP)
@interpreter_only
@pytest.mark.usefixtures("triton_backend")
def test_forward_and_grads_match_peft(kind, nvt, dim, hidden, subs, batch, launches):
    encoder_tests.check_forward_and_grads(kind, nvt, dim, hidden, subs, batch)
    assert launches and all(shape[0] == nvt * subs for shape in launches)


@interpreter_only
@pytest.mark.usefixtures("triton_backend")
def test_forward_matches_peft_in_half(launches):  # fp16 only: the interpreter has no bf16 arithmetic
    ref, ours = encoder_tests.make_pair("MLP", 7, 96, 40, 1)
    ref64 = encoder_tests.fp64_copy(ref)
    ref, ours = ref.half(), ours.half()
    for idx in encoder_tests.index_patterns(7, 3).values():
        expected = ref(idx).detach()
        encoder_tests.assert_close_to_peft(ours(idx).detach(), expected, ref64(idx).detach(), torch.float16)
    assert launches


@interpreter_only
@pytest.mark.usefixtures("triton_backend")
def test_fp64_falls_back_or_fails_clearly():
    """fp64 is not a kernel dtype: forced Triton says so; the default backend runs it eagerly (see test_mlp_head)."""
    enc = ptfast.PromptEncoder(ptfast.PromptEncoderConfig(num_virtual_tokens=3, token_dim=32, encoder_hidden_size=16))
    with pytest.raises(TypeError, match="Triton backend supports"):
        enc.double()(torch.arange(3).unsqueeze(0))


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@interpreter_only
@pytest.mark.usefixtures("triton_backend")
def test_torch_compile_fullgraph_over_encoder(grad):
    """No graph break: the encoder traces to the registered op plus a gather (aot_eager keeps it fast on CPU)."""
    ref, ours = encoder_tests.make_pair("MLP", 5, 40, 24, 1)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    idx = torch.tensor([[0, 1, 2, 3, 4], [4, 2, 0, 1, 1]])
    with torch.set_grad_enabled(grad):
        out = compiled(idx)
        expected = ref(idx)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if grad:
        out.sum().backward()
        expected.sum().backward()
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 8])
def test_encoder_on_cuda_triton_matches_peft(dtype, batch, launches, monkeypatch):
    monkeypatch.setenv("PTFAST_BACKEND", "triton")  # `auto` keeps the head eager on CUDA (measured, _env.py)
    ref, ours = encoder_tests.make_pair("MLP", 20, 1024, 128, 1)
    ref64 = encoder_tests.fp64_copy(ref).cuda()  # not ref.double(): that casts ref itself, in place
    ref, ours = ref.to("cuda", dtype), ours.to("cuda", dtype)
    idx = torch.arange(20, device="cuda").unsqueeze(0).expand(batch, -1)
    encoder_tests.assert_close_to_peft(ours(idx).detach(), ref(idx).detach(), ref64(idx).detach(), dtype)
    with torch.no_grad():
        encoder_tests.assert_close_to_peft(ours(idx), ref(idx), ref64(idx), dtype)
    assert launches


def _seed_shape_pair_on_cuda():
    """PEFT's encoder and ours at the seed shape on CUDA, and PeftModel.get_prompt's indices."""
    ref, ours = encoder_tests.make_pair("MLP", 20, 1024, 128, 1)
    return ref.cuda(), ours.cuda(), torch.arange(20, device="cuda").unsqueeze(0)


@pytest.mark.gpu
def test_auto_backend_keeps_the_head_eager_on_cuda(launches, monkeypatch):
    monkeypatch.delenv("PTFAST_BACKEND", raising=False)
    ref, ours, idx = _seed_shape_pair_on_cuda()
    torch.testing.assert_close(ours(idx), ref(idx), rtol=0, atol=0)  # PEFT's own ops on the (1, T) call
    assert not launches


@pytest.mark.gpu
def test_autocast_on_cuda_matches_peft(launches, monkeypatch):
    """Under autocast F.linear runs in bf16; the encoder then takes the eager path, as PEFT computes it."""
    monkeypatch.delenv("PTFAST_BACKEND", raising=False)
    ref, ours, idx = _seed_shape_pair_on_cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        expected, got = ref(idx), ours(idx)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not launches


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_refreshed_table_on_cuda_is_the_full_computation(dtype, launches, monkeypatch):
    """After an optimizer step the cache refreshes the table with the one prepared launch (``bind_mlp_head``), not
    through the launchers (``launches`` counts those), bitwise what a full computation returns and close to PEFT on
    the new weights; on another stream it computes in full (the prepared scratch belongs to the first) and is
    still right."""
    monkeypatch.setenv("PTFAST_BACKEND", "triton")
    ref, ours = encoder_tests.make_pair("MLP", 20, 1024, 128, 1)
    ref64 = encoder_tests.fp64_copy(ref).cuda()
    ref, ours = ref.to("cuda", dtype), ours.to("cuda", dtype)
    idx = torch.arange(20, device="cuda").unsqueeze(0)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)

    def assert_close_to_peft(got):
        ref.load_state_dict(ours.state_dict())
        ref64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
        encoder_tests.assert_close_to_peft(got, ref(idx), ref64(idx), dtype)

    with torch.no_grad():
        ours(idx)
    for step in range(3):  # the second call after a full computation prepares the launch; later ones reuse it
        ours(idx).float().square().sum().backward()
        opt.step()
        opt.zero_grad()
        before = len(launches)
        with torch.no_grad():
            refreshed = ours(idx).clone()
        prepared = ours._cache.entry.refresh.bound
        assert len(launches) == before and prepared is not None, launches[before:]
    assert prepared.stream == torch.cuda.current_stream().cuda_stream
    with torch.no_grad():
        assert_close_to_peft(refreshed)
        ours.invalidate_cache()
        assert torch.equal(ours(idx), refreshed)  # the full computation, bitwise
        ours.embedding.weight.mul_(0.9)
        ours(idx)  # the first refresh after it prepares the launch again, on this stream
        assert ours._cache.entry.refresh.bound is not None
        ours.embedding.weight.mul_(0.5)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        before = len(launches)
        with torch.cuda.stream(side):
            on_side = ours(idx).clone()
        torch.cuda.current_stream().wait_stream(side)
        assert len(launches) == before + 1  # another stream: computed in full, through the launchers
        assert_close_to_peft(on_side)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prepared_train_step_on_cuda_is_the_full_computation(dtype, launches, monkeypatch):
    """Train steps after the second launch the forward and backward prepared at earlier ones (not through the
    launchers: ``launches`` counts those), and give bitwise the outputs and gradients of the full path (a twin
    whose record is dropped before every step), close to PEFT's."""
    monkeypatch.setenv("PTFAST_BACKEND", "triton")
    ref, ours = encoder_tests.make_pair("MLP", 20, 1024, 128, 1)
    ref64 = encoder_tests.fp64_copy(ref).cuda()
    ref, ours = ref.to("cuda", dtype), ours.to("cuda", dtype)
    twin = ptfast.PromptEncoder.from_peft(ref)
    twin.load_state_dict(ours.state_dict())
    idx = torch.arange(20, device="cuda").unsqueeze(0)
    for step in range(4):
        grad = torch.randn(1, 20, 1024, device="cuda", dtype=dtype)
        for enc in (ours, twin):
            enc.zero_grad(set_to_none=True)
        before = len(launches)
        got = ours(idx)
        got.backward(grad)
        if step >= 2:
            assert len(launches) == before, "a prepared train step went through the launchers"
        twin._cache.clear()  # the full path: recorded again, and the first call of a new step
        expected = twin(idx)
        expected.backward(grad)
        assert torch.equal(got, expected)
        for p, q in zip(ours.parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad)
        with torch.no_grad():
            for enc in (ours, twin):
                for p in enc.parameters():
                    p.sub_(0.5 * p.grad)
    with torch.no_grad():
        ref.load_state_dict(ours.state_dict())
        ref64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
        encoder_tests.assert_close_to_peft(ours(idx), ref(idx), ref64(idx), dtype)
