"""PromptEncoder: a drop-in for PEFT's P-tuning ``PromptEncoder`` with a cached virtual-token table.

Structure, parameter names, init order and outputs are PEFT's. What changes is how the output is computed:

* The MLP head maps each virtual token on its own, so the whole ``(total_virtual_tokens, token_dim)`` table is
  computed once from ``embedding.weight`` and then indexed. With a batch of ``B`` prompts this runs the head on
  ``total_virtual_tokens`` rows instead of ``B * T``. The LSTM head reads the whole sequence, so its table is the
  encoding of the canonical ``arange`` row; any other index pattern runs PEFT's computation as is.
* When no gradient can flow, the table is cached, and ``forward`` becomes a view into it (no MLP, no copy for the
  expanded ``arange`` that ``PeftModel.get_prompt`` passes).

The cache (``ptfast._cache``) returns a table only while everything it was computed from is unchanged:
parameters and buffers (version counters and addresses), the module structure, optimizer steps, modes, hooks,
autocast, matmul precision and backend. ``.to()``/``.half()``... on the encoder go through ``_apply``, which drops
it; on a submodule they move the parameters' memory, which the snapshot sees. Never cached: a
stochastic encoder (LSTM with dropout in training mode) and parameters made under ``inference_mode``. Not
detectable: in-place writes through ``.data`` and ``del`` of submodules; call ``invalidate_cache()`` after those.

Results alias by contract: under no grad, every ``(1, T)`` arange call returns a view of the one cached table
(``expand``: a copy would cost about as much as the whole cached call; docs/design.md, "The table cache"). Clone a
result before editing it in place; a write into a result is seen by the cache (its version counter) and the next
call recomputes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._cache import TableCache
from .config import DEFAULT_ENCODER_NUM_LAYERS, PromptEncoderReparameterizationType, resolve_config
from .ops.mlp_head import fused_mlp_head

_UNKNOWN_TYPE = "Prompt encoder type not recognized. Please use one of MLP (recommended) or LSTM."


class _IndexCheck:
    """Remembers the last validated index tensor, so the per-call check is a few attribute reads.

    It keeps a reference to that tensor: its memory cannot be reused by another tensor while we hold it, so a
    matching address, layout and version counter mean the same values.
    """

    __slots__ = ("tensor", "key", "is_arange", "table")

    def __init__(self, tensor: torch.Tensor, key: tuple, is_arange: bool, table: torch.Tensor | None):
        self.tensor = tensor
        self.key = key
        self.is_arange = is_arange
        self.table = table  # the cached table whose device the indices were checked against


def _index_key(indices: torch.Tensor) -> tuple | None:
    try:
        # No dtype: at one address with one shape and stride, another integer dtype would be another element size.
        return (indices.data_ptr(), indices._version, indices.shape, indices.stride(), indices.device)
    except RuntimeError:  # inference tensors have no version counter
        return None


_PLAIN_HEAD_TYPES = (nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear)
_module_globals = nn.modules.module


def is_plain_sequential(head: nn.Module, kinds: tuple) -> bool:
    """Whether ``head`` is an ``nn.Sequential`` of exactly these layer types, every Linear with a bias, and no
    hooks on it, its layers or every module (nn.Module's process-wide hooks).

    Only then does a fused op compute exactly what running the modules would; anything else (a swapped activation,
    a layer without bias, weight-norm's pre-hooks, a debugging hook) runs the modules themselves. Runs on every
    computed table: plain attribute reads, no helper calls.
    """
    g = _module_globals
    if (
        type(head) is not nn.Sequential
        or g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    ):
        return False
    children = head._modules
    if len(children) != len(kinds):
        return False
    for module, kind in zip((head, *children.values()), (nn.Sequential, *kinds)):
        if (
            type(module) is not kind
            or module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
            or (kind is nn.Linear and module._parameters.get("bias") is None)
        ):
            return False
    return True


def is_inference_encoder(encoder: nn.Module) -> bool:
    """Whether ``encoder`` (PEFT's or ours) is an inference-mode one: the saved table only, no MLP/LSTM head."""
    return "mlp_head" not in encoder._modules and "lstm_head" not in encoder._modules


def adopt_parameters(src: nn.Module, dst: nn.Module, *, share: bool) -> None:
    """Put ``src``'s parameters into ``dst`` under the same names: the same objects if ``share``, else copies.

    Both ways between PEFT's encoder and ours (the names must match).
    """
    theirs, ours = dict(src.named_parameters()), dict(dst.named_parameters())
    if ours.keys() != theirs.keys():
        raise ValueError(
            f"cannot convert {type(src).__name__} to {type(dst).__name__}: parameters {sorted(theirs)} do not "
            f"match {sorted(ours)}"
        )
    for name, param in theirs.items():
        if not share:
            param = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        module_name, _, attr = name.rpartition(".")
        setattr(dst.get_submodule(module_name), attr, param)  # RNNBase.__setattr__ keeps LSTM's weights in sync


class PromptEncoder(nn.Module):
    """The P-tuning prompt encoder: ``embedding`` then an MLP head (or a bidirectional LSTM + MLP).

    Args:
        config: a ``ptfast.PromptEncoderConfig`` or a PEFT ``PromptEncoderConfig`` (or any object or dict with
            the same fields).

    Input: ``indices``, an integer tensor ``(batch, T')`` of virtual-token indices in ``[0, total_virtual_tokens)``.
    Output: ``(batch, T', token_dim)``.

    Example::

        >>> enc = PromptEncoder(PromptEncoderConfig(num_virtual_tokens=20, token_dim=1024, encoder_hidden_size=128))
        >>> enc(torch.arange(20).unsqueeze(0)).shape
        torch.Size([1, 20, 1024])
    """

    def __init__(self, config: Any):
        super().__init__()
        cfg = resolve_config(config)
        self.token_dim = cfg.token_dim
        self.input_size = self.token_dim
        self.output_size = self.token_dim
        self.hidden_size = cfg.encoder_hidden_size
        self.total_virtual_tokens = cfg.num_virtual_tokens * cfg.num_transformer_submodules
        self.encoder_type = cfg.encoder_reparameterization_type
        self.inference_mode = cfg.inference_mode

        # Layers are created in PEFT's order, so the same seed gives the same parameters.
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if not cfg.inference_mode:
            if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
                self.lstm_head = nn.LSTM(
                    input_size=self.input_size,
                    hidden_size=self.hidden_size,
                    num_layers=cfg.encoder_num_layers,
                    dropout=cfg.encoder_dropout,
                    bidirectional=True,
                    batch_first=True,
                )
                self.mlp_head = nn.Sequential(
                    nn.Linear(self.hidden_size * 2, self.hidden_size * 2),
                    nn.ReLU(),
                    nn.Linear(self.hidden_size * 2, self.output_size),
                )
            elif self.encoder_type == PromptEncoderReparameterizationType.MLP:
                if cfg.encoder_num_layers != DEFAULT_ENCODER_NUM_LAYERS:
                    warnings.warn(
                        f"for {PromptEncoderReparameterizationType.MLP.value}, the argument `encoder_num_layers` is "
                        f"ignored. Exactly {DEFAULT_ENCODER_NUM_LAYERS} MLP layers are used."
                    )
                self.mlp_head = nn.Sequential(
                    nn.Linear(self.input_size, self.hidden_size),
                    nn.ReLU(),
                    nn.Linear(self.hidden_size, self.hidden_size),
                    nn.ReLU(),
                    nn.Linear(self.hidden_size, self.output_size),
                )
            else:
                raise ValueError(_UNKNOWN_TYPE)
        self._cache = TableCache()
        self._index_check: _IndexCheck | None = None

    @classmethod
    def from_peft(cls, peft_encoder: nn.Module, *, share_parameters: bool = False) -> PromptEncoder:
        """A ptfast encoder with ``peft_encoder``'s config, weights, dtype, device and ``requires_grad`` flags.

        Args:
            peft_encoder: a PEFT ``PromptEncoder`` (or any module with its attributes and parameter names).
            share_parameters: reuse PEFT's ``nn.Parameter`` objects instead of copying them, so optimizers, hooks
                and DDP buckets that already hold them keep working (``ptfast.patch`` uses this).
        """
        config = {
            "num_virtual_tokens": peft_encoder.total_virtual_tokens,
            "token_dim": peft_encoder.token_dim,
            "num_transformer_submodules": 1,
            "encoder_reparameterization_type": peft_encoder.encoder_type,
            "encoder_hidden_size": peft_encoder.hidden_size,
            "inference_mode": is_inference_encoder(peft_encoder),
        }
        lstm = getattr(peft_encoder, "lstm_head", None)
        if lstm is not None:
            config["encoder_num_layers"] = lstm.num_layers
            config["encoder_dropout"] = lstm.dropout
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # PEFT already warned when it built its encoder
            encoder = cls(config)
        adopt_parameters(peft_encoder, encoder, share=share_parameters)
        encoder.train(peft_encoder.training)
        return encoder

    # ------------------------------------------------------------------ the table
    def _compute_table(self) -> torch.Tensor:
        """The reparameterized ``(total_virtual_tokens, token_dim)`` table, computed now."""
        # _modules / _parameters lookups: nn.Module.__getattr__ and Sequential's __getitem__ cost more than these
        # dict reads, and a cache miss does a dozen of them
        modules = self._modules
        weight = modules["embedding"]._parameters["weight"]
        if self.inference_mode:  # the saved table; a copy, so writes into results never reach the parameter
            return weight.clone()
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            return self.mlp_head(self.lstm_head(weight.unsqueeze(0))[0])[0]
        if self.encoder_type == PromptEncoderReparameterizationType.MLP:
            head = modules["mlp_head"]
            if not is_plain_sequential(head, _PLAIN_HEAD_TYPES):
                return head(weight)
            layers = head._modules
            p1, p2, p3 = layers["0"]._parameters, layers["2"]._parameters, layers["4"]._parameters
            return fused_mlp_head(weight, p1["weight"], p1["bias"], p2["weight"], p2["bias"], p3["weight"], p3["bias"])
        raise ValueError(_UNKNOWN_TYPE)

    def _is_stochastic(self) -> bool:
        lstm = self._modules.get("lstm_head")
        return lstm is not None and lstm.training and lstm.dropout > 0 and lstm.num_layers > 1

    def table(self) -> torch.Tensor:
        """The reparameterized virtual-token table, ``(total_virtual_tokens, token_dim)``.

        Cached when no gradient can flow (then a view of the cache: see ``forward``); otherwise computed now,
        with autograd.
        """
        grad_enabled = torch.is_grad_enabled()
        table, reading = self._cache.lookup(grad_enabled)
        return table if table is not None else self._table_after_miss(grad_enabled, reading)

    def _table_after_miss(self, grad_enabled: bool, reading: tuple | None) -> torch.Tensor:
        table = self._cache.fill(
            self, self._compute_table, grad_enabled=grad_enabled, cacheable=self._cacheable, reading=reading
        )
        return self._compute_table() if table is None else table

    def _cacheable(self) -> bool:
        return not self._is_stochastic()

    def invalidate_cache(self) -> None:
        """Drop the cached table. Needed only after changes autograd cannot see, such as writes through ``.data``."""
        self._cache.clear()

    # ------------------------------------------------------------------ pickling (pickle, torch.save, deepcopy)
    def __getstate__(self):
        # The cache's snapshot records version counters and process-wide counters of *these* tensors and this
        # process; a copy has fresh ones, which could match by chance and serve a stale table. Start empty instead.
        state = super().__getstate__()
        state.pop("_cache", None)
        state.pop("_index_check", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache = TableCache()
        self._index_check = None

    def _apply(self, fn, *args, **kwargs):
        self.invalidate_cache()  # dtype/device moves replace parameter storage
        self._index_check = None
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ PEFT's checkpoint hook
    def _load_adapter_state_dict(self, state_dict: dict) -> None:
        """PEFT (>= 0.21) calls this on the encoder when it loads an adapter checkpoint.

        PEFT saves only the reparameterized table, as ``prompt_embeddings``; like PEFT's ``BasePromptEncoder`` we
        load it into ``embedding``. The load bumps the weight's version counter, so the cached table is refreshed.
        """
        self.embedding.load_state_dict({"weight": state_dict["prompt_embeddings"]}, strict=True)

    # ------------------------------------------------------------------ forward
    def _check_indices(self, indices: torch.Tensor, table: torch.Tensor | None) -> bool:
        """Validate ``indices`` (against ``table``'s device too, when given); return whether every row is
        ``arange(total_virtual_tokens)``. ``forward`` skips this for the indices it checked last against the same
        table; without a table (a miss) those need no new check either, the table's device is checked later."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        key = _index_key(indices)
        check = self._index_check
        if table is None and key is not None and check is not None and check.key == key:
            return check.is_arange
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an integer (int64 or int32) tensor, got dtype {indices.dtype}")
        if indices.dim() != 2:
            raise ValueError(
                f"indices must have shape (batch, num_tokens), got {indices.dim()} dims: {tuple(indices.shape)}"
            )
        weight = self.embedding.weight
        if indices.device != weight.device:
            raise ValueError(f"indices are on {indices.device} but the encoder's weights are on {weight.device}")
        n = self.total_virtual_tokens
        is_arange = False
        if indices.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(indices))
            if lo < 0 or hi >= n:
                raise IndexError(
                    f"virtual-token index out of range: indices span [{lo}, {hi}] but the encoder has {n} "
                    f"virtual tokens (valid: 0..{n - 1})"
                )
            if indices.shape[1] == n:
                arange = torch.arange(n, device=indices.device, dtype=indices.dtype)
                is_arange = bool(torch.equal(indices, arange.expand_as(indices)))
        if table is not None and table.device != indices.device:  # load_state_dict(assign=True) can move weights
            raise ValueError(f"indices are on {indices.device} but the encoder's table is on {table.device}")
        if key is not None:
            self._index_check = _IndexCheck(indices, key, is_arange, table)
        return is_arange

    def _lstm_forward(self, indices: torch.Tensor) -> torch.Tensor:
        """PEFT's LSTM computation as is, for index rows that are not the canonical arange."""
        return self.mlp_head(self.lstm_head(self.embedding(indices))[0])

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced: no data-dependent checks or Python-side cache, so there is no graph break.
            if "lstm_head" in self._modules:
                return self._lstm_forward(indices)
            return self._gather(self._compute_table(), indices)
        grad_enabled = torch.is_grad_enabled()
        table, reading = self._cache.lookup(grad_enabled)  # no table unless cached and current
        check = self._index_check
        if table is not None and check is not None and check.table is table and check.key == _index_key(indices):
            is_arange = check.is_arange  # the same indices as last time, checked against this very table
        else:
            is_arange = self._check_indices(indices, table)
        if not is_arange and "lstm_head" in self._modules:  # the LSTM reads whole rows: only arange is a table row
            return self._lstm_forward(indices)
        if table is None:
            table = self._table_after_miss(grad_enabled, reading)
            if table.device != indices.device:
                raise ValueError(f"indices are on {indices.device} but the encoder's table is on {table.device}")
        if is_arange:  # PeftModel.get_prompt's call: a view, no gather
            batch = indices.shape[0]
            # at B=1 not expand, whose backward is a sum (one more kernel per train step); [None] is an unsqueeze
            # (a view both ways), and the cheapest one to call
            return table[None] if batch == 1 else table.expand(batch, -1, -1)
        return self._gather(table, indices)

    @staticmethod
    def _gather(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, table)

    def extra_repr(self) -> str:
        return f"encoder_type={getattr(self.encoder_type, 'value', self.encoder_type)}"
