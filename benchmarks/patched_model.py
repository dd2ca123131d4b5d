"""Patched vs unpatched P-tuning on a tiny Llama: whole-model forward and training-step latency, CPU.

    python -m benchmarks.patched_model [THREADS]      # from the repo root; THREADS defaults to 1

Timed with ptfast's one timer (``ptfast.bench.time_interleaved``): calls per round calibrated to >= 50 ms, the two
models' rounds interleaved so background load hits both alike, median (and fastest) round per call. At this size
the encoder is a small share of a step, so expect ratios near 1: this checks that patching costs nothing end to end.
"""

import sys
import warnings

import torch
from peft import PromptEncoderConfig, get_peft_model

from ptfast import bench
from ptfast.integrations.peft import patch
from tests.helpers.models import random_batch, tiny_llama_causal_lm

HIDDEN, VOCAB, SEQ, NVT, ENC_H = 256, 1000, 32, 20, 256
REPEATS, MIN_ROUND_S = 15, 0.05


def build(patched):
    base = tiny_llama_causal_lm(hidden_size=HIDDEN, vocab_size=VOCAB)
    torch.manual_seed(0)
    m = get_peft_model(
        base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT, encoder_hidden_size=ENC_H)
    )
    return patch(m) if patched else m


def callables(models, ids, mask):
    """Per model: a no-grad forward, and a training step (forward, backward, AdamW step)."""
    fwd, step = {}, {}
    for name, m in models.items():
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def f(m=m):
            m.eval()
            with torch.no_grad():
                m(input_ids=ids, attention_mask=mask)

        def t(m=m, opt=opt):
            m.train()
            loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fwd[name], step[name] = f, t
    return fwd, step


def main(argv):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(argv[0]) if argv else 1)
    bench.pin_allocator()
    models = {"peft": build(False), "ptfast": build(True)}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, llama hidden={HIDDEN} layers=2 "
        f"vocab={VOCAB} seq={SEQ} virtual_tokens={NVT} encoder_hidden={ENC_H}; median (min) of {REPEATS} rounds"
    )
    for bs in (1, 8):
        ids, mask = random_batch(bs, SEQ, vocab_size=VOCAB)
        fwd, step = callables(models, ids, mask)
        rf = bench.time_interleaved(fwd, "cpu", repeats=REPEATS, min_round_s=MIN_ROUND_S)
        rt = bench.time_interleaved(step, "cpu", repeats=REPEATS, min_round_s=MIN_ROUND_S)
        for name in models:
            print(
                f"batch {bs}  {name:6s}  forward {rf[name].median_s * 1e3:7.3f} ms ({rf[name].min_s * 1e3:7.3f})   "
                f"train step {rt[name].median_s * 1e3:7.3f} ms ({rt[name].min_s * 1e3:7.3f})"
            )
        print(
            f"batch {bs}  peft/ptfast  forward x{rf['peft'].median_s / rf['ptfast'].median_s:.2f} "
            f"(min x{rf['peft'].min_s / rf['ptfast'].min_s:.2f})   "
            f"train x{rt['peft'].median_s / rt['ptfast'].median_s:.2f} "
            f"(min x{rt['peft'].min_s / rt['ptfast'].min_s:.2f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
