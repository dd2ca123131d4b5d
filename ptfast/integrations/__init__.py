"""Integrations of ptfast with other libraries.

``ptfast.integrations.peft``: swap PEFT's P-tuning encoders for ``ptfast.PromptEncoder`` on a ``PeftModel``
(``patch``/``unpatch``), or globally for every model PEFT creates (``patch_peft``/``unpatch_peft``), plus saving and
restoring the full encoder for resuming training. peft is imported lazily, so importing this package does not need it.
"""

from .peft import (
    ENCODER_STATE_FILE,
    is_peft_patched,
    load_encoder_state,
    load_for_training,
    patch,
    patch_peft,
    save_encoder_state,
    unpatch,
    unpatch_peft,
)

__all__ = [
    "ENCODER_STATE_FILE",
    "is_peft_patched",
    "load_encoder_state",
    "load_for_training",
    "patch",
    "patch_peft",
    "save_encoder_state",
    "unpatch",
    "unpatch_peft",
]
