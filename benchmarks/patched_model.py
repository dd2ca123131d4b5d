"""Patched vs unpatched P-tuning on a tiny Llama: whole-model forward and training-step latency, median of N runs.

    python -m benchmarks.patched_model [THREADS]      # from the repo root; CPU; THREADS defaults to 1

The two models alternate call by call, so background load hits both alike. At this size the encoder is a small
share of a step, so expect ratios near 1: this checks that patching costs nothing end to end.
"""
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch
from peft import PromptEncoderConfig, get_peft_model
from tests.helpers.models import random_batch, tiny_llama_causal_lm
from ptfast import bench
from ptfast.integrations.peft import patch

HIDDEN, VOCAB, SEQ, NVT, ENC_H = 256, 1000, 32, 20, 256
N_FWD, N_TRAIN = 200, 100


def build(patched):
    base = tiny_llama_causal_lm(hidden_size=HIDDEN, vocab_size=VOCAB)
    torch.manual_seed(0)
    m = get_peft_model(base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT, encoder_hidden_size=ENC_H))
    return patch(m) if patched else m


def timeit_pair(fns, n):
    """Interleaved: each round runs every fn once (order alternating), so background load hits them alike."""
    for _ in range(5):
        for fn in fns.values():
            fn()
    ts = {k: [] for k in fns}
    names = list(fns)
    for i in range(n):
        for k in (names if i % 2 == 0 else names[::-1]):
            t = time.perf_counter(); fns[k](); ts[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v) * 1e3, min(v) * 1e3) for k, v in ts.items()}


torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
bench.pin_allocator()
models = {"peft": build(False), "ptfast": build(True)}
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, llama hidden={HIDDEN} layers=2 vocab={VOCAB} "
      f"seq={SEQ} virtual_tokens={NVT} encoder_hidden={ENC_H}")
for bs in (1, 8):
    ids, mask = random_batch(bs, SEQ, vocab_size=VOCAB)
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
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

        fwd[name], step[name] = f, t
    rf, rt = timeit_pair(fwd, N_FWD), timeit_pair(step, N_TRAIN)
    for name in models:
        print(f"batch {bs}  {name:6s}  forward median {rf[name][0]:7.3f} ms (min {rf[name][1]:7.3f})   "
              f"train step median {rt[name][0]:7.3f} ms (min {rt[name][1]:7.3f})")
    print(f"batch {bs}  peft/ptfast  forward x{rf['peft'][0]/rf['ptfast'][0]:.2f} (min x{rf['peft'][1]/rf['ptfast'][1]:.2f})"
          f"   train x{rt['peft'][0]/rt['ptfast'][0]:.2f} (min x{rt['peft'][1]/rt['ptfast'][1]:.2f})")
