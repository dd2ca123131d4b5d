"""PromptEncoder: a drop-in for PEFT's P-tuning ``PromptEncoder`` with a cached virtual-token table.

Structure, parameter names, init order and outputs are PEFT's. What changes is how the output is computed:

* PEFT's MLP head maps each virtual token on its own, so the whole ``(total_virtual_tokens, token_dim)`` table is
  computed once from ``embedding.weight`` and then indexed. With a batch of ``B`` prompts this runs the head on
  ``total_virtual_tokens`` rows instead of ``B * T``. The LSTM head reads the whole sequence, and an edited head
  may read across positions, so their table is the encoding of the canonical ``arange`` row; any other index
  pattern runs PEFT's computation as is (``_rows_alone``).
* When no gradient can flow, the table is cached, and ``forward`` becomes a view into it (no MLP, no copy for the
  expanded ``arange`` that ``PeftModel.get_prompt`` passes).

The cache (``ptfast._cache``) returns a table only while everything it was computed from is unchanged: parameters
and buffers (version counters, addresses and layouts), the module structure, optimizer steps, modes, hooks,
autocast, matmul precision and backend. ``.to()``/``.half()``... on the encoder go through ``_apply``, which drops
it; on a submodule they move the parameters' memory, which the snapshot sees. Never cached, and computed by PEFT's
modules on the indices themselves: an encoder with a module that computes differently in training mode, in that
mode (an LSTM with dropout, a dropout or BatchNorm swapped into the head). Never cached either: parameters made
under ``inference_mode``. Not detectable: in-place writes through ``.data`` and ``del`` of submodules (README);
call ``invalidate_cache()`` after those. After an optimizer step the table is refreshed by the computation prepared
at its last full computation (``_bind_table``).

Results alias by contract: under no grad, every ``(1, T)`` arange call returns a view of the one cached table
(``expand``: a copy would cost about as much as the whole cached call; docs/design.md, "The table cache"). Clone a
result before editing it in place; a write into a result is seen by the cache (its version counter) and the next
call recomputes. The cache and the indexed forward are ``ptfast._table_encoder.TableEncoder``'s, shared with
``PrefixEncoder``; this module defines the table.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._table_encoder import TableEncoder, adopt_parameters, is_plain_sequential
from .config import DEFAULT_ENCODER_NUM_LAYERS, PromptEncoderReparameterizationType, resolve_config
from .ops.mlp_head import bind_mlp_head, bind_mlp_head_train, fused_mlp_head

_UNKNOWN_TYPE = "Prompt encoder type not recognized. Please use one of MLP (recommended) or LSTM."


_PLAIN_HEAD_TYPES = (nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear)


def is_inference_encoder(encoder: nn.Module) -> bool:
    """Whether ``encoder`` (PEFT's or ours) is an inference-mode one: the saved table only, no MLP/LSTM head."""
    return "mlp_head" not in encoder._modules and "lstm_head" not in encoder._modules


class PromptEncoder(TableEncoder):
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
        weight = self._modules["embedding"]._parameters["weight"]
        if self.inference_mode:  # the saved table; a copy, so writes into results never reach the parameter
            return weight.clone()
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            return self.mlp_head(self.lstm_head(weight.unsqueeze(0))[0])[0]
        if self.encoder_type == PromptEncoderReparameterizationType.MLP:
            inputs = self._fused_head_inputs()
            if inputs is None:  # an edited head runs on PEFT's (1, T, D) rows: a BatchNorm1d reads dim 1 as there
                return self.mlp_head(weight.unsqueeze(0))[0]
            return fused_mlp_head(*inputs)
        raise ValueError(_UNKNOWN_TYPE)

    def _fused_head_inputs(self) -> tuple | None:
        """``(embedding weight, w1, b1, w2, b2, w3, b3)`` when the MLP head is PEFT's plain one, which
        ``fused_mlp_head`` computes exactly; None for anything else (the modules then run themselves)."""
        # _modules / _parameters lookups: nn.Module.__getattr__ and Sequential's __getitem__ cost more than these
        # dict reads, and a cache miss does a dozen of them
        modules = self._modules
        head = modules["mlp_head"]
        if not is_plain_sequential(head, _PLAIN_HEAD_TYPES):
            return None
        layers = head._modules
        p1, p2, p3 = layers["0"]._parameters, layers["2"]._parameters, layers["4"]._parameters
        weight = modules["embedding"]._parameters["weight"]
        return weight, p1["weight"], p1["bias"], p2["weight"], p2["bias"], p3["weight"], p3["bias"]

    def _bind_table(self):
        weight = self._modules["embedding"]._parameters["weight"]
        if self.inference_mode:
            return weight.clone
        if self.encoder_type == PromptEncoderReparameterizationType.MLP:
            inputs = self._fused_head_inputs()
            return None if inputs is None else bind_mlp_head(*inputs)
        return None  # the LSTM: its modules run on every computed table

    def _bind_train_step(self):
        if self.inference_mode or self.encoder_type != PromptEncoderReparameterizationType.MLP:
            return None
        inputs = self._fused_head_inputs()
        return None if inputs is None else bind_mlp_head_train(*inputs)

    @property
    def _num_rows(self) -> int:
        return self.total_virtual_tokens

    # ------------------------------------------------------------------ PEFT's checkpoint hook
    def _load_adapter_state_dict(self, state_dict: dict) -> None:
        """PEFT (>= 0.21) calls this on the encoder when it loads an adapter checkpoint.

        PEFT saves only the reparameterized table, as ``prompt_embeddings``; like PEFT's ``BasePromptEncoder`` we
        load it into ``embedding``. The load bumps the weight's version counter, so the cached table is refreshed.
        """
        self.embedding.load_state_dict({"weight": state_dict["prompt_embeddings"]}, strict=True)

    # ------------------------------------------------------------------ forward (TableEncoder's, and these)
    def _modules_forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.inference_mode:
            return embeds
        if "lstm_head" in self._modules:
            return self.mlp_head(self.lstm_head(embeds)[0])
        return self.mlp_head(embeds)

    def _rows_alone(self) -> bool:
        """Whether each table row comes from its own token alone, so that any indices may gather table rows: the
        saved table, or PEFT's plain MLP head. An LSTM reads whole sequences, and an edited head may read across
        positions (a BatchNorm1d over the T rows): only the arange row is their table."""
        if self.inference_mode:
            return True
        return "lstm_head" not in self._modules and self._fused_head_inputs() is not None

    def _bypass(self, indices, is_arange, cached, grad_enabled):
        if not is_arange and not self._rows_alone():
            return self._modules_forward(indices)
        return None

    def _traced_forward(self, indices: torch.Tensor) -> torch.Tensor:
        if not self._rows_alone():
            return self._modules_forward(indices)
        return F.embedding(indices, self._compute_table())

    def extra_repr(self) -> str:
        return f"encoder_type={getattr(self.encoder_type, 'value', self.encoder_type)}"
