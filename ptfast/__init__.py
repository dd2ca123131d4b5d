"""ptfast: a fast, drop-in P-tuning prompt encoder for PEFT."""

from .__version__ import __version__
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .encoder import PromptEncoder
from .ops.mlp_head import fused_mlp_head

__all__ = [
    "__version__",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "fused_mlp_head",
]
