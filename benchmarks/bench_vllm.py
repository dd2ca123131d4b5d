"""Serving throughput: vLLM + ptfast against PromptBank + HF generate and against PEFT switching adapters.

8 adapters x 4 requests = 32 requests, each 8 virtual + 56 real tokens (64 prompt positions), greedy, N new tokens
(ignore EOS), on the tiny Llama of tests_vllm (hidden 512, 4 layers, 8 heads, vocab 1024, random weights). The three
paths and their correctness helpers are the ones tests_vllm/ checks, so they compare the same thing:

* ``vllm+ptfast``: ``ptv.build_prompts`` (timed too) + one ``LLM.generate`` of all 32 (prefix caching off, so a
  repeat does not reuse the previous run's KV blocks).
* ``promptbank+hf``: one ``bank.prepare_inputs`` of all 32 (mixed adapters) + one HF ``generate`` (KV cache).
* ``peft-switching``: per adapter ``set_adapter`` + ``generate(use_cache=False)`` of its 4 requests (PEFT's only
  correct P-tuning path on transformers 5).

Each is warmed up once, then timed ``--repeats`` times (best kept), one path at a time (the vLLM engine is shut
down before the others run). Run from the repository root in the vLLM venv:

    PTFAST_NO_NATIVE=1 python benchmarks/bench_vllm.py --new-tokens 16 32

Writes benchmarks/results/vllm-<machine>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from ptfast import PromptBank, _env  # noqa: E402
from ptfast.bench.machine import device_slug, machine_info  # noqa: E402
from ptfast.integrations import vllm as ptv  # noqa: E402
from tests_vllm.common import (  # noqa: E402
    add_p_tuning_adapters,
    bank_hf_generate,
    make_tiny_llama,
    peft_generate,
    shutdown_engine,
    vllm_engine,
)

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 512, 4, 8, 4, 1024
N_ADAPTERS, PER_ADAPTER, VIRTUAL, PROMPT = 8, 4, 8, 64


def _best(fn, repeats):
    """Best wall time of ``repeats`` runs after a warm-up, and the last run's output. Not ptfast.bench's timer: that
    one interleaves providers round by round, while here each run takes seconds and vLLM must run alone."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), times, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft-repeats", type=int, default=1, help="PEFT is slow: fewer timed runs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="bench_vllm_")
    base = make_tiny_llama(folder, hidden=HIDDEN, layers=LAYERS, vocab=VOCAB, heads=HEADS, kv_heads=KV_HEADS)
    names_all = [f"adapter{i}" for i in range(N_ADAPTERS)]
    peft_model = add_p_tuning_adapters(base, {n: (VIRTUAL, "MLP") for n in names_all})
    bank = PromptBank.from_peft_model(peft_model)
    g = torch.Generator().manual_seed(0)
    requests = [
        torch.randint(3, VOCAB, (PROMPT - VIRTUAL,), generator=g).tolist() for _ in range(N_ADAPTERS * PER_ADAPTER)
    ]
    names = [names_all[i % N_ADAPTERS] for i in range(len(requests))]  # interleaved: every batch mixes adapters

    # One path at a time: vLLM's engine processes are shut down before the HF and PEFT paths are timed (with them
    # alive, HF generate measured 2-9x slower here: the engine's worker keeps a core busy).
    start = time.perf_counter()
    llm = vllm_engine(folder, enable_prefix_caching=False)
    engine_start = time.perf_counter() - start
    from vllm import SamplingParams

    results = {}
    try:
        for new in args.new_tokens:
            params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, detokenize=False)
            results[("vllm+ptfast", new)] = _best(
                lambda: ptv.generate(llm, bank, requests, names, params), args.repeats
            )
    finally:
        shutdown_engine(llm)
    for new in args.new_tokens:
        results[("promptbank+hf", new)] = _best(
            lambda: bank_hf_generate(peft_model.get_base_model(), bank, requests, names, new), args.repeats
        )
        results[("peft-switching", new)] = _best(
            lambda: peft_generate(peft_model, requests, names, new), args.peft_repeats
        )
    rows = []
    for new in args.new_tokens:
        reference = results[("peft-switching", new)][2]
        by = {}
        for provider in ("vllm+ptfast", "promptbank+hf", "peft-switching"):
            best, times, tokens = results[(provider, new)]
            generated = sum(len(t) for t in tokens)
            by[provider] = {
                "provider": provider,
                "new_tokens": new,
                "requests": len(requests),
                "seconds": best,
                "all_seconds": times,
                "generated_tokens": generated,
                "tokens_per_s": generated / best,
                "same_tokens_as_peft": sum(a == b for a, b in zip(tokens, reference)),
            }
        for r in by.values():
            r["speedup_vs_hf"] = r["tokens_per_s"] / by["promptbank+hf"]["tokens_per_s"]
            r["speedup_vs_peft"] = r["tokens_per_s"] / by["peft-switching"]["tokens_per_s"]
            print(
                f"new={new:3d} {r['provider']:15s} {r['tokens_per_s']:9.1f} tok/s  ({r['seconds']:.3f} s; "
                f"x{r['speedup_vs_hf']:.2f} vs HF, x{r['speedup_vs_peft']:.1f} vs PEFT; same tokens as PEFT: "
                f"{r['same_tokens_as_peft']}/{r['requests']})",
                flush=True,
            )
            rows.append(r)

    import transformers
    import vllm

    info = machine_info("cpu")
    report = {
        "command": ("PTFAST_NO_NATIVE=1 " if _env.native_disabled() else "")
        + "python benchmarks/bench_vllm.py "
        + " ".join(argv or sys.argv[1:]),
        "machine": info["device_name"],
        "platform": platform.platform(),
        "machine_info": info,
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__},
        "model": {
            "hidden": HIDDEN,
            "layers": LAYERS,
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "vocab": VOCAB,
            "dtype": "float32",
        },
        "workload": {
            "adapters": N_ADAPTERS,
            "requests_per_adapter": PER_ADAPTER,
            "virtual_tokens": VIRTUAL,
            "prompt_positions": PROMPT,
        },
        "vllm_engine_start_s": engine_start,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    slug = "vllm-" + device_slug("cpu")[len("cpu-") :]  # e.g. vllm-amd-epyc-2c
    with open(os.path.join(args.out, slug + ".json"), "w") as f:
        json.dump(report, f, indent=2)
    _plot(report, os.path.join(args.out, slug + ".png"))
    print("wrote", os.path.join(args.out, slug + ".json"))


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    news = sorted({r["new_tokens"] for r in rows})
    providers = ["vllm+ptfast", "promptbank+hf", "peft-switching"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(providers)
    for k, provider in enumerate(providers):
        values = [
            next(r["tokens_per_s"] for r in rows if r["provider"] == provider and r["new_tokens"] == n) for n in news
        ]
        bars = ax.bar([i + k * width for i in range(len(news))], values, width, label=provider)
        for bar, n in zip(bars, news):
            r = next(r for r in rows if r["provider"] == provider and r["new_tokens"] == n)
            ax.annotate(
                f"{r['tokens_per_s']:.0f}\nx{r['speedup_vs_peft']:.1f}",
                (bar.get_x() + width / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks([i + width for i in range(len(news))], [f"{n} new tokens" for n in news])
    ax.set_ylabel("generated tokens / s (32 requests, 8 adapters)")
    ax.set_title(
        f"P-tuning serving, tiny Llama h{report['model']['hidden']} x{report['model']['layers']} | {report['machine']}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
