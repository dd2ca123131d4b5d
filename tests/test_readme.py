"""Every ```python block of README.md runs as written.

Each block runs on its own, in a fresh namespace, so a block that uses a name it does not define or import fails
here as it would for a user who pastes it. The blocks of one section share a working folder, in README order, as
they would share a disk: the vLLM section's first block saves the model folder and the bank that its later blocks
read. Nothing is downloaded (the Hugging Face libraries are set offline); the models are tiny and random.

vLLM is stubbed: a block that does ``import vllm`` gets a fake ``vllm`` module (``LLM`` and ``SamplingParams``, see
``FakeLLM``) that checks what ptfast hands it and returns made-up token ids. What vLLM itself does with those
inputs is tested against a real engine in ``tests_vllm/``.
"""

import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text):
    """``[(section heading, first line number, code)]`` for every ```python block, in order.

    Headings are read outside fenced blocks only (a ``# comment`` in a bash block is not one).
    """
    blocks, heading, fence, code, start = [], None, None, None, 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, start = stripped[3:].strip(), number + 1
                code = [] if fence == "python" else None
            elif re.match(r"#+ ", line):
                heading = line.lstrip("#").strip()
        elif stripped == "```":
            if code is not None:
                blocks.append((heading, start, "\n".join(code) + "\n"))
            fence = code = None
        elif code is not None:
            code.append(line)
    assert fence is None, f"README.md: the block at line {start - 1} is never closed"
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def _block_id(block):
    heading, line, _ = block
    return f"{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}-line{line}"


class FakeLLM:
    """``vllm.LLM`` for the README's offline block: reads the model folder's config.json as vLLM would, takes the
    ``prompt_embeds`` requests ``ptfast.integrations.vllm`` builds, and answers each with ``max_tokens`` ids."""

    def __init__(self, model, enable_prompt_embeds=False, skip_tokenizer_init=False, **kwargs):
        assert enable_prompt_embeds, "vLLM takes prompt_embeds only with enable_prompt_embeds=True"
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        self.model_config = types.SimpleNamespace(
            get_hidden_size=lambda: config["hidden_size"],
            get_vocab_size=lambda: config["vocab_size"],
            dtype=getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32"),
            max_model_len=config.get("max_position_embeddings"),
        )
        self.requests = []

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        outputs = []
        for prompt in prompts:
            embeds = prompt["prompt_embeds"]
            assert embeds.dim() == 2 and embeds.shape[1] == self.model_config.get_hidden_size()
            assert embeds.dtype == self.model_config.dtype
            self.requests.append(embeds)
            tokens = list(range(sampling_params.max_tokens))
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens)]))
        return outputs


class FakeSamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, **kwargs):
        self.temperature, self.max_tokens = temperature, max_tokens


def fake_vllm():
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    return module


@pytest.fixture(scope="module")
def section_folders(tmp_path_factory):
    """One working folder per README section, kept for the whole module (later blocks read earlier blocks' files)."""
    folders = {}

    def folder(heading):
        if heading not in folders:
            folders[heading] = tmp_path_factory.mktemp(re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-"))
        return folders[heading]

    return folder


def test_readme_has_python_blocks_in_the_expected_sections():
    headings = [heading for heading, _, _ in BLOCKS]
    assert {"Quickstart", "Serving several adapters", "Serving at scale (vLLM)"} <= set(headings), headings


@pytest.mark.parametrize("block", BLOCKS, ids=[_block_id(b) for b in BLOCKS])
def test_block_runs_as_written(block, section_folders, monkeypatch, capsys):
    heading, line, code = block
    monkeypatch.chdir(section_folders(heading))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")  # a block that would download fails instead
    if re.search(r"^\s*(import vllm|from vllm\b)", code, re.M):
        monkeypatch.setitem(sys.modules, "vllm", fake_vllm())
    namespace = {"__name__": "__readme__"}
    torch.manual_seed(0)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
    if isinstance(namespace.get("llm"), FakeLLM):  # the offline block: each request's prompt_embeds, one answer each
        bank, requests, adapters = namespace["bank"], namespace["requests"], namespace["adapters"]
        assert [tuple(e.shape) for e in namespace["llm"].requests] == [
            (bank.num_virtual_tokens(name) + len(ids), bank.weight.shape[1]) for ids, name in zip(requests, adapters)
        ]
        assert [len(t) for t in namespace["tokens"]] == [namespace["params"].max_tokens] * len(requests)
