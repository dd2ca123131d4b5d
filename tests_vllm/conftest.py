"""The vLLM stage (``.ci/run``'s second stage, in its own virtual environment): ptfast's inputs against a real vLLM.

Not collected by the main ``python -m pytest`` (``testpaths = ["tests"]``). Run: ``python -m pytest tests_vllm``.
Shared fixtures: the tiny model saved to a folder, a PEFT model with three P-tuning adapters, and the bank exported
from it and loaded back the way a serving process does (no PEFT model, embeddings read from the checkpoint).
"""

import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: vLLM's CPU default is far larger

pytest.importorskip("vllm", reason="vllm is not installed (the vLLM stage installs vllm-cpu on Linux x86_64)")
peft = pytest.importorskip("peft")

from ptfast import PromptBank  # noqa: E402
from ptfast.bank_io import embedding_weight_from_checkpoint  # noqa: E402

from .common import ADAPTERS, add_p_tuning_adapters, make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def peft_model(model_folder):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    return add_p_tuning_adapters(base, ADAPTERS)


@pytest.fixture(scope="session")
def served_bank(peft_model, model_folder, tmp_path_factory):
    """The bank as a serving process has it: exported from the PEFT model, loaded next to the checkpoint."""
    folder = PromptBank.from_peft_model(peft_model).save(tmp_path_factory.mktemp("bank"))
    return PromptBank.load(folder, embedding_weight_from_checkpoint(model_folder))
