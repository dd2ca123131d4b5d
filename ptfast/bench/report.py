"""What is shown: result rows and speedups, the parity check, the text table, the JSON file and the bar chart."""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from .cases import DTYPES, PARITY_BATCH, PROVIDERS, Case, Shape
from .floors import floor_s, hbm_bytes_per_s, work
from .machine import machine_line
from .providers import encoders


def result_row(case: Case, provider: str, device: str, median_s: float, **extra) -> dict[str, Any]:
    nbytes, flops = work(case)
    row = {
        "id": case.id,
        "mode": case.mode,
        "M": case.shape.M,
        "D": case.shape.D,
        "H": case.shape.H,
        "batch": case.batch,
        "seq_len": case.seq_len if case.mode in ("prompt", "model") else None,
        "dtype": case.dtype,
        "provider": provider,
        "median_s": median_s,
        "bytes": nbytes,
        "flops": flops,
    }
    row.update(extra)
    if device.startswith("cuda") and provider != "ptfast-cached":
        # The cached provider skips the work these numbers count, so a bandwidth figure would be meaningless.
        row["floor_s"] = floor_s(case)
        row["pct_of_floor"] = 100.0 * row["floor_s"] / median_s
        row["pct_of_hbm_bw"] = 100.0 * nbytes / median_s / hbm_bytes_per_s()
    return row


def add_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``speedup_vs_peft`` = PEFT's median / this median, per case, and where the case has a ``peft-inference``
    row, ``speedup_vs_peft_inference`` = that row's median / this median (the fair ratio for ``ptfast-cached``)."""
    base = {r["id"]: r["median_s"] for r in rows if r["provider"] == "peft"}
    inference = {r["id"]: r["median_s"] for r in rows if r["provider"] == "peft-inference"}
    for r in rows:
        ref = base.get(r["id"])
        r["speedup_vs_peft"] = ref / r["median_s"] if ref else None
        if r["id"] in inference:
            r["speedup_vs_peft_inference"] = inference[r["id"]] / r["median_s"]
    return rows


# ------------------------------------------------------------------------------------------------ parity


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _tol(dtype: str, ref_err: float, scale: float) -> float:
    """What "within rounding" allows: 2 x PEFT's own error against float64 + one ``eps(dtype)`` of the largest value.

    flash-attention's rule for a kernel against a reference in the same dtype (the factor 2: both sides round).
    """
    return 2.0 * ref_err + torch.finfo(DTYPES[dtype]).eps * scale


def parity(shape: Shape, dtype: str, device: str, batch: int = PARITY_BATCH) -> dict[str, Any]:
    """Max errors of ptfast against PEFT (same weights), with the tolerance of this dtype.

    Two calls are checked:

    * the ``(1, M)`` arange call that ``PeftModel.get_prompt`` makes (keys ``single_*``): the forward, uncached and
      cached. On CPU ptfast runs PEFT's own ``F.linear`` chain on the same ``M`` rows, so this is bitwise equal;
    * ``arange(M)`` expanded to ``(batch, M)``: the forward, uncached and cached, and every gradient. PEFT runs its
      head on ``batch*M`` rows and ptfast on the ``M`` unique rows; a BLAS may round differently with the row count
      (Intel MKL does: 3e-8 at the seed shape, fp32), so this one is "within rounding", not bitwise.

    The tolerances (``*_tol``) are ``2 x PEFT's max error against a float64 copy + eps(dtype) x max |PEFT value|``.
    """
    peft_enc, pt_enc = encoders(shape, dtype, device)
    ref64_enc = copy.deepcopy(peft_enc).double()
    idx = torch.arange(shape.M, device=device).unsqueeze(0).expand(batch, -1)
    one = idx[:1]
    gen = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        ref1 = peft_enc(one)
        pt_enc.invalidate_cache()
        fwd1, cached1 = pt_enc(one), pt_enc(one)
        ref = peft_enc(idx)
        pt_enc.invalidate_cache()
        fwd, cached = pt_enc(idx), pt_enc(idx)
    grad_out = torch.randn(ref.shape, device=device, dtype=ref.dtype, generator=gen)
    grads = {}
    for enc in (peft_enc, pt_enc, ref64_enc):
        enc.zero_grad(set_to_none=True)
        out = enc(idx)
        if enc is ref64_enc:
            ref64 = out.detach()
        out.backward(grad_out.to(out.dtype))
        grads[enc] = {n: p.grad.detach().clone() for n, p in enc.named_parameters()}
        enc.zero_grad(set_to_none=True)

    grad_err = max(_max_err(grads[pt_enc][n], g) for n, g in grads[peft_enc].items())
    peft_grad_err = max(_max_err(grads[peft_enc][n], g) for n, g in grads[ref64_enc].items())
    grad_scale = max(float(g.double().abs().max()) for g in grads[peft_enc].values())
    del grads, ref64_enc  # the float64 copy: 2x the encoder's memory
    out_scale = float(ref.double().abs().max())
    r = {
        "shape": str(shape),
        "dtype": dtype,
        "batch": batch,
        "single_fwd_max_abs_err": _max_err(fwd1, ref1),
        "single_cached_max_abs_err": _max_err(cached1, ref1),
        "single_fwd_tol": _tol(dtype, _max_err(ref1, ref64[:1]), float(ref1.double().abs().max())),
        "fwd_max_abs_err": _max_err(fwd, ref),
        "cached_max_abs_err": _max_err(cached, ref),
        "grad_max_abs_err": grad_err,
        "grad_max_abs": grad_scale,
        "out_max_abs": out_scale,
        "peft_vs_fp64_max_abs_err": _max_err(ref, ref64),
        "ptfast_vs_fp64_max_abs_err": _max_err(fwd, ref64),
        "peft_grad_vs_fp64_max_abs_err": peft_grad_err,
        "finite": bool(all(torch.isfinite(t).all() for t in (fwd1, cached1, fwd, cached))),
    }
    r["fwd_tol"] = _tol(dtype, r["peft_vs_fp64_max_abs_err"], out_scale)
    r["grad_tol"] = _tol(dtype, peft_grad_err, grad_scale)
    r["single_bitwise"] = r["single_fwd_max_abs_err"] == 0.0 and r["single_cached_max_abs_err"] == 0.0
    r["within_tol"] = (
        r["finite"]
        and max(r["single_fwd_max_abs_err"], r["single_cached_max_abs_err"]) <= r["single_fwd_tol"]
        and max(r["fwd_max_abs_err"], r["cached_max_abs_err"]) <= r["fwd_tol"]
        and grad_err <= r["grad_tol"]
    )
    return r


def _verdict(errs: Sequence[float], tols: Sequence[float], dtype: str) -> str:
    if all(e == 0.0 for e in errs):
        return "bitwise equal"
    if all(e <= t for e, t in zip(errs, tols)):
        return f"within {dtype} rounding"
    return f"NOT within {dtype} rounding"


def parity_lines(r: dict[str, Any]) -> list[str]:
    """The report's lines for one :func:`parity` result: the ``(1, M)`` call, then the batch."""
    head = f"parity {r['shape']} {r['dtype']}"
    m = r["shape"].split("x")[0]
    single = (r["single_fwd_max_abs_err"], r["single_cached_max_abs_err"])
    batch = (r["fwd_max_abs_err"], r["cached_max_abs_err"], r["grad_max_abs_err"])
    lines = [
        f"{head}, (1, {m}) arange call: forward {single[0]:.1e}, cached {single[1]:.1e}: "
        + _verdict(single, (r["single_fwd_tol"],) * 2, r["dtype"])
        + ("" if single == (0.0, 0.0) else f" (tolerance {r['single_fwd_tol']:.1e})"),
        f"{head}, B={r['batch']}: forward {batch[0]:.1e}, cached {batch[1]:.1e}, grads {batch[2]:.1e}: "
        + _verdict(batch, (r["fwd_tol"], r["fwd_tol"], r["grad_tol"]), r["dtype"])
        + f" (tolerance {r['fwd_tol']:.1e}, grads {r['grad_tol']:.1e})",
    ]
    if not r["finite"]:
        lines[-1] += "  NON-FINITE OUTPUT"
    return lines


PARITY_LEGEND = (
    "parity: max |ptfast - peft|, same weights; tolerance = 2 x PEFT's own max error against a float64 "
    "copy + eps(dtype) x max |value|"
)


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_table(rows: list[dict[str, Any]], info: dict[str, Any] | None = None) -> str:
    """A text table: one row per case, the median per provider with its speedup over PEFT in parentheses.

    On CUDA, two last columns give ptfast's (uncached) floor / measured time, and its achieved bandwidth
    (bytes of :func:`work` / time) as a share of :func:`hbm_bytes_per_s`.
    """
    present = {r["provider"] for r in rows}
    providers = [p for p in PROVIDERS if p in present]
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    order: list[str] = []
    for r in rows:
        if r["id"] not in by_case:
            by_case[r["id"]] = {}
            order.append(r["id"])
        by_case[r["id"]][r["provider"]] = r
    show_floor = any("pct_of_floor" in r for r in rows)
    show_fair = "peft-inference" in present and "ptfast-cached" in present
    header = ["mode", "shape MxDxH", "B", "dtype"] + providers
    if show_fair:
        header.append(CACHED_VS_INFERENCE)
    if show_floor:
        header += ["ptfast %floor", "ptfast %HBM"]
    table = [header]
    for cid in order:
        cells = by_case[cid]
        any_row = next(iter(cells.values()))
        line = [
            any_row["mode"] + (f" S{any_row['seq_len']}" if any_row.get("seq_len") else ""),
            f"{any_row['M']}x{any_row['D']}x{any_row['H']}",
            str(any_row["batch"]),
            any_row["dtype"],
        ]
        for p in providers:
            r = cells.get(p)
            if r is None:
                line.append("-")
                continue
            text = fmt_time(r["median_s"])
            if p != "peft" and r.get("speedup_vs_peft"):
                text += f" ({ratio_text(r['speedup_vs_peft'])})"
            line.append(text)
        if show_fair:
            ratio = cells.get("ptfast-cached", {}).get("speedup_vs_peft_inference")
            line.append(ratio_text(ratio) if ratio else "-")
        if show_floor:
            pr = cells.get("ptfast", {})
            line.append(f"{pr['pct_of_floor']:.0f}%" if "pct_of_floor" in pr else "-")
            line.append(f"{pr['pct_of_hbm_bw']:.0f}%" if "pct_of_hbm_bw" in pr else "-")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = []
    if info is not None:
        out.append(machine_line(info))
    for i, row in enumerate(table):
        out.append(
            "  ".join(
                cell.ljust(w) if j < 4 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("times: median per call; (Nx) = PEFT's median / this median")
    if show_fair:
        out.append(CACHED_VS_INFERENCE_NOTE)
    return "\n".join(out)


def ratio_text(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


#: The table's column comparing the cached encoder with PEFT's own path for a loaded (inference-mode) adapter.
CACHED_VS_INFERENCE = "cached vs peft-inference"
CACHED_VS_INFERENCE_NOTE = (
    "peft: PEFT in its training configuration (the MLP every call); peft-inference: an adapter in inference_mode, as\n"
    "PeftModel.from_pretrained loads it (the saved table, no MLP). The cached speedups over peft hold for models in\n"
    f"their training configuration; for a loaded adapter, compare with peft-inference ({CACHED_VS_INFERENCE} =\n"
    "peft-inference's median / ptfast-cached's)"
)


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def plot(rows: list[dict[str, Any]], path: str, info: dict[str, Any] | None = None) -> None:
    """A grouped bar chart of median time per case and provider (log scale), saved as PNG.

    Raises ImportError with the install command when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the plot needs matplotlib: pip install 'ptfast[bench]' (or pip install matplotlib)") from exc
    present = {r["provider"] for r in rows}
    providers = [p for p in PROVIDERS if p in present]
    ids: list[str] = []
    for r in rows:
        if r["id"] not in ids:
            ids.append(r["id"])
    lookup = {(r["id"], r["provider"]): r["median_s"] for r in rows}
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(ids) + 2), 4.8))
    for k, p in enumerate(providers):
        xs = [i + (k - (len(providers) - 1) / 2) * width for i in range(len(ids))]
        ys = [lookup.get((cid, p), float("nan")) * 1e6 for cid in ids]
        ax.bar(xs, ys, width, label=p)
        for x, y, cid in zip(xs, ys, ids):
            ref = lookup.get((cid, "peft"))
            if p != "peft" and ref and math.isfinite(y):
                ax.text(x, y, f"{ref * 1e6 / y:.1f}x", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (us, log)")
    first = {}
    for r in rows:
        first.setdefault(r["id"], r)
    shapes = {(r["M"], r["D"], r["H"]) for r in rows}
    labels = []
    for cid in ids:
        r = first[cid]
        extra = (
            f"B{r['batch']}"
            + (f" S{r['seq_len']}" if r.get("seq_len") else "")
            + ("" if r["dtype"] == "fp32" else f" {r['dtype']}")
        )
        shape = "" if len(shapes) == 1 else f"\n{r['M']}x{r['D']}x{r['H']}"
        labels.append(f"{r['mode']}{shape}\n{extra}")
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels(labels, fontsize=7)
    title = "ptfast vs PEFT PromptEncoder"
    if len(shapes) == 1:
        title += " at MxDxH = {}x{}x{}".format(*next(iter(shapes)))
    if info:
        title += f"\n{info['device_name']}, torch {info['torch']}, ptfast {info['ptfast']}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
