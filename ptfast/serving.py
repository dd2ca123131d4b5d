"""PromptBank: serve many P-tuning adapters from one base model, mixed in one batch.

    bank = PromptBank.from_peft_model(peft_model)            # every P-tuning adapter, patched or not
    base = peft_model.get_base_model()
    out = base(**bank.prepare_inputs(input_ids, ["a", "b", "a"], attention_mask=mask))
    gen = base.generate(**bank.prepare_inputs(input_ids, "a", attention_mask=mask), max_new_tokens=20)

Call the *base* model with what ``prepare_inputs`` returns (``inputs_embeds``, ``attention_mask``, ``labels``):
calling the PeftModel would prepend its active adapter's prompt a second time. ``generate`` with
``inputs_embeds`` returns only the new tokens.

Tables: each adapter's reparameterized ``(T, D)`` table is computed once (no grad) when it is added, cast once to
the word embeddings' dtype and device, and stored in one stacked ``(A, T, D)`` tensor per virtual-token length
``T``. Adding, replacing or removing an adapter rebuilds that stack (a new tensor: never a view of an old one) and
the name -> row map together, published as one immutable snapshot, so a concurrent ``prepare_inputs`` sees either
the old or the new bank, never a mix, and no name ever maps to another adapter's row. A name removed by another
thread is an ``UnknownAdapterError``, as it would be afterwards.

Copies: ``pickle``, ``torch.save`` and ``copy.deepcopy`` copy the word embeddings and every source (encoders and
frozen tables; for a bank from ``from_peft_model``, that is the base model too) and compute the tables again in the
copy. To ship tables alone, checked against the serving model's embeddings, use ``save``/``load``.

The bank never serves a table that differs from what its adapter's encoder computes now. It tracks each source
encoder by the same rules as the encoder's own cache (``ptfast._cache.Snapshot``: parameter and buffer versions,
structural changes, optimizer steps, hooks, precision and backend), and the word embeddings (the module the model
returns from ``get_input_embeddings()`` when built with ``from_peft_model``, its weight's identity, dtype and
device). Whatever changed is recomputed (or re-cast) on the next ``prepare_inputs``/``table`` call. Tables added as
tensors are frozen copies: they follow the embeddings' dtype and device, nothing else. ``refresh()`` recomputes
everything, for changes no counter sees (writes through ``.data``).

Word embeddings: ``PromptBank(model.get_input_embeddings())`` or a weight tensor. A plain ``nn.Embedding`` (no
``max_norm``, no overridden ``forward``) is fused into one native/Triton gather; a subclass such as Gemma's scaled
embedding is called as a module (exactly what PEFT does) and the prompts are concatenated in front. A weight tensor
means plain row lookups: for a model that scales its embeddings, pass the module (or a ``bank_io.ScaledEmbedding``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._cache import Snapshot, global_state
from .bank_io import is_plain_embedding, read_bank, save_bank
from .config import is_p_tuning
from .encoder import is_inference_encoder
from .errors import UnknownAdapterError
from .ops.prepend import extend_attention_mask, extend_labels, prepend_prompts

__all__ = ["PromptBank"]


@dataclass(frozen=True)
class _Group:
    """Every adapter with one virtual-token length: ``stack[index[name]]`` is that adapter's table."""

    num_virtual_tokens: int
    names: tuple[str, ...]
    stack: torch.Tensor  # (A, T, D)
    index: Mapping[str, int]


@dataclass(frozen=True)
class _Source:
    """Where a table comes from: an encoder (tracked by ``snapshot``) or a frozen ``(T, D)`` copy."""

    source: Any
    inference_mode: bool | None
    snapshot: Snapshot | None = None  # None: a frozen table, or an encoder that cannot be tracked

    @property
    def frozen(self) -> bool:
        return isinstance(self.source, torch.Tensor)

    def is_current(self, global_now: tuple | None = None) -> bool:
        return self.snapshot is None or self.snapshot.is_current(global_now)


@dataclass(frozen=True)
class _State:
    groups: Mapping[int, _Group] = field(default_factory=dict)
    length: Mapping[str, int] = field(default_factory=dict)  # name -> T
    sources: Mapping[str, _Source] = field(default_factory=dict)
    embedding_key: tuple = ()  # what the tables were cast for: see PromptBank._embedding_key


def _table_of(source: Any, inference_mode: bool | None) -> torch.Tensor:
    """The ``(T, D)`` virtual-token table of an encoder (PEFT's or ptfast's, patched or not) or a tensor."""
    if isinstance(source, torch.Tensor):
        table = source
    elif isinstance(source, nn.Module):
        if inference_mode is None:
            inference_mode = is_inference_encoder(source)
        if inference_mode:
            table = source.embedding.weight  # what PEFT's get_prompt uses for inference-mode adapters
        else:
            # A served table is the deterministic one: eval mode (an LSTM head's dropout off), no autograd.
            was_training = source.training
            source.eval()
            try:
                with torch.no_grad():
                    if callable(getattr(source, "table", None)):
                        table = source.table()  # ptfast.PromptEncoder: the cached reparameterized table
                    else:
                        n = source.embedding.weight.shape[0]
                        tokens = torch.arange(n, device=source.embedding.weight.device).unsqueeze(0)
                        table = source(tokens)[0]  # PEFT's get_prompt: encoder(prompt_tokens[:1])
            finally:
                source.train(was_training)
    else:
        raise TypeError(
            f"PromptBank: expected a prompt encoder (nn.Module) or a (T, D) tensor, got {type(source).__name__}"
        )
    if table.dim() != 2:
        raise ValueError(f"PromptBank: a table must be 2-D (num_virtual_tokens, D), got shape {tuple(table.shape)}")
    return table.detach()


class PromptBank:
    """A registry of cached P-tuning virtual-token tables that builds ``inputs_embeds`` for mixed-adapter batches.

    Args:
        word_embeddings: the base model's input embedding module (``model.get_input_embeddings()``) or its
            ``(V, D)`` weight tensor. Tables are stored in its dtype and on its device.
    """

    def __init__(self, word_embeddings: nn.Module | torch.Tensor):
        if isinstance(word_embeddings, nn.Module):
            if not isinstance(getattr(word_embeddings, "weight", None), torch.Tensor):
                raise TypeError("PromptBank: the word embeddings module has no .weight tensor")
        elif not isinstance(word_embeddings, torch.Tensor):
            raise TypeError(
                f"PromptBank: word_embeddings must be an nn.Module or a tensor, got {type(word_embeddings).__name__}"
            )
        if self._weight_of(word_embeddings).dim() != 2:
            raise ValueError("PromptBank: word embeddings must be (V, D)")
        self._word_embeddings = word_embeddings
        self._embeddings_of: Any | None = None  # e.g. base_model.get_input_embeddings: follows the model
        self._lock = threading.Lock()
        self._state = _State()

    @staticmethod
    def _weight_of(word_embeddings) -> torch.Tensor:
        return word_embeddings.weight if isinstance(word_embeddings, nn.Module) else word_embeddings

    @property
    def word_embeddings(self) -> nn.Module | torch.Tensor:
        """The word embeddings used now: the model's current input embeddings for a bank from
        ``from_peft_model`` (so ``resize_token_embeddings``/``set_input_embeddings`` are followed)."""
        return self._word_embeddings if self._embeddings_of is None else self._embeddings_of()

    @property
    def weight(self) -> torch.Tensor:
        """The ``(V, D)`` word-embedding weight (read now, so it follows the model's current parameter)."""
        return self._weight_of(self.word_embeddings)

    def _embedding_key(self, embeddings: nn.Module | torch.Tensor | None = None) -> tuple:
        weight = self._weight_of(self.word_embeddings if embeddings is None else embeddings)
        return (weight.dtype, weight.device, weight.shape[1])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_peft_model(
        cls,
        peft_model: nn.Module,
        word_embeddings: nn.Module | torch.Tensor | None = None,
        adapters: Iterable[str] | None = None,
    ) -> PromptBank:
        """A bank with every P-tuning adapter of ``peft_model`` (or those named in ``adapters``).

        Works on a plain or ``ptfast.patch``-ed PeftModel, with adapters added by ``add_adapter`` (training mode:
        the table is the encoder's reparameterized output) or loaded by ``from_pretrained``/``load_adapter``
        (inference mode: the table is ``embedding.weight``, as in PEFT). Word embeddings default to
        ``peft_model.get_base_model().get_input_embeddings()``.
        """
        configs = getattr(peft_model, "peft_config", None)
        encoders = getattr(peft_model, "prompt_encoder", None)
        if not isinstance(configs, Mapping) or encoders is None:
            raise TypeError("PromptBank.from_peft_model: expected a peft.PeftModel with prompt-learning adapters")
        names = [name for name, cfg in configs.items() if is_p_tuning(cfg)]
        if adapters is not None:
            wanted = [adapters] if isinstance(adapters, str) else list(adapters)
            missing = [n for n in wanted if n not in names]
            if missing:
                raise UnknownAdapterError(
                    f"PromptBank.from_peft_model: no P-tuning adapter named {missing}; have {names}"
                )
            names = wanted
        if not names:
            raise ValueError("PromptBank.from_peft_model: the model has no P-tuning adapter")
        follow = word_embeddings is None
        if follow:
            word_embeddings = peft_model.get_base_model().get_input_embeddings()
        bank = cls(word_embeddings)
        if follow:
            bank._embeddings_of = peft_model.get_base_model().get_input_embeddings
        entries = []
        for name in names:
            cfg = configs[name]
            if (getattr(cfg, "num_transformer_submodules", 1) or 1) != 1:
                raise ValueError(
                    f"PromptBank: adapter {name!r} has num_transformer_submodules="
                    f"{cfg.num_transformer_submodules}; only decoder-only / encoder-only models (1) are supported"
                )
            entries.append((name, encoders[name], bool(getattr(cfg, "inference_mode", False))))
        bank._add_many(entries, replace=False)
        return bank

    # ------------------------------------------------------------------ registry
    def add(
        self,
        name: str,
        encoder_or_table: nn.Module | torch.Tensor,
        *,
        replace: bool = False,
        inference_mode: bool | None = None,
    ) -> None:
        """Register ``name``: a prompt encoder (PEFT's or ptfast's) or a ``(T, D)`` table.

        The table is computed now (no grad) and cast to the word embeddings' dtype/device. ``replace=True``
        overwrites an existing name (also the way to pick up changed weights for one adapter). ``inference_mode``
        overrides the detection of an encoder's mode (default: no MLP/LSTM head means inference mode).
        """
        self._add_many([(name, encoder_or_table, inference_mode)], replace=replace)

    def remove(self, name: str) -> None:
        """Unregister ``name``; its row leaves the stacked tensor (rebuilt) at once."""
        with self._lock:
            state = self._state
            if name not in state.length:
                raise UnknownAdapterError(f"PromptBank: no adapter named {name!r}; have {sorted(state.length)}")
            tables = self._tables_of(state)
            del tables[name]
            sources = dict(state.sources)
            del sources[name]
            self._state = self._build(tables, sources, state.embedding_key)

    def refresh(self) -> None:
        """Recompute every table from its source now. Needed only after changes no counter sees (writes through
        ``.data``): everything else is picked up by the next call on its own."""
        with self._lock:
            self._state = self._rebuilt(self._state, self._state.sources)

    def _rebuilt(self, state: _State, stale: Iterable[str]) -> _State:
        """``state`` with the tables of ``stale`` recomputed, and every table re-cast if the embeddings changed."""
        key = self._embedding_key()
        sources = dict(state.sources)
        tables = self._tables_of(state)
        recast = key != state.embedding_key
        for name, src in sources.items():
            if src.frozen:
                if recast:  # cast again from the kept original
                    tables[name] = self._cast(src.source)
            elif name in stale or recast:
                sources[name] = self._source(src.source, src.inference_mode)
                tables[name] = self._cast(_table_of(src.source, src.inference_mode))
        return self._build(tables, sources, key)

    def _fresh(self, state: _State, names: Iterable[str], embeddings: nn.Module | torch.Tensor | None = None) -> _State:
        """``state`` (the caller's snapshot, in which every name of ``names`` exists) if it is up to date for
        ``names`` and the word embeddings (``embeddings``: the caller's read of ``word_embeddings``, so a model's
        ``get_input_embeddings`` runs once per call); else the bank's current state, rebuilt. That one is another
        snapshot, in which another thread may have removed or replaced any of ``names``: check them again in it."""
        key = self._embedding_key(embeddings)
        global_now = global_state()  # once, not per adapter
        stale = [n for n in names if not state.sources[n].is_current(global_now)]
        if stale or key != state.embedding_key:
            with self._lock:
                state = self._state
                stale = [n for n in state.sources if not state.sources[n].is_current()]
                if stale or self._embedding_key() != state.embedding_key:
                    state = self._state = self._rebuilt(state, stale)
        return state

    @staticmethod
    def _source(source: Any, mode: bool | None) -> _Source:
        if isinstance(source, torch.Tensor):  # frozen: the bank's own copy, so later writes do not leak in
            return _Source(source.detach().clone(), mode, None)
        return _Source(source, mode, Snapshot.take(source, with_modes=False))

    def _add_many(self, entries: Sequence[tuple], replace: bool) -> None:
        with self._lock:
            state = self._state
            if self._embedding_key() != state.embedding_key:  # the tables so far were cast for other embeddings
                state = self._rebuilt(state, ())
            tables = self._tables_of(state)
            sources = dict(state.sources)
            for name, source, mode in entries:
                if not isinstance(name, str) or not name:
                    raise TypeError(f"PromptBank: adapter names must be non-empty strings, got {name!r}")
                if name in tables and not replace:
                    raise ValueError(f"PromptBank: adapter {name!r} already exists (pass replace=True to overwrite)")
                with torch.no_grad():
                    table = self._cast(_table_of(source, mode))
                tables[name] = table
                sources[name] = self._source(source, mode)
            self._state = self._build(tables, sources, self._embedding_key())

    def _cast(self, table: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if table.shape[1] != weight.shape[1]:
            raise ValueError(f"PromptBank: table width {table.shape[1]} != word embedding width D={weight.shape[1]}")
        with torch.no_grad():
            return table.to(device=weight.device, dtype=weight.dtype)

    @staticmethod
    def _tables_of(state: _State) -> dict[str, torch.Tensor]:
        return {name: g.stack[i] for g in state.groups.values() for name, i in g.index.items()}

    @staticmethod
    def _build(tables: dict[str, torch.Tensor], sources: dict[str, _Source], embedding_key: tuple) -> _State:
        by_len: dict[int, list] = {}
        for name, table in tables.items():
            by_len.setdefault(table.shape[0], []).append(name)
        groups = {}
        for n, names in by_len.items():
            with torch.no_grad():
                stack = torch.stack([tables[name] for name in names])  # always a new tensor
            groups[n] = _Group(n, tuple(names), stack, {name: i for i, name in enumerate(names)})
        length = {name: t.shape[0] for name, t in tables.items()}
        return _State(groups, length, sources, embedding_key)

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._state.length)

    def __contains__(self, name: object) -> bool:
        return name in self._state.length

    def __len__(self) -> int:
        return len(self._state.length)

    def num_virtual_tokens(self, name: str) -> int:
        state = self._state
        return state.length[self._check_name(state, name)]

    def table(self, name: str) -> torch.Tensor:
        """The ``(T, D)`` table of ``name`` as served now (a view into the bank's stack: do not write to it)."""
        snapshot = self._state
        state = self._fresh(snapshot, [self._check_name(snapshot, name)])
        if state is not snapshot:  # rebuilt: meanwhile another thread may have removed the name
            self._check_name(state, name)
        group = state.groups[state.length[name]]
        return group.stack[group.index[name]]

    @classmethod
    def _prompt_length(cls, state: _State, adapter: str | Sequence[str], names: list | None) -> int:
        """The ``num_virtual_tokens`` shared by ``names`` (or ``adapter``, when ``names`` is None) in ``state``."""
        if names is None:
            return state.length[cls._check_name(state, adapter)]
        lengths = {name: state.length[cls._check_name(state, name)] for name in names}
        if len(set(lengths.values())) > 1:
            by_len: dict[int, list] = {}
            for name, t in lengths.items():
                by_len.setdefault(t, []).append(name)
            detail = "; ".join(f"num_virtual_tokens={t}: {sorted(v)}" for t, v in sorted(by_len.items()))
            raise ValueError(
                "PromptBank.prepare_inputs: adapters with different num_virtual_tokens cannot share a batch "
                f"({detail}); split the batch by prompt length"
            )
        return lengths[names[0]]

    @staticmethod
    def _check_name(state: _State, name: str) -> str:
        if name not in state.length:
            raise UnknownAdapterError(f"PromptBank: no adapter named {name!r}; have {sorted(state.length)}")
        return name

    def __repr__(self) -> str:
        state = self._state
        parts = ", ".join(f"T={n}: {list(g.names)}" for n, g in sorted(state.groups.items()))
        return f"PromptBank({parts})"

    # ------------------------------------------------------------------ pickling (pickle, torch.save, deepcopy)
    def __getstate__(self) -> dict:
        # What the bank was built from, not its state: the lock cannot be pickled, and a source's Snapshot is only
        # valid in this process for these very tensors (a copy's version counters start again at 0, the global
        # counters differ), so a copy that kept it could take a changed encoder for an unchanged one.
        state = self._state
        return {
            "word_embeddings": self._word_embeddings,
            "embeddings_of": self._embeddings_of,
            "adapters": [
                (name, state.sources[name].source, state.sources[name].inference_mode) for name in state.length
            ],
        }

    def __setstate__(self, saved: dict) -> None:
        # A new lock, and every table computed again from its (copied) source and tracked from now on.
        self.__init__(saved["word_embeddings"])
        self._embeddings_of = saved["embeddings_of"]
        self._add_many(saved["adapters"], replace=False)

    def save(self, folder) -> str:
        """Write every table, its name and digest, and the embeddings' fingerprint to ``folder``, atomically (an
        interrupted save leaves the old bank): see ``ptfast.bank_io.save_bank``."""
        return save_bank(self, folder)

    @classmethod
    def load(cls, folder, word_embeddings, *, verify: bool = True) -> PromptBank:
        """A bank of frozen tables saved by ``save``, checked against ``word_embeddings`` (``BankMismatchError``) and
        against the files' own digests and format (``ptfast.BankFormatError``): see ``ptfast.bank_io.read_bank``."""
        word_embeddings, tables = read_bank(folder, word_embeddings, verify=verify)
        bank = cls(word_embeddings)
        bank._add_many([(name, table, None) for name, table in tables], replace=False)  # one stack per length
        return bank

    # ------------------------------------------------------------------ serving
    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        adapters: str | Sequence[str],
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for the base model's ``forward`` / ``generate``.

        Args:
            input_ids: (B, L) token ids.
            adapters: one adapter name per row, or a single name for the whole batch. All must share one
                ``num_virtual_tokens`` (batch rows of different prompt lengths separately).
            attention_mask: optional (B, L); returned with ``T`` leading ones (PEFT's dtype rules).
            labels: optional (B, L) token labels; returned with ``T`` leading ``-100``.

        Returns ``{"inputs_embeds": (B, T + L, D), "attention_mask": ..., "labels": ...}`` (the last two only
        when given).
        """
        snapshot = self._state  # one consistent snapshot: every lookup below is in it, or in its rebuilt successor
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                "PromptBank.prepare_inputs: input_ids must be a (B, L) tensor, got "
                + (
                    f"shape {tuple(input_ids.shape)}"
                    if isinstance(input_ids, torch.Tensor)
                    else type(input_ids).__name__
                )
            )
        batch = input_ids.shape[0]
        if isinstance(adapters, str):
            names = None
        else:
            names = list(adapters)
            if len(names) != batch:
                raise ValueError(
                    f"PromptBank.prepare_inputs: got {len(names)} adapter names for {batch} rows of input_ids"
                )
            if batch == 0:
                raise ValueError("PromptBank.prepare_inputs: an empty batch has no adapter to take T from")
            for name in names:
                if not isinstance(name, str):
                    raise TypeError(f"PromptBank.prepare_inputs: adapter names must be strings, got {name!r}")
        n = self._prompt_length(snapshot, adapters, names)
        embeddings = self.word_embeddings
        state = self._fresh(snapshot, [adapters] if names is None else set(names), embeddings)  # trained or moved
        if state is not snapshot:  # rebuilt: another thread may have removed or replaced an adapter meanwhile
            n = self._prompt_length(state, adapters, names)
        group = state.groups[n]
        stack = group.stack
        weight = self._weight_of(embeddings)
        if names is None:
            adapter_index = torch.full((batch,), group.index[adapters], dtype=torch.int64, device=stack.device)
        else:
            adapter_index = torch.tensor([group.index[name] for name in names], dtype=torch.int64, device=stack.device)

        if isinstance(embeddings, nn.Module) and not is_plain_embedding(embeddings):
            # e.g. Gemma's scaled embedding: run the module, exactly like PEFT's self.word_embeddings(input_ids)
            embeds = embeddings(input_ids)
            prompts = stack.index_select(0, adapter_index).to(embeds.dtype)
            inputs_embeds = torch.cat((prompts, embeds), dim=1)
        else:
            inputs_embeds = prepend_prompts(input_ids, weight, stack, adapter_index)

        out = {"inputs_embeds": inputs_embeds}
        for key, value, extend in (
            ("attention_mask", attention_mask, extend_attention_mask),
            ("labels", labels, extend_labels),
        ):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(input_ids.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"PromptBank.prepare_inputs: {key} must have input_ids' shape {tuple(input_ids.shape)}, got {shape}"
                )
            out[key] = extend(value, n)
        return out
