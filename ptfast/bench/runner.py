"""Build and time providers on a case, into result rows: what the CLI runs for each case."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .cases import Case, Unavailable
from .providers import make_bench
from .report import result_row
from .timing import Bench, time_interleaved


def run_providers(
    case: Case,
    providers: Sequence[str],
    device: str,
    repeats: int = 7,
    min_round_s: float = 0.02,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Time ``providers`` on ``case``, interleaved. Returns ``(rows, {provider: why skipped})``."""
    benches: dict[str, Bench] = {}
    skipped: dict[str, str] = {}
    for provider in providers:
        try:
            benches[provider] = make_bench(case, provider, device)
        except Unavailable as exc:
            skipped[provider] = str(exc)
    timings = time_interleaved(benches, device, repeats, min_round_s) if benches else {}
    rows = []
    for provider, t in timings.items():
        b = benches[provider]
        rows.append(
            result_row(
                case,
                provider,
                device,
                t.median_s,
                q20_s=t.q20_s,
                q80_s=t.q80_s,
                min_s=t.min_s,
                loops=t.loops,
                repeats=t.repeats,
                setup_s=b.setup_s,
                note=b.note,
            )
        )
    return rows, skipped
