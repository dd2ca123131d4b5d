"""How each provider runs: the encoders (PEFT's and ptfast's, same weights), the tiny PeftModel, torch.compile,
CUDA-graph capture, and :func:`make_bench`, which returns the callable to time for one (case, provider).

What the providers and modes are is described in :mod:`ptfast.bench.cases`.
"""

from __future__ import annotations

import copy
import importlib.util
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import increment_version

from .cases import DTYPES, MODES, PROVIDERS, TINY_LM_VOCAB, Case, Shape, Unavailable
from .timing import Bench, synchronize

# ------------------------------------------------------------------------------------------------ encoders


#: What to install for the report; the README's install line for ``python -m ptfast`` says the same.
INSTALL_HINT = "pip install 'ptfast[peft,bench]'"


def require_peft(import_it: bool = True) -> None:
    """Raise ``Unavailable`` naming the install command when PEFT (the reference of every comparison) is missing.

    ``import_it=False`` only looks for the package, without importing it (importing peft takes seconds).
    """
    if not import_it:
        if importlib.util.find_spec("peft") is None:
            raise Unavailable(f"the comparison needs peft, which is not installed; {INSTALL_HINT}")
        return
    _peft_encoder_cls()


def _peft_encoder_cls():
    try:
        from peft.tuners.p_tuning import PromptEncoder
    except ImportError as exc:
        raise Unavailable(f"the comparison needs peft, which cannot be imported ({exc}); {INSTALL_HINT}") from exc
    return PromptEncoder


def peft_config(shape: Shape):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=shape.M,
        token_dim=shape.D,
        encoder_hidden_size=shape.H,
        num_transformer_submodules=1,
    )


_ENCODERS: dict[tuple, tuple] = {}


def encoders(shape: Shape, dtype: str, device: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(peft_encoder, ptfast_encoder)`` with identical weights, memoised per (shape, dtype, device).

    The last pair is kept only: the large shapes hold hundreds of MB of weights each.
    """
    key = (shape, dtype, device, seed)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        from ..encoder import PromptEncoder as PtEncoder

        cls = _peft_encoder_cls()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            peft_enc = cls(peft_config(shape)).to(device=device, dtype=DTYPES[dtype])
        _ENCODERS[key] = (peft_enc, PtEncoder.from_peft(peft_enc))
    return _ENCODERS[key]


def peft_inference_encoder(shape: Shape, dtype: str, device: str, seed: int = 0) -> torch.nn.Module:
    """PEFT's ``PromptEncoder`` built with ``inference_mode=True``, holding the table PEFT saves for the training
    encoder of :func:`encoders` (``prompt_embeddings``, the MLP's output): what loading that adapter gives."""
    peft_enc, _ = encoders(shape, dtype, device, seed)
    config = peft_config(shape)
    config.inference_mode = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = _peft_encoder_cls()(config).to(device=device, dtype=DTYPES[dtype])
    with torch.no_grad():
        enc.embedding.weight.copy_(peft_enc(torch.arange(shape.M, device=device).unsqueeze(0))[0])
    if hasattr(enc, "mlp_head"):
        raise Unavailable("this PEFT builds an MLP head under inference_mode=True; peft-inference needs one without")
    return enc


def _peft_inference_prompts(encoder, batch: int) -> torch.Tensor:
    # PeftModel.get_prompt for a P-tuning adapter whose config has inference_mode=True: the saved table, no MLP.
    return encoder.embedding.weight.repeat(batch, 1, 1)


# ------------------------------------------------------------------------------------------------ the tiny LM


_MODELS: dict[tuple, Any] = {}


def tiny_peft_model(shape: Shape, dtype: str, device: str, seed: int = 0):
    """A ``PeftModelForCausalLM`` (P-tuning, MLP) over a 1-layer random Llama of width ``shape.D``.

    The decoder layer is made narrow (2 heads of 16, MLP width 32) so the model stays small at any ``D``: only the
    word embeddings and the prompt encoder are on the timed path.
    """
    key = (shape, dtype, device, seed)
    if key in _MODELS:
        return _MODELS[key]
    _MODELS.clear()
    try:
        from peft import PromptEncoderConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise Unavailable(f"the model row needs peft and transformers ({exc}); {INSTALL_HINT}") from exc
    cfg = LlamaConfig(
        vocab_size=TINY_LM_VOCAB,
        hidden_size=shape.D,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM(cfg)
        model = get_peft_model(
            base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape.M, encoder_hidden_size=shape.H)
        )
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    _MODELS[key] = model
    return model


def _patched_copy(model):
    """A deep copy of ``model`` with ptfast encoders, via ``ptfast.integrations.peft.patch``."""
    from ..encoder import PromptEncoder as PtEncoder
    from ..integrations.peft import patch

    clone = patch(copy.deepcopy(model))
    enc = clone.prompt_encoder[clone.active_adapter]
    if not isinstance(enc, PtEncoder):
        raise Unavailable(f"patch() left a {type(enc).__name__} in place of ptfast.PromptEncoder")
    return clone, enc


def _loaded_copy(model):
    """``model``'s adapter saved and loaded again with ``PeftModel.from_pretrained`` (inference mode, its default),
    over a deep copy of the base model: an encoder holding only the saved table, as a served adapter has."""
    import tempfile

    from peft import PeftModel

    param = next(model.parameters())
    with tempfile.TemporaryDirectory(prefix="ptfast-bench-adapter-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(copy.deepcopy(model.get_base_model()), folder)
    loaded = loaded.to(device=param.device, dtype=param.dtype).eval()
    config = loaded.active_peft_config
    if not config.inference_mode or hasattr(loaded.prompt_encoder[loaded.active_adapter], "mlp_head"):
        raise Unavailable("PeftModel.from_pretrained did not give an inference-mode P-tuning adapter")
    return loaded


# ------------------------------------------------------------------------------------------------ callables


def _set_recompile_limit() -> None:
    # The grid compiles the same `forward` code for many modules; dynamo's default limit (8) would silently fall
    # back to eager after a few shapes.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)


def _compiled(fn_or_module, provider: str, device: str):
    if provider == "compile-mat" and not device.startswith("cuda"):
        raise Unavailable("max-autotune-no-cudagraphs is a CUDA baseline")
    _set_recompile_limit()
    mode = "max-autotune-no-cudagraphs" if provider == "compile-mat" else None
    return torch.compile(fn_or_module, mode=mode)


def _cuda_graph(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """Capture one call of ``fn`` (no grad) in a CUDA graph; return its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph.replay


def _prompt_recipe(encoder, tokens: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
    # PeftModel.get_prompt: encode one row of tokens, repeat it for the batch; then PeftModelForCausalLM.forward:
    # cast to the embeddings' dtype and concatenate in front of them.
    prompts = encoder(tokens[:1]).repeat(inputs_embeds.shape[0], 1, 1)
    return torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)


def _first_call(fn: Callable[[], Any], device: str) -> float:
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def make_bench(case: Case, provider: str, device: str) -> Bench:
    """The callable for ``provider`` on ``case``. Raises ``Unavailable`` when it does not apply here."""
    cuda = device.startswith("cuda")
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}: one of {PROVIDERS}")
    if provider == "peft-graph" and not cuda:
        raise Unavailable("CUDA graphs need a CUDA device")
    if provider in ("peft-graph", "peft-inference", "ptfast-cached") and case.mode == "train":
        raise Unavailable(f"{provider} is a no-grad provider")
    if case.mode == "model":
        return _make_model_bench(case, provider, device)
    if case.mode not in MODES:
        raise ValueError(f"unknown mode {case.mode!r}: one of {MODES}")

    t_setup = time.perf_counter()
    shape, B, dt = case.shape, case.batch, case.torch_dtype
    peft_enc, pt_enc = encoders(shape, case.dtype, device)
    indices = torch.arange(shape.M, device=device).unsqueeze(0).expand(B, -1)
    module = pt_enc if provider.startswith("ptfast") else peft_enc
    if provider.startswith("compile"):
        module = _compiled(peft_enc, provider, device)

    if provider == "peft-inference":
        loaded = peft_inference_encoder(shape, case.dtype, device)

    if case.mode == "infer" and provider == "peft-inference":

        def call():
            return _peft_inference_prompts(loaded, B)
    elif case.mode == "infer":

        def call():
            return module(indices)
    elif case.mode == "prompt":
        gen = torch.Generator(device=device).manual_seed(1)
        inputs_embeds = torch.randn(B, case.seq_len, shape.D, device=device, dtype=dt, generator=gen)
        if provider == "peft-inference":

            def call():
                prompts = _peft_inference_prompts(loaded, B)
                return torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)
        elif provider.startswith("compile"):
            target = _compiled(lambda: _prompt_recipe(peft_enc, indices, inputs_embeds), provider, device)
            call = target
        else:

            def call():
                return _prompt_recipe(module, indices, inputs_embeds)
    else:  # train
        gen = torch.Generator(device=device).manual_seed(1)
        grad_out = torch.randn(B, shape.M, shape.D, device=device, dtype=dt, generator=gen)
        params = list((pt_enc if provider.startswith("ptfast") else peft_enc).parameters())

        def call():
            for p in params:
                p.grad = None
            out = module(indices)
            out.backward(grad_out)
            return out

    if provider == "ptfast" and case.mode != "train":
        inner = call

        weight = pt_enc.embedding.weight

        def call():  # a cache miss every call: what an optimizer step leaves (a moved version counter)
            increment_version(weight)
            return inner()

    grad = case.mode == "train"
    fn = call
    note = ""
    if provider == "peft-graph":
        fn = _cuda_graph(call, device)
    setup_s = time.perf_counter() - t_setup
    if provider.startswith("compile"):
        try:
            with torch.set_grad_enabled(grad):
                compile_s = _first_call(fn, device)
        except Exception as exc:  # inductor needs a compiler; report, don't crash the grid
            raise Unavailable(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        setup_s += compile_s
        note = f"compile {compile_s:.1f}s"
    return Bench(fn=fn, device=device, setup_s=setup_s, note=note, grad=grad)


def _make_model_bench(case: Case, provider: str, device: str) -> Bench:
    if provider not in ("peft", "peft-inference", "ptfast", "ptfast-cached"):
        raise Unavailable(f"{provider} is not run at the model level")
    t_setup = time.perf_counter()
    model = tiny_peft_model(case.shape, case.dtype, device)
    enc = None
    if provider == "peft-inference":
        model = _loaded_copy(model)
    elif provider != "peft":
        with warnings.catch_warnings():
            # transformers' deprecation notices from attributes the copy reads; nothing ptfast can act on
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
            model, enc = _patched_copy(model)
    gen = torch.Generator(device=device).manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (case.batch, case.seq_len), device=device, generator=gen)
    word_embeddings = model.word_embeddings
    B = case.batch

    def call():
        # PeftModelForCausalLM.forward's P-tuning branch, without the base model call.
        inputs_embeds = word_embeddings(input_ids)
        prompts = model.get_prompt(batch_size=B)
        prompts = prompts.to(inputs_embeds.dtype)
        return torch.cat((prompts, inputs_embeds), dim=1)

    weight = enc.embedding.weight if enc is not None else None

    def fn():
        if provider == "ptfast":
            increment_version(weight)  # a cache miss, as after an optimizer step
        return call()

    return Bench(fn=fn, device=device, setup_s=time.perf_counter() - t_setup, grad=False)
