"""PrefixEncoder: a drop-in for PEFT's prefix-tuning ``PrefixEncoder`` with a cached key/value table.

Structure, parameter names (``embedding.weight``, ``transform.{0,2}.{weight,bias}``), init order, ``state_dict``
and outputs are PEFT's. ``forward(prefix)`` maps ``(batch, T')`` indices to ``(batch, T', num_layers * 2 *
token_dim)``.

* With ``prefix_projection`` (a trainable encoder): the head ``Linear-Tanh-Linear`` maps each virtual token on its
  own, so the whole ``(num_virtual_tokens, num_layers * 2 * token_dim)`` table is computed once from
  ``embedding.weight`` (``ptfast.ops.prefix_head.fused_prefix_head``, eager for now) and then indexed: a batch of
  ``B`` prompts runs the head on ``num_virtual_tokens`` rows instead of ``B * T``.
* Without projection (or an inference-mode encoder, which holds only the saved table) the table *is*
  ``embedding.weight``. When a gradient can flow, ``forward`` is PEFT's ``F.embedding`` (a copy, as in PEFT).
* When no gradient can flow, the table is cached, with the same rules as ``ptfast.PromptEncoder``
  (``ptfast._cache``): returned only while parameters (version counters and memory), structure, optimizer steps,
  modes, hooks, autocast, matmul precision and backend are unchanged; ``.to()``/``.half()``... drop it. The cached table
  is never the parameter itself (without projection it is a copy), so a write into a result cannot reach the
  weights.

Results alias by contract, as for ``PromptEncoder``: under no grad, every ``(B, T)`` arange call (what
``PeftModel.get_prompt`` passes) returns a view of the one cached table. Clone a result before editing it in place;
a write into a result is seen by the cache (its version counter) and the next call recomputes. Not detectable:
in-place writes through ``.data`` and ``del`` of submodules; call ``invalidate_cache()`` after those. The cache and
the indexed forward are ``ptfast._table_encoder.TableEncoder``'s, shared with ``PromptEncoder``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._table_encoder import TableEncoder, adopt_parameters, is_plain_sequential
from .config import _positive_int
from .ops.prefix_head import fused_prefix_head

__all__ = ["PrefixEncoder"]


@dataclass
class _PrefixConfig:
    """The fields of PEFT's ``PrefixTuningConfig`` that its ``PrefixEncoder`` reads, with PEFT's defaults."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    inference_mode: bool = False
    init_weights: str | None = None


_FIELDS = tuple(_PrefixConfig.__dataclass_fields__)


def resolve_prefix_config(config: Any) -> _PrefixConfig:
    """Copy the prefix encoder's fields out of ``config`` (PEFT's ``PrefixTuningConfig``, any object with those
    attributes, or a dict), fill what ``PeftModel`` fills (``encoder_hidden_size`` = ``token_dim``), and validate."""
    if isinstance(config, dict):
        unknown = sorted(set(config) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown prefix-encoder config field(s) {unknown}; the fields are {list(_FIELDS)}")
        values = {name: config.get(name, getattr(_PrefixConfig, name)) for name in _FIELDS}
    else:
        values = {name: getattr(config, name, getattr(_PrefixConfig, name)) for name in _FIELDS}
    cfg = _PrefixConfig(**values)
    for name, hint in (
        ("num_virtual_tokens", "set the number of virtual tokens"),
        ("token_dim", "set it to the base model's hidden size (PeftModel fills it in)"),
        ("num_layers", "set it to the base model's layer count (PeftModel fills it in)"),
    ):
        if getattr(cfg, name) is None:
            raise ValueError(f"config.{name} is None: {hint}.")
    if cfg.encoder_hidden_size is None:
        cfg.encoder_hidden_size = cfg.token_dim
    for name in ("num_virtual_tokens", "token_dim", "num_layers", "encoder_hidden_size"):
        setattr(cfg, name, _positive_int(name, getattr(cfg, name)))
    for name in ("prefix_projection", "inference_mode"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"config.{name} must be a bool, got {getattr(cfg, name)!r}")
    if cfg.init_weights not in (None, "zero"):
        raise ValueError(f"config.init_weights must be None or 'zero', got {cfg.init_weights!r}")
    return cfg


_PLAIN_HEAD_TYPES = (nn.Linear, nn.Tanh, nn.Linear)


class PrefixEncoder(TableEncoder):
    """The prefix-tuning encoder: ``embedding``, then (with ``prefix_projection``) ``transform`` = Linear-Tanh-Linear.

    Args:
        config: a PEFT ``PrefixTuningConfig`` or any object or dict with its fields ``num_virtual_tokens``,
            ``token_dim``, ``num_layers``, ``encoder_hidden_size`` (``None``: ``token_dim``), ``prefix_projection``,
            ``inference_mode`` and ``init_weights`` (``None`` or ``"zero"``).

    Input: ``prefix``, an integer tensor ``(batch, T')`` of virtual-token indices in ``[0, num_virtual_tokens)``.
    Output: ``(batch, T', num_layers * 2 * token_dim)``.

    Attributes besides PEFT's (``embedding``, ``transform``, ``prefix_projection``): ``num_virtual_tokens``,
    ``output_size`` (``num_layers * 2 * token_dim``), ``token_dim`` and ``num_layers`` (``None`` after
    ``from_peft`` of an encoder without a projection head), ``hidden_size`` (``None`` without a head).

    Example::

        >>> enc = PrefixEncoder(dict(num_virtual_tokens=20, token_dim=64, num_layers=2, prefix_projection=True))
        >>> enc(torch.arange(20).unsqueeze(0)).shape
        torch.Size([1, 20, 256])
    """

    def __init__(self, config: Any):
        super().__init__()
        cfg = resolve_prefix_config(config)
        self.prefix_projection = cfg.prefix_projection  # PEFT's attribute: the config's flag, even in inference mode
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.token_dim: int | None = cfg.token_dim
        self.num_layers: int | None = cfg.num_layers
        self.output_size = cfg.num_layers * 2 * cfg.token_dim
        self.hidden_size: int | None = None
        # Layers are created in PEFT's order, so the same seed gives the same parameters.
        if cfg.prefix_projection and not cfg.inference_mode:
            self.hidden_size = cfg.encoder_hidden_size
            self.embedding = nn.Embedding(cfg.num_virtual_tokens, cfg.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(cfg.token_dim, cfg.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(cfg.encoder_hidden_size, self.output_size),
            )
            if cfg.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight.data)
                nn.init.zeros_(self.transform[-1].bias.data)
        else:
            self.embedding = nn.Embedding(cfg.num_virtual_tokens, self.output_size)
            if cfg.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight.data)

    @classmethod
    def from_peft(cls, peft_encoder: nn.Module, *, share_parameters: bool = False) -> PrefixEncoder:
        """A ptfast encoder with ``peft_encoder``'s structure, weights, dtype, device and ``requires_grad`` flags.

        Args:
            peft_encoder: a PEFT ``PrefixEncoder`` (or any module with its attributes and parameter names).
            share_parameters: reuse PEFT's ``nn.Parameter`` objects instead of copying them, so optimizers, hooks
                and DDP buckets that already hold them keep working (``ptfast.patch`` uses this).

        PEFT's encoder does not record ``token_dim`` and ``num_layers``; with a projection head they follow from its
        shapes, without one only their product is known (``output_size``), and both attributes are ``None``.
        """
        embedding = peft_encoder.embedding
        head = peft_encoder._modules.get("transform")
        num_virtual_tokens, width = embedding.weight.shape
        if head is not None:
            first, last = head[0], head[-1]
            out = last.weight.shape[0]
            if out % (2 * width):
                raise ValueError(
                    f"cannot convert {type(peft_encoder).__name__}: its transform's output width {out} is not a "
                    f"multiple of 2 * token_dim = {2 * width}"
                )
            config = dict(
                num_virtual_tokens=num_virtual_tokens,
                token_dim=width,
                num_layers=out // (2 * width),
                encoder_hidden_size=first.weight.shape[0],
                prefix_projection=True,
            )
        else:
            if width % 2:
                raise ValueError(
                    f"cannot convert {type(peft_encoder).__name__}: its embedding width {width} is not "
                    "num_layers * 2 * token_dim (odd)"
                )
            config = dict(
                num_virtual_tokens=num_virtual_tokens,
                token_dim=width // 2,
                num_layers=1,
                prefix_projection=bool(getattr(peft_encoder, "prefix_projection", False)),
                inference_mode=True,
            )
        with torch.device("meta"):  # no init work: every parameter is replaced below
            encoder = cls(config)
        if head is None:
            encoder.token_dim = encoder.num_layers = None  # not recoverable from the table's width
        adopt_parameters(peft_encoder, encoder, share=share_parameters)
        encoder.train(peft_encoder.training)
        return encoder

    # ------------------------------------------------------------------ the table
    def _compute_table(self) -> torch.Tensor:
        """The ``(num_virtual_tokens, num_layers * 2 * token_dim)`` table, computed now."""
        modules = self._modules
        weight = modules["embedding"]._parameters["weight"]
        head = modules.get("transform")
        if head is None:  # the table is the weight; a copy, so writes into results never reach the parameter
            return weight.clone()
        inputs = self._fused_head_inputs()
        # an edited head runs on PEFT's (1, T, D) rows: a module that reads dim 1 (a BatchNorm1d) sees what it does
        return head(weight.unsqueeze(0))[0] if inputs is None else fused_prefix_head(*inputs)

    def _fused_head_inputs(self) -> tuple | None:
        """``(embedding weight, w1, b1, w2, b2)`` when the projection is PEFT's plain ``Linear-Tanh-Linear``,
        which ``fused_prefix_head`` computes exactly; None for anything else (the modules then run themselves)."""
        modules = self._modules
        if not is_plain_sequential(modules["transform"], _PLAIN_HEAD_TYPES):
            return None
        layers = modules["transform"]._modules
        p1, p2 = layers["0"]._parameters, layers["2"]._parameters
        return modules["embedding"]._parameters["weight"], p1["weight"], p1["bias"], p2["weight"], p2["bias"]

    def _bind_table(self):
        return self._same_computation()

    def _bind_train_step(self):
        # with autograd: the cache's train record checks that the modules and tensors are still the ones bound here
        return self._same_computation()

    def _same_computation(self):
        # the same computation on the same tensors, without the walk that chose it (fused_prefix_head still
        # validates its inputs on each call)
        if "transform" not in self._modules:
            return self._modules["embedding"]._parameters["weight"].clone
        inputs = self._fused_head_inputs()
        return None if inputs is None else functools.partial(fused_prefix_head, *inputs)

    @property
    def _num_rows(self) -> int:
        return self.num_virtual_tokens

    # ------------------------------------------------------------------ PEFT's checkpoint hooks
    def _load_adapter_state_dict(self, state_dict: dict) -> None:
        """PEFT (>= 0.21) calls this on the encoder when it loads an adapter checkpoint.

        PEFT saves only the table, as ``prompt_embeddings``, which is ``embedding.weight`` for an encoder without a
        projection head (loaded here, as PEFT's ``BasePromptEncoder`` does; the version bump refreshes the cache).
        A trainable projection encoder cannot be restored from the table: that raises, as PEFT's load does.
        """
        table = state_dict["prompt_embeddings"]
        if "transform" in self._modules:
            raise RuntimeError(
                f"cannot load PEFT's prefix-tuning checkpoint into a trainable encoder with a projection head: the "
                f"checkpoint holds only the projected table {tuple(table.shape)} (prompt_embeddings), not the "
                f"embedding {tuple(self.embedding.weight.shape)} and the head. Load it with inference_mode=True "
                "(PeftModel.from_pretrained's default), or save and restore the full encoder with "
                "ptfast.save_encoder_state / ptfast.load_for_training."
            )
        self.embedding.load_state_dict({"weight": table}, strict=True)

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Load a saved table (PEFT's ``prompt_embeddings``) into ``embedding.weight``, as PEFT's method does.

        Only an encoder without a projection head holds the table itself (PEFT refuses whenever
        ``prefix_projection`` is set, even for an inference-mode encoder that holds only the table).
        """
        if "transform" in self._modules:
            raise ValueError("Cannot load flattened prompt embeddings when `prefix_projection=True`.")
        if prompt_embeddings.shape != self.embedding.weight.shape:
            raise ValueError(
                "Invalid `prompt_embeddings` shape. Expected "
                f"{tuple(self.embedding.weight.shape)}, got {tuple(prompt_embeddings.shape)}."
            )
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings.to(self.embedding.weight.device))

    # ------------------------------------------------------------------ forward (TableEncoder's, and these)
    _INDICES_NAME = "prefix"

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        """``(batch, T')`` virtual-token indices to ``(batch, T', num_layers * 2 * token_dim)``; PEFT's argument
        name, so ``encoder(prefix=...)`` works as with PEFT's encoder."""
        return super().forward(prefix)

    def _modules_forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(prefix)
        return self.transform(embeds) if "transform" in self._modules else embeds

    def _rows_alone(self) -> bool:
        """Whether each table row comes from its own token alone, so that any indices may gather table rows: the
        embedding alone, or PEFT's plain projection. An edited head may read across positions (a BatchNorm1d)."""
        return "transform" not in self._modules or self._fused_head_inputs() is not None

    def _bypass(self, prefix, is_arange, cached, grad_enabled):
        modules = self._modules
        if not is_arange and not self._rows_alone():
            return self._modules_forward(prefix)
        if not cached and "transform" not in modules and grad_enabled:
            weight = modules["embedding"]._parameters["weight"]
            if weight.requires_grad:
                return F.embedding(prefix, weight)  # PEFT's op: a copy, with PEFT's gradient
        return None

    def _traced_forward(self, prefix: torch.Tensor) -> torch.Tensor:
        modules = self._modules
        if "transform" not in modules:
            return F.embedding(prefix, modules["embedding"]._parameters["weight"])
        if not self._rows_alone():
            return self._modules_forward(prefix)
        return F.embedding(prefix, self._compute_table())

    def extra_repr(self) -> str:
        return f"prefix_projection={self.prefix_projection}"
