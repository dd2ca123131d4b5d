"""ptfast: a fast, drop-in P-tuning prompt encoder for PEFT."""

import importlib

from .__version__ import __version__

# The public names, imported on first use (PEP 562): `import ptfast` does not import torch, so `python -m ptfast`
# answers Ctrl-C and says what it is doing from its first second. `from ptfast import X` works as usual.
_EXPORTS = {
    "PromptEncoder": ".encoder",
    "PromptEncoderConfig": ".config",
    "PromptEncoderReparameterizationType": ".config",
    "fused_mlp_head": ".ops.mlp_head",
    "PrefixEncoder": ".prefix_encoder",
    "fused_prefix_head": ".ops.prefix_head",
    "PromptBank": ".serving",
    "UnknownAdapterError": ".errors",
    "BankFormatError": ".errors",
    "BankMismatchError": ".errors",
    "PromptEmbedsError": ".errors",
    "embedding_weight_from_checkpoint": ".bank_io",
    "prepend_prompts": ".ops.prepend",
    "extend_attention_mask": ".ops.prepend",
    "extend_labels": ".ops.prepend",
    "native_available": ".native",
    "patch": ".integrations.peft",
    "unpatch": ".integrations.peft",
    "patch_peft": ".integrations.peft",
    "unpatch_peft": ".integrations.peft",
    "is_peft_patched": ".integrations.peft",
    "save_encoder_state": ".integrations.checkpoints",
    "load_encoder_state": ".integrations.checkpoints",
    "load_for_training": ".integrations.checkpoints",
    "ENCODER_STATE_FILE": ".integrations.checkpoints",
}
_SUBMODULES = {
    "bank_io",
    "bench",
    "config",
    "encoder",
    "errors",
    "integrations",
    "kernels",
    "native",
    "ops",
    "prefix_encoder",
    "serving",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif name in _SUBMODULES:  # `ptfast.serving` without an `import ptfast.serving` first, as before
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'ptfast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
