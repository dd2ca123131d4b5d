"""Integrations of ptfast with other libraries.

``ptfast.integrations.peft``: swap PEFT's P-tuning encoders for ``ptfast.PromptEncoder`` on a ``PeftModel``
(``patch``/``unpatch``), or globally for every model PEFT creates (``patch_peft``/``unpatch_peft``), plus saving and
restoring the full encoder for resuming training. peft is imported lazily, so importing this package does not need it.
"""

from .peft import *  # noqa: F401,F403  (the names are listed in peft.__all__)
from .peft import __all__  # noqa: F401
