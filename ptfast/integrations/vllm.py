"""Serve P-tuning adapters with vLLM: ``prompt_embeds`` inputs built by a ``ptfast.PromptBank``.

vLLM (``enable_prompt_embeds=True``) takes each request as a ``(T + L, D)`` tensor: the adapter's virtual-token table
followed by the word embeddings of the request's tokens. Any mix of adapters then runs in one continuous batch, with
vLLM's KV cache, scheduler and parallelism, and no adapter-switching. This module builds those inputs; it never
imports vllm (``from ptfast.integrations import vllm as ptv`` works without it)::

    llm = vllm.LLM(model=folder, enable_prompt_embeds=True, skip_tokenizer_init=True)
    bank = ptfast.PromptBank.load("my_bank", embedding_weight_from_checkpoint(folder))
    outs = llm.generate(ptv.build_prompts(bank, [ids_a, ids_b], ["sql", "chat"], engine=llm), params)

What vLLM 0.32 does with bad ``prompt_embeds`` (measured on the CPU build, offline ``LLM.generate``): a wrong hidden
size kills the engine process (``EngineDeadError``; every later request fails); integer tensors are silently cast;
NaN values are accepted and corrupt the KV blocks reused by the *next* request; it checks only the rank. So every
function here validates first and raises ``PromptEmbedsError`` (or ``ptfast.UnknownAdapterError``) before anything
reaches the engine.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PromptEmbedsError, UnknownAdapterError

__all__ = [
    "EngineSpec",
    "PromptEmbedsError",
    "build_prompt_embeds",
    "build_prompts",
    "chat_prompt_embeds_part",
    "check_prompt_embeds",
    "completion_request",
    "encode_prompt_embeds",
    "generate",
]

TokenIds = torch.Tensor | Sequence[int]


@dataclass(frozen=True)
class EngineSpec:
    """What the engine expects of ``prompt_embeds``: rows of ``hidden_size`` values in ``dtype`` (on CPU), at most
    ``max_model_len`` rows, built from token ids below ``vocab_size``. ``None`` fields are not checked."""

    hidden_size: int
    dtype: torch.dtype = torch.float32
    vocab_size: int | None = None
    max_model_len: int | None = None

    @classmethod
    def of(cls, engine: Any) -> EngineSpec:
        """The spec of a ``vllm.LLM`` (or ``AsyncLLM``, ``LLMEngine``, or their ``ModelConfig``), or ``engine``
        itself if it is an ``EngineSpec``. Reads ``model_config`` duck-typed: vllm is not imported here."""
        if isinstance(engine, EngineSpec):
            return engine
        config = engine
        if not callable(getattr(config, "get_hidden_size", None)):  # an LLM / AsyncLLM / LLMEngine: its config
            config = getattr(engine, "model_config", None) or getattr(
                getattr(engine, "llm_engine", None), "model_config", None
            )
        if not callable(getattr(config, "get_hidden_size", None)):
            raise TypeError(
                f"EngineSpec.of: expected a vllm.LLM, its model_config or an EngineSpec, got {type(engine).__name__}"
            )
        dtype = getattr(config, "dtype", torch.float32)
        return cls(
            hidden_size=int(config.get_hidden_size()),
            dtype=dtype if isinstance(dtype, torch.dtype) else _dtype(dtype),
            vocab_size=int(config.get_vocab_size()),
            max_model_len=getattr(config, "max_model_len", None),
        )

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, dtype: str | torch.dtype | None = None, max_model_len: int | None = None
    ) -> EngineSpec:
        """The spec of a server started on model ``folder`` (read from its ``config.json``), for clients.

        ``dtype``/``max_model_len``: what the server was started with (``--dtype``, ``--max-model-len``); the
        default dtype is the checkpoint's, like vLLM's ``--dtype auto`` (which uses fp16 for fp32 checkpoints on
        some GPUs: pass the server's dtype when in doubt)."""
        with open(os.path.join(os.fspath(folder), "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config = config.get("text_config", config)
        dtype = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
        return cls(
            hidden_size=int(config["hidden_size"]),
            dtype=_dtype(dtype),
            vocab_size=int(config["vocab_size"]),
            max_model_len=max_model_len,
        )


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {value!r}")
    return dtype


def check_prompt_embeds(embeds: Any, engine: Any = None) -> torch.Tensor:
    """Validate one request's ``prompt_embeds`` (e.g. built by hand) and return it as the engine expects it.

    Args:
        embeds: a ``(L, D)`` floating tensor.
        engine: a ``vllm.LLM`` or an ``EngineSpec``; ``None`` checks only what needs no engine.

    Returns a detached, contiguous CPU tensor in the engine's dtype. Raises ``PromptEmbedsError`` for a non-tensor,
    a rank other than 2, an integer/bool/complex dtype, zero rows, a hidden size other than the engine's, non-finite
    values, or more rows than ``max_model_len``.
    """
    spec = None if engine is None else EngineSpec.of(engine)
    if not isinstance(embeds, torch.Tensor):
        raise PromptEmbedsError(f"prompt_embeds must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.dim() != 2:
        raise PromptEmbedsError(f"prompt_embeds must be 2-D (seq_len, hidden_size), got shape {tuple(embeds.shape)}")
    if not embeds.is_floating_point():
        raise PromptEmbedsError(
            f"prompt_embeds must be floating point, got {embeds.dtype} (vLLM would cast the integers to floats "
            "silently); token ids go through build_prompts, not here"
        )
    if embeds.shape[0] == 0:
        raise PromptEmbedsError("prompt_embeds has no rows: an empty prompt")
    if spec is not None and embeds.shape[1] != spec.hidden_size:
        raise PromptEmbedsError(
            f"prompt_embeds hidden size {embeds.shape[1]} != the engine model's hidden size {spec.hidden_size} "
            "(vLLM 0.32 would kill its engine process on this)"
        )
    if spec is not None and spec.max_model_len is not None and embeds.shape[0] > spec.max_model_len:
        raise PromptEmbedsError(
            f"prompt_embeds has {embeds.shape[0]} rows > the engine's max_model_len {spec.max_model_len}"
        )
    out = embeds.detach().to(device="cpu", dtype=spec.dtype if spec is not None else embeds.dtype)
    if not bool(torch.isfinite(out).all()):
        raise PromptEmbedsError(
            "prompt_embeds has NaN or infinite values (in the engine's dtype); vLLM would accept them and corrupt "
            "the KV cache of later requests"
        )
    return out.contiguous()


def _requests(input_ids: Any) -> list[TokenIds]:
    """One request (a 1-D tensor or a list of ints), a (B, L) tensor, or a sequence of requests -> list of requests."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            return [input_ids]
        if input_ids.dim() == 2:
            return list(input_ids)
        raise PromptEmbedsError(
            f"input_ids must be 1-D (one request) or 2-D (B, L), got shape {tuple(input_ids.shape)}"
        )
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
        raise PromptEmbedsError(f"input_ids must be token ids (a tensor or a list), got {type(input_ids).__name__}")
    if len(input_ids) and not isinstance(input_ids[0], (Sequence, torch.Tensor)):
        return [input_ids]  # one request given as a flat list of ints
    return list(input_ids)


def _as_ids(ids: TokenIds, i: int, vocab: int) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise PromptEmbedsError(f"request {i}: token ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise PromptEmbedsError(f"request {i}: token ids must be integers, got {ids.dtype}")
        ids = ids.to(device="cpu", dtype=torch.int64)
    else:
        if (
            isinstance(ids, (str, bytes))
            or not isinstance(ids, Sequence)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise PromptEmbedsError(f"request {i}: token ids must be a list of ints or a 1-D integer tensor")
        ids = torch.tensor(list(ids), dtype=torch.int64)
    if ids.numel() == 0:
        raise PromptEmbedsError(f"request {i}: no token ids (an empty prompt; PEFT and HF generate reject it too)")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise PromptEmbedsError(
            f"request {i}: token id {low if low < 0 else high} is outside the vocabulary [0, {vocab})"
        )
    return ids


def build_prompt_embeds(bank, input_ids: Any, adapters: str | Sequence[str], engine: Any = None) -> list[torch.Tensor]:
    """One ``(T + L, D)`` ``prompt_embeds`` tensor per request, in request order.

    Args:
        bank: a ``ptfast.PromptBank`` over the served model's word embeddings.
        input_ids: one request (a 1-D tensor or a list of ints), a ``(B, L)`` tensor, or a list of requests of any
            lengths (no padding).
        adapters: one adapter name per request, or one name for all.
        engine: a ``vllm.LLM`` (or its ``model_config``) or an ``EngineSpec``: the tensors come out in its dtype,
            on CPU, checked against its hidden size, vocabulary and ``max_model_len``. ``None``: the bank's dtype.

    Each tensor is bitwise the adapter's table followed by the embedding rows of its tokens (``bank.prepare_inputs``
    on the requests grouped by ``(T, L)``), cast to the engine's dtype, in its own storage (no view of a batch).
    """
    spec = None if engine is None else EngineSpec.of(engine)
    requests = _requests(input_ids)
    if not requests:
        raise PromptEmbedsError("no requests")
    names = [adapters] * len(requests) if isinstance(adapters, str) else list(adapters)
    if len(names) != len(requests):
        raise PromptEmbedsError(f"got {len(names)} adapter names for {len(requests)} requests")
    weight = bank.weight
    hidden = weight.shape[1]
    if spec is not None and hidden != spec.hidden_size:
        raise PromptEmbedsError(
            f"the bank's word embeddings have hidden size {hidden}, the engine's model {spec.hidden_size}: this bank "
            "belongs to another base model (vLLM 0.32 would kill its engine process on these inputs)"
        )
    vocab = weight.shape[0] if spec is None or spec.vocab_size is None else min(weight.shape[0], spec.vocab_size)
    dtype = weight.dtype if spec is None else spec.dtype
    groups: dict[tuple, list[int]] = defaultdict(list)
    ids_of = []
    for i, (ids, name) in enumerate(zip(requests, names)):
        if not isinstance(name, str) or name not in bank:
            raise UnknownAdapterError(f"request {i}: no adapter named {name!r} in the bank; have {sorted(bank.names)}")
        ids = _as_ids(ids, i, vocab)
        total = bank.num_virtual_tokens(name) + ids.numel()
        if spec is not None and spec.max_model_len is not None and total > spec.max_model_len:
            raise PromptEmbedsError(
                f"request {i}: {total} prompt positions ({bank.num_virtual_tokens(name)} virtual "
                f"+ {ids.numel()} tokens) > the engine's max_model_len {spec.max_model_len}"
            )
        ids_of.append(ids)
        groups[(bank.num_virtual_tokens(name), ids.numel())].append(i)
    out: list[torch.Tensor | None] = [None] * len(requests)
    with torch.no_grad():
        for rows in groups.values():
            batch = torch.stack([ids_of[i] for i in rows]).to(weight.device)
            embeds = bank.prepare_inputs(batch, [names[i] for i in rows])["inputs_embeds"]
            embeds = embeds.to(device="cpu", dtype=dtype)
            if not bool(torch.isfinite(embeds).all()):
                bad = [i for i, row in zip(rows, embeds) if not bool(torch.isfinite(row).all())]
                raise PromptEmbedsError(
                    f"requests {bad}: prompt embeddings with NaN or infinite values (adapters "
                    f"{sorted({names[i] for i in bad})}); vLLM would corrupt the KV cache of later requests"
                )
            for i, row in zip(rows, embeds):
                out[i] = row.clone()  # own storage: torch.save of a view would ship the whole batch
    return out  # type: ignore[return-value]


def build_prompts(
    bank, input_ids: Any, adapters: str | Sequence[str], engine: Any = None
) -> list[dict[str, torch.Tensor]]:
    """``[{"prompt_embeds": (T + L, D)}, ...]`` for ``LLM.generate``: see ``build_prompt_embeds``."""
    return [{"prompt_embeds": e} for e in build_prompt_embeds(bank, input_ids, adapters, engine)]


def generate(
    llm, bank, input_ids: Any, adapters: str | Sequence[str], sampling_params=None, **kwargs
) -> list[list[int]]:
    """``llm.generate`` on ``build_prompts(bank, input_ids, adapters, engine=llm)``; the generated token ids of
    each request, in order. ``kwargs`` go to ``llm.generate`` (default ``use_tqdm=False``)."""
    kwargs.setdefault("use_tqdm", False)
    outputs = llm.generate(build_prompts(bank, input_ids, adapters, engine=llm), sampling_params, **kwargs)
    return [list(o.outputs[0].token_ids) for o in outputs]


def encode_prompt_embeds(embeds: torch.Tensor, engine: Any = None) -> str:
    """Base64 of ``torch.save(embeds)``: how vLLM's OpenAI server takes ``prompt_embeds`` (it decodes with
    ``torch.load(weights_only=True, map_location="cpu")``). The tensor is checked by ``check_prompt_embeds``."""
    return _base64_of(_own_storage(check_prompt_embeds(embeds, engine)))


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy where it is a view: torch.save writes a view's whole storage."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def _base64_of(t: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(t, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def completion_request(
    bank,
    input_ids: Any,
    adapters: str | Sequence[str],
    *,
    model: str,
    engine: Any = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    **params: Any,
) -> dict[str, Any]:
    """The JSON body of a ``POST /v1/completions`` to ``vllm.entrypoints.openai.api_server --enable-prompt-embeds``.

    Args:
        bank, input_ids, adapters, engine: as in ``build_prompt_embeds`` (for a server, ``engine`` is an
            ``EngineSpec``, e.g. ``EngineSpec.from_pretrained(model_folder, dtype=..., max_model_len=...)``).
        model: the server's ``--served-model-name``.
        params: more completion parameters (``ignore_eos``, ``top_p``, ``seed``, ...).

    Returns a dict with ``prompt_embeds`` (one base64 string for one request, else a list: the response's
    ``choices[i]`` answers request ``i``) and ``return_token_ids: True`` (so ``choices[i]["token_ids"]`` holds the
    generated ids even when the server runs with ``--skip-tokenizer-init``).
    """
    single = len(_requests(input_ids)) == 1 and (isinstance(adapters, str) or len(adapters) == 1)
    embeds = build_prompt_embeds(bank, input_ids, adapters, engine)  # checked, each in its own storage
    encoded = [_base64_of(e) for e in embeds]
    body = {
        "model": model,
        "prompt_embeds": encoded[0] if single else encoded,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "return_token_ids": True,
    }
    body.update(params)
    return body


def chat_prompt_embeds_part(bank, adapter: str, engine: Any = None) -> dict[str, str]:
    """A chat message content part ``{"type": "prompt_embeds", "data": <base64>}`` carrying only ``adapter``'s
    ``(T, D)`` virtual-token table: put it first in the user message's content, the text parts after it.

    vLLM 0.32 splices the table in place of a placeholder while rendering the chat template, so the server needs a
    tokenizer and a chat template: it answers 500 when started with ``--skip-tokenizer-init``.
    """
    if not isinstance(adapter, str) or adapter not in bank:
        raise UnknownAdapterError(f"no adapter named {adapter!r} in the bank; have {sorted(bank.names)}")
    table = bank.table(adapter)
    spec = None if engine is None else EngineSpec.of(engine)
    if spec is not None and table.shape[1] != spec.hidden_size:
        raise PromptEmbedsError(
            f"adapter {adapter!r} has width {table.shape[1]}, the engine's model "
            f"{spec.hidden_size}: this bank belongs to another base model"
        )
    return {"type": "prompt_embeds", "data": encode_prompt_embeds(table, spec)}
