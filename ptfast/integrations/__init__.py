"""Integrations of ptfast with other libraries. Each imports its library lazily, inside the functions.

* ``ptfast.integrations.peft``: swap PEFT's P-tuning encoders for ``ptfast.PromptEncoder`` on a ``PeftModel``
  (``patch``/``unpatch``), or globally for every model PEFT creates (``patch_peft``/``unpatch_peft``).
* ``ptfast.integrations.checkpoints``: save and restore the full encoder, for resuming training.
* ``ptfast.integrations.generation``: KV-cached ``generate`` for patched P-tuned models.
* ``ptfast.integrations.vllm`` (``from ptfast.integrations import vllm``): ``prompt_embeds`` inputs for vLLM built
  by a ``PromptBank``, for ``LLM.generate`` and the OpenAI server's completion requests. Import it by name: it is
  not star-imported here, and it never imports vllm itself.
"""

from .checkpoints import *  # noqa: F401,F403  (the names are listed in checkpoints.__all__)
from .peft import *  # noqa: F401,F403  (the names are listed in peft.__all__)
