"""A patched PeftModel trains under DistributedDataParallel (2 CPU processes, gloo) like single-process PEFT.

Each rank gets half the batch; DDP averages the gradients, so the mean of the ranks' losses and the weights after each
step must match single-process training on the full batch (every sample has the same number of label tokens, so the
full-batch mean loss is the mean of the two half-batch means).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("peft")
pytest.importorskip("transformers")


from tests.helpers.models import random_batch, tiny_llama_causal_lm  # noqa: E402

WORLD_SIZE = 2
STEPS = 4
BATCH, SEQ = 4, 8
LR = 1e-2
WORKER_TIMEOUT_S = 180


def _build(patched: bool):
    from peft import PromptEncoderConfig, get_peft_model

    from ptfast.integrations.peft import patch

    base = tiny_llama_causal_lm()
    torch.manual_seed(0)
    model = get_peft_model(
        base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32)
    )
    if patched:
        patch(model)
    return model.train()


def _batch(step: int):
    ids, mask = random_batch(BATCH, SEQ, seed=100 + step % 2)  # two batches, alternating
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def _encoder_state(peft_model):
    return {k: v.detach().clone() for k, v in peft_model.prompt_encoder["default"].state_dict().items()}


def _worker(rank: int, port: int, result_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ptfast
    from ptfast.integrations.peft import patch

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    results = {}
    for mode in ("patch_then_wrap", "wrap_then_patch"):
        model = _build(patched=mode == "patch_then_wrap")
        ddp = DDP(model)
        if mode == "wrap_then_patch":
            assert patch(ddp) is ddp  # DDP already holds the Parameter objects; patch keeps them
        assert type(ddp.module.prompt_encoder["default"]) is ptfast.PromptEncoder
        optimizer = _optimizer(ddp)
        losses = []
        half = BATCH // WORLD_SIZE
        for step in range(STEPS):
            batch = {k: v[rank * half : (rank + 1) * half] for k, v in _batch(step).items()}
            loss = ddp(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / WORLD_SIZE)
        results[mode] = {"losses": losses, "encoder": _encoder_state(model)}
    if rank == 0:
        torch.save(results, result_path)
    dist.barrier()
    # Leave without running destructors. Tearing gloo down while DDP's reducer is being freed can deadlock on
    # the GIL (seen here with torch 2.13: ~ProcessGroupGloo joins its worker thread, which waits for the GIL to
    # drop a tensor). An exception above still exits non-zero through mp.spawn.
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    result_path = str(tmp_path / "ddp.pt")
    workers = mp.spawn(_worker, args=(_free_port(), result_path), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not workers.join(timeout=2):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {WORKER_TIMEOUT_S} s")
    results = torch.load(result_path)

    # single process, plain PEFT, full batch
    model = _build(patched=False)
    optimizer = _optimizer(model)
    losses = []
    for step in range(STEPS):
        loss = model(**_batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0] and losses[3] < losses[1]  # it trains
    reference = _encoder_state(model)

    for mode, result in results.items():
        assert result["losses"] == pytest.approx(losses, rel=1e-5), mode
        assert result["encoder"].keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(result["encoder"][key], value, rtol=1e-4, atol=1e-5, msg=f"{mode}: {key}")
