"""prepend_prompts: ``inputs_embeds`` for P-tuning in one pass, plus PEFT's attention-mask / label extension.

Public API
----------
``prepend_prompts(input_ids, word_embeddings, tables, adapter_index, *, backend=None) -> inputs_embeds``

* ``input_ids`` (B, L) int64/int32; ``word_embeddings`` (V, D) (the ``nn.Embedding`` weight, any dtype);
  ``tables`` (A, T, D), the virtual-token tables, already in ``word_embeddings``' dtype (cast them once when you
  build them, e.g. with ``PromptBank``: a dtype mismatch is an error, never a per-call cast); ``adapter_index``
  (B,) int64/int32, the table of each row.
* Returns ``(B, T + L, D)`` in ``word_embeddings``' dtype: row ``b`` is ``tables[adapter_index[b]]`` then
  ``word_embeddings[input_ids[b]]``, written once into one contiguous buffer. This equals PEFT's
  ``cat((prompt.repeat(B, 1, 1).to(dtype), word_embeddings(input_ids)), 1)`` bit for bit (it is a pure copy).
* Everything is validated first (TypeError / ValueError / IndexError naming the argument), before any native or
  Triton code runs: types, ranks, integer index dtypes, dtype and device agreement, shapes, out-of-range token ids
  and adapter indices (the range check reads the indices: one host sync on CUDA).

Backends (``backend=`` argument, else ``PTFAST_BACKEND`` read at call time, else ``"auto"``):

* ``"native"``: the C++ op ``torch.ops.ptfast.prepend_prompts`` (CPU and Meta tensors), see ``ptfast.native``.
* ``"triton"``: the Triton gather kernel (``ptfast/kernels/prepend.py``); CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported (how it is tested without a GPU).
* ``"eager"``: ``torch.cat((tables[adapter_index], F.embedding(input_ids, word_embeddings)), 1)``; differentiable.
* ``"auto"``: CUDA -> triton (eager if triton is missing); CPU and Meta -> native if ``native_available()``
  (``PTFAST_NO_NATIVE=1`` turns it off; a failed build falls back with one warning) else eager; other devices ->
  eager. Whenever autograd must flow into ``word_embeddings`` or ``tables`` the eager backend is used, whatever
  was asked for, since the native and Triton kernels have no backward.

``PTFAST_BACKEND`` is shared with ``fused_mlp_head`` and takes the values both understand: ``auto``, ``eager``,
``triton``. An explicit ``backend="native"``/``"triton"`` that cannot run raises instead of falling back.

``extend_attention_mask(attention_mask, num_virtual_tokens)`` / ``extend_labels(labels, num_virtual_tokens)``:
PEFT's ``PeftModelForCausalLM.forward`` extension, same values, dtype and device: the mask gets a prefix of ones
built as ``torch.ones(B, T)`` (float32) and moved to the mask's device, so the result has
``torch.promote_types(float32, mask.dtype)`` (a long/bool mask becomes float32, as in PEFT); labels get a prefix
of ``-100`` built as ``torch.full((B, T), -100)`` (int64), result dtype ``promote_types(int64, labels.dtype)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _env, native

__all__ = [
    "prepend_prompts",
    "prepend_prompts_reference",
    "extend_attention_mask",
    "extend_labels",
    "prepend_backend",
]

_INDEX_DTYPES = (torch.int64, torch.int32)


# ------------------------------------------------------------------------------------------------ reference
def prepend_prompts_reference(input_ids, word_embeddings, tables, adapter_index):
    """Eager PyTorch: ``cat((tables[adapter_index], embedding(input_ids)), 1)``. Differentiable, any device."""
    prompts = tables.index_select(0, adapter_index)
    return torch.cat((prompts, F.embedding(input_ids, word_embeddings)), dim=1)


# ------------------------------------------------------------------------------------------------ validation
def _validate(input_ids, word_embeddings, tables, adapter_index) -> None:
    named = (
        ("input_ids", input_ids),
        ("word_embeddings", word_embeddings),
        ("tables", tables),
        ("adapter_index", adapter_index),
    )
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"prepend_prompts: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("input_ids", input_ids), ("adapter_index", adapter_index)):
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"prepend_prompts: {name} must be an integer tensor (int64 or int32), got {t.dtype}")
    for name, t, rank, layout in (
        ("input_ids", input_ids, 2, "(B, L)"),
        ("word_embeddings", word_embeddings, 2, "(V, D)"),
        ("tables", tables, 3, "(A, T, D)"),
        ("adapter_index", adapter_index, 1, "(B,)"),
    ):
        if t.dim() != rank:
            raise ValueError(f"prepend_prompts: {name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if tables.dtype != word_embeddings.dtype:
        raise TypeError(
            f"prepend_prompts: tables have dtype {tables.dtype} but word_embeddings have {word_embeddings.dtype}; "
            "cast the tables once when you build them (PromptBank does), not per call"
        )
    device = word_embeddings.device
    for name, t in named:
        if t.device != device:
            raise ValueError(
                f"prepend_prompts: all inputs must be on word_embeddings' device {device}, but {name} is on {t.device}"
            )
    if tables.shape[2] != word_embeddings.shape[1]:
        raise ValueError(
            f"prepend_prompts: tables have width {tables.shape[2]} but word_embeddings have D="
            f"{word_embeddings.shape[1]} (tables {tuple(tables.shape)}, word_embeddings {tuple(word_embeddings.shape)})"
        )
    if adapter_index.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"prepend_prompts: adapter_index has {adapter_index.shape[0]} entries but input_ids has "
            f"{input_ids.shape[0]} rows"
        )
    if device.type == "meta":
        return  # no values to check
    _check_range(input_ids, word_embeddings.shape[0], "input_ids", "token id", "vocabulary size V")
    _check_range(adapter_index, tables.shape[0], "adapter_index", "adapter index", "number of tables A")


def _check_range(idx: torch.Tensor, n: int, name: str, what: str, limit: str) -> None:
    if idx.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"prepend_prompts: {name} has {what} {bad} out of range [0, {n}) ({limit} = {n}; {name} spans [{lo}, {hi}])"
        )


# ------------------------------------------------------------------------------------------------ backend choice
def prepend_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend a call on ``device`` uses (``"native"``, ``"triton"`` or ``"eager"``), without autograd routing.

    May load (and on first use compile) the native extension, like ``native_available()``: ``auto`` falls back to
    eager where it does not load, an explicit ``"native"`` raises.
    """
    chosen = _env.resolve_backend("prepend", device, backend=backend)
    if chosen == "native" and not native.native_available():
        if backend == "native":
            raise RuntimeError(f"prepend_prompts: native backend unavailable: {native.native_status()['error']}")
        return "eager"
    return chosen


# ------------------------------------------------------------------------------------------------ public ops
def prepend_prompts(
    input_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    tables: torch.Tensor,
    adapter_index: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``inputs_embeds`` (B, T + L, D): row b is ``tables[adapter_index[b]]`` then ``word_embeddings[input_ids[b]]``.

    See the module docstring for shapes, dtypes, validation and backends.
    """
    _validate(input_ids, word_embeddings, tables, adapter_index)
    chosen = prepend_backend(word_embeddings.device, backend)
    if torch.is_grad_enabled() and (word_embeddings.requires_grad or tables.requires_grad):
        chosen = "eager"  # only the eager path has a backward
    if chosen == "native":
        return torch.ops.ptfast.prepend_prompts(input_ids, word_embeddings, tables, adapter_index)
    if chosen == "triton":
        from ..kernels.prepend import prepend_prompts_triton

        return prepend_prompts_triton(input_ids, word_embeddings, tables, adapter_index)
    return prepend_prompts_reference(input_ids, word_embeddings, tables, adapter_index)


def _check_2d(t, name: str, num_virtual_tokens: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, L), got shape {tuple(t.shape)}")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 0:
        raise ValueError(f"num_virtual_tokens must be an int >= 0, got {num_virtual_tokens!r}")


def extend_attention_mask(attention_mask: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """Prepend ``num_virtual_tokens`` ones, exactly as ``PeftModelForCausalLM.forward`` does.

    ``cat((torch.ones(B, T).to(mask.device), mask), 1)``: the prefix is float32, so the result dtype is
    ``promote_types(float32, mask.dtype)`` (float32 for the usual long/bool masks), on the mask's device.
    """
    _check_2d(attention_mask, "attention_mask", num_virtual_tokens)
    prefix = torch.ones(attention_mask.shape[0], num_virtual_tokens).to(attention_mask.device)
    return torch.cat((prefix, attention_mask), dim=1)


def extend_labels(labels: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """Prepend ``num_virtual_tokens`` ``-100`` labels (ignored by the loss), exactly as PEFT does.

    ``cat((torch.full((B, T), -100).to(labels.device), labels), 1)``: int64 prefix, result dtype
    ``promote_types(int64, labels.dtype)``, on the labels' device.
    """
    _check_2d(labels, "labels", num_virtual_tokens)
    prefix = torch.full((labels.shape[0], num_virtual_tokens), -100).to(labels.device)
    return torch.cat((prefix, labels), dim=1)
