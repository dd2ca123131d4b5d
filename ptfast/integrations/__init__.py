"""Integrations of ptfast with other libraries.

``ptfast.integrations.peft``: swap PEFT's P-tuning encoders for ``ptfast.PromptEncoder`` on a ``PeftModel``
(``patch``/``unpatch``), or globally for every model PEFT creates (``patch_peft``/``unpatch_peft``), plus saving and
restoring the full encoder for resuming training. peft is imported lazily, so importing this package does not need it.

``ptfast.integrations.vllm`` (``from ptfast.integrations import vllm``): ``prompt_embeds`` inputs for vLLM built by a
``PromptBank``, for ``LLM.generate`` and for the OpenAI server's completion requests. Import it by name; it is
not star-imported here, and it never imports vllm itself.
"""

from .peft import *  # noqa: F401,F403  (the names are listed in peft.__all__)
from .peft import __all__  # noqa: F401
