"""PromptEncoderConfig: the fields of PEFT's ``PromptEncoderConfig`` that the encoder reads.

``ptfast.PromptEncoder`` accepts this dataclass or PEFT's own config (anything with these attributes), so ptfast
works without peft installed.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Any


class PromptEncoderReparameterizationType(str, enum.Enum):
    """Same values as PEFT's enum; a ``str`` subclass, so ``"MLP"`` and PEFT's member compare equal to ours."""

    MLP = "MLP"
    LSTM = "LSTM"


# PEFT's default for `encoder_num_layers`; the MLP type warns when it is changed, as PEFT does.
DEFAULT_ENCODER_NUM_LAYERS = 2


@dataclass
class PromptEncoderConfig:
    """Configuration of a P-tuning prompt encoder, with PEFT's field names and defaults.

    Args:
        num_virtual_tokens: virtual tokens per transformer submodule.
        token_dim: hidden size of the base model (the width of each virtual token).
        num_transformer_submodules: 1 for decoder-only/encoder-only models, 2 for seq2seq. ``None`` means 1.
        encoder_reparameterization_type: ``"MLP"`` (recommended) or ``"LSTM"``.
        encoder_hidden_size: hidden width of the reparameterization head. ``None`` means ``token_dim``, as
            PEFT's ``PeftModel`` fills it in.
        encoder_num_layers: LSTM layers (ignored, with a warning, for the MLP type).
        encoder_dropout: dropout between LSTM layers.
        inference_mode: build only the embedding (the saved, already reparameterized table).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    encoder_reparameterization_type: str | PromptEncoderReparameterizationType = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = DEFAULT_ENCODER_NUM_LAYERS
    encoder_dropout: float = 0.0
    inference_mode: bool = False


_FIELDS = tuple(PromptEncoderConfig.__dataclass_fields__)


def resolve_config(config: Any) -> PromptEncoderConfig:
    """Copy the encoder's fields out of ``config`` (ours or PEFT's), fill the defaults PEFT fills, and validate."""
    if isinstance(config, dict):
        unknown = sorted(set(config) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown prompt-encoder config field(s) {unknown}; the fields are {list(_FIELDS)}")
        values = {name: config.get(name, getattr(PromptEncoderConfig, name)) for name in _FIELDS}
    else:
        values = {name: getattr(config, name, getattr(PromptEncoderConfig, name)) for name in _FIELDS}
    cfg = PromptEncoderConfig(**values)

    if cfg.token_dim is None:
        raise ValueError(
            "config.token_dim is None: set it to the base model's hidden size (PeftModel fills it in from the model)."
        )
    if cfg.num_virtual_tokens is None:
        raise ValueError("config.num_virtual_tokens is None: set the number of virtual tokens.")
    if cfg.num_transformer_submodules is None:
        cfg.num_transformer_submodules = 1
    if cfg.encoder_hidden_size is None:
        cfg.encoder_hidden_size = cfg.token_dim
    for name in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "encoder_hidden_size"):
        setattr(cfg, name, _positive_int(name, getattr(cfg, name)))
    if not isinstance(cfg.inference_mode, bool):
        raise ValueError(f"config.inference_mode must be a bool, got {cfg.inference_mode!r}")
    try:
        dropout = float(cfg.encoder_dropout)
    except (TypeError, ValueError):
        dropout = float("nan")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config.encoder_dropout must be a number in [0, 1), got {cfg.encoder_dropout!r}")
    return cfg


def _positive_int(name: str, value: Any) -> int:
    """Ints and int-likes (numpy integers); never bools or floats such as 4.0."""
    if not isinstance(value, bool):
        try:
            value = operator.index(value)
        except TypeError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.{name} must be a positive int, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ PEFT adapter types
# Read from a PEFT adapter config's ``peft_type`` without importing peft (serving, the integrations and the
# checkpoint helpers all ask).
P_TUNING = "P_TUNING"
PREFIX_TUNING = "PREFIX_TUNING"
#: The prompt-learning methods ``ptfast.patch`` takes: P-tuning and prefix tuning get ptfast's encoders; every one
#: gets a correct ``generate`` where the installed PEFT needs it (``ptfast.integrations.generation``).
PATCHABLE_TYPES = (P_TUNING, "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", PREFIX_TUNING)


def peft_type_name(config: Any) -> str:
    """The ``peft_type`` of a PEFT adapter config as a plain string (``"P_TUNING"``...)."""
    peft_type = getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type))


def is_p_tuning(config: Any) -> bool:
    """Whether a PEFT adapter config is P-tuning (``PromptEncoderConfig``): the one place that decides it."""
    return peft_type_name(config) == P_TUNING


def is_prompt_learning(config: Any) -> bool:
    """Whether a PEFT adapter config is one of the prompt-learning methods ``ptfast.patch`` takes (P-tuning, prompt
    tuning, multitask prompt tuning, prefix tuning / P-tuning v2)."""
    return bool(getattr(config, "is_prompt_learning", False)) and peft_type_name(config) in PATCHABLE_TYPES
