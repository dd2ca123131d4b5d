"""ptfast: a fast, drop-in P-tuning prompt encoder for PEFT."""

from .__version__ import __version__
from .bank_io import embedding_weight_from_checkpoint
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .encoder import PromptEncoder
from .errors import BankFormatError, BankMismatchError, PromptEmbedsError, UnknownAdapterError
from .integrations.checkpoints import ENCODER_STATE_FILE, load_encoder_state, load_for_training, save_encoder_state
from .integrations.peft import is_peft_patched, patch, patch_peft, unpatch, unpatch_peft
from .native import native_available
from .ops.mlp_head import fused_mlp_head
from .ops.prefix_head import fused_prefix_head
from .ops.prepend import extend_attention_mask, extend_labels, prepend_prompts
from .prefix_encoder import PrefixEncoder
from .serving import PromptBank

__all__ = [
    "__version__",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "fused_mlp_head",
    "PrefixEncoder",
    "fused_prefix_head",
    "PromptBank",
    "UnknownAdapterError",
    "BankFormatError",
    "BankMismatchError",
    "PromptEmbedsError",
    "embedding_weight_from_checkpoint",
    "prepend_prompts",
    "extend_attention_mask",
    "extend_labels",
    "native_available",
    "patch",
    "unpatch",
    "patch_peft",
    "unpatch_peft",
    "is_peft_patched",
    "save_encoder_state",
    "load_encoder_state",
    "load_for_training",
    "ENCODER_STATE_FILE",
]
