"""``python -m ptfast`` / ``ptfast``: check parity with PEFT and time ptfast against PEFT on this machine.

The default run (seed shape 20x1024x128, fp32, batches 1 and 8, every mode) takes tens of seconds on a 2-core CPU,
longer on a busy one (see ``--threads``); it says what it will do first and prints a line per case on stderr.
``--grid full`` runs every benchmark shape; ``--out DIR`` writes ``DIR/<device>.json`` and ``DIR/<device>.png``, both
from the same run (written under temporary names, renamed together). The timed callables come from
:mod:`ptfast.bench`, shared with the pytest-benchmark suite in ``benchmarks/``.

Every argument is checked before anything is timed: a bad value, an ``--out`` folder that cannot be written, shapes
that cannot fit in memory, or a missing peft print one ``ptfast: error: ...`` line on stderr and exit with code 2.
Ctrl-C at any point prints one line and exits with code 130; during the timing, the rows measured so far are reported
(and written with ``--out``) first. The report states measurements only: parity, the table of medians and speedups,
and what was skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence

EXIT_USAGE = 2
#: What a shell reports for a process ended by SIGINT (128 + 2): Ctrl-C, or `timeout --signal=INT`.
EXIT_INTERRUPTED = 130

_EPILOG = """\
providers (columns):
  peft           PEFT's PromptEncoder, eager (the reference; speedups are over it)
  peft-graph     eager PEFT replayed from a CUDA graph (CUDA only, no-grad modes)
  peft-inference PEFT's path for an adapter in inference_mode, as PeftModel.from_pretrained loads it: the saved
                 table repeated, no MLP (no-grad modes); the fair baseline for ptfast-cached on a loaded adapter
  ptfast         ptfast.PromptEncoder, cache miss every call (PTFAST_BACKEND decides: auto is eager)
  ptfast-cached  ptfast.PromptEncoder, cached table (no-grad modes)
  compile        torch.compile(PEFT's encoder), default mode
  compile-mat    torch.compile(..., mode="max-autotune-no-cudagraphs") (CUDA only)

modes (rows):
  infer   encoder(indices) under no_grad, indices (B, M)
  train   forward + backward
  prompt  PeftModel's prompt path by recipe: encoder(tokens[:1]).repeat(B,1,1), cat with inputs_embeds (B, S, D)
  model   the same through a real PeftModelForCausalLM over a tiny random Llama (needs ptfast.integrations.peft)

examples:
  python -m ptfast                                  # seed shape, this device, tens of seconds on a 2-core CPU
  python -m ptfast --threads 1                      # steadier on a machine busy with other work
  python -m ptfast --out benchmarks/results         # + JSON and PNG bar chart
  python -m ptfast --grid full --device cuda        # every shape, fp32 + bf16, torch.compile baselines
  python -m ptfast --shapes 20x4096x4096 --modes infer,train --batch 1
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptfast",
        description="Check ptfast.PromptEncoder against PEFT's P-tuning PromptEncoder (max error) and time both "
        "on this machine: inference, training, and the PeftModel prompt path.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present, else CPU), cpu, or cuda[:N]. Asking for CUDA without one exits 2.",
    )
    p.add_argument(
        "--grid",
        choices=("quick", "full"),
        default="quick",
        help="quick: seed shape 20x1024x128 only (default). full (progress on stderr): also 20x4096x4096, "
        "100x4096x1024 and "
        "20x8192x1024 (model row at the seed shape only), plus bf16 on CUDA.",
    )
    p.add_argument(
        "--shapes",
        type=str,
        default=None,
        metavar="MxDxH[,MxDxH...]",
        help="explicit shapes (num_virtual_tokens x token_dim x encoder_hidden_size); overrides --grid's.",
    )
    p.add_argument("--batch", type=str, default=None, metavar="B[,B...]", help="batch sizes (default 1,8).")
    p.add_argument(
        "--dtype",
        type=str,
        default=None,
        metavar="fp32|bf16|fp16[,...]",
        help="dtypes (default fp32; --grid full on CUDA adds bf16).",
    )
    p.add_argument(
        "--modes", type=str, default=None, metavar="infer,train,prompt,model", help="modes to time (default all)."
    )
    p.add_argument(
        "--providers",
        type=str,
        default=None,
        metavar="NAME[,NAME...]",
        help="restrict the providers (peft is always kept as the reference).",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile baselines. auto: on for CUDA, and on CPU only with --grid full "
        "(a first compile takes seconds with a cold inductor cache, and on CPU the compiled encoder "
        "was not faster than eager: benchmarks/NOTES.md).",
    )
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement; the median is reported.")
    p.add_argument(
        "--min-round-ms",
        type=float,
        default=20.0,
        help="calls per round are calibrated so a round lasts at least this long (default 20 ms).",
    )
    p.add_argument("--seq-len", type=int, default=128, help="input tokens S for the prompt/model rows (default 128).")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (CPU); default: torch's (one per core). On a machine busy with other "
        "work, --threads 1 keeps torch's threads from waiting on each other.",
    )
    p.add_argument("--no-parity", action="store_true", help="skip the parity check.")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new case after this many seconds of timing; the rest are listed as skipped "
        "(benchmarks/gpu_check.sh uses it to stay inside its 5-minute call).",
    )
    p.add_argument(
        "--out",
        type=str,
        default=None,
        metavar="DIR",
        help="write DIR/<device>.json (all rows, machine info, parity) and DIR/<device>.png "
        "(bar chart; needs matplotlib: pip install 'ptfast[bench]').",
    )
    p.add_argument(
        "--name",
        type=str,
        default=None,
        help="base name of the --out files (default: the device, e.g. cpu-amd-epyc-2c).",
    )
    return p


class _UsageError(Exception):
    """A bad argument or an impossible run: one ``ptfast: error: ...`` line and exit code 2, before any timing."""


def _fail(msg: str) -> int:
    print(f"ptfast: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def _check_out_dir(path: str) -> None:
    """Create ``--out`` and a file in it now, so an unwritable folder fails before minutes of timing."""
    import tempfile

    if os.path.exists(path) and not os.path.isdir(path):
        raise _UsageError(f"--out {path} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ptfast-write-check-"):
            pass
    except OSError as exc:
        raise _UsageError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None


def _check_memory(cases, device: str, parity: bool) -> None:
    """Refuse shapes whose weights and activations cannot fit (a lower bound, see ``bench.footprint_bytes``)."""
    from . import bench

    available, what = bench.available_memory(device)
    if available is None or not cases:
        return
    case = max(cases, key=lambda c: bench.footprint_bytes(c, parity=parity))
    need = bench.footprint_bytes(case, parity=parity)
    if need > available:
        raise _UsageError(
            f"shape {case.shape} does not fit: {case.mode} B={case.batch} {case.dtype} needs at least {need:,} bytes "
            f"({_gb(need)}) for weights, gradients and activations, and {device} has {available:,} bytes "
            f"({_gb(available)}) {what}; use smaller --shapes or --batch"
        )


def _check_args(args):
    """Every check on the arguments, before anything is timed. Returns ``(device, cases, wanted providers)``."""
    from . import bench

    try:
        device = bench.resolve_device(args.device)
    except (bench.Unavailable, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    for flag, value in (("--threads", args.threads), ("--repeats", args.repeats), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise _UsageError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--min-round-ms", args.min_round_ms), ("--time-budget", args.time_budget)):
        if value is not None and not value > 0:  # `not >` also catches nan
            raise _UsageError(f"{flag} must be > 0, got {value:g}")
    try:
        shapes = [bench.Shape.parse(s) for s in _csv(args.shapes)] if args.shapes else None
        try:
            batches = [int(b) for b in _csv(args.batch)] if args.batch else None
        except ValueError:
            raise ValueError(f"--batch takes comma-separated integers, got {args.batch!r}") from None
        if batches and any(b < 1 for b in batches):
            raise ValueError("--batch values must be >= 1")
        dtypes = _csv(args.dtype) if args.dtype else None
        for d in dtypes or ():
            if d not in bench.DTYPES:
                raise ValueError(f"unknown dtype {d!r}: use fp32, bf16 or fp16")
        modes = _csv(args.modes) if args.modes else None
        for m in modes or ():
            if m not in bench.MODES:
                raise ValueError(f"unknown mode {m!r}: use {', '.join(bench.MODES)}")
        wanted = set(_csv(args.providers)) if args.providers else None
        for p in wanted or ():
            if p not in bench.PROVIDERS:
                raise ValueError(f"unknown provider {p!r}: use {', '.join(bench.PROVIDERS)}")
        cases = bench.grid(
            args.grid, device, shapes=shapes, batches=batches, dtypes=dtypes, modes=modes, seq_len=args.seq_len
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    try:
        bench.require_peft(import_it=False)  # importing it takes seconds: after the first line of output
    except bench.Unavailable as exc:
        raise _UsageError(str(exc)) from None
    _check_memory(cases, device, parity=not args.no_parity)
    if args.name is not None and not (_NAME.fullmatch(args.name) and len(args.name) <= 100):
        raise _UsageError(
            f"--name {args.name!r}: use up to 100 letters, digits, '.', '_' and '-' (a file name under --out, not a "
            "path)"
        )
    if args.out:
        _check_out_dir(args.out)
    return device, cases, wanted


# What --name may be: the base of file names written into --out (no folder, nothing hidden)
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _busy_hint(info, device: str, threads_flag: int | None) -> str | None:
    """A note when other work already holds most cores: timings then run slower and noisier, and torch's threads
    wait on each other (one busy core holds up every parallel region), so suggest ``--threads`` unless it is set."""
    load, cores = info.get("loadavg_1m"), info.get("cpu_count") or 1
    if device != "cpu" or load is None or load <= BUSY_LOAD_PER_CORE * cores:
        return None
    hint = (
        f"note: this machine is busy (1-minute load average {load:g} on {_plural(cores, 'core')}): timings will "
        "be slower and noisier than on a quiet machine"
    )
    if threads_flag is None and info.get("torch_threads", 1) > 1:
        hint += (
            f"; torch's {info['torch_threads']} threads wait on each other when other processes hold the "
            "cores, try --threads 1"
        )
    return hint


#: The load per core above which the run is called busy: most cores already taken by other processes.
BUSY_LOAD_PER_CORE = 0.75


def _time_jobs(jobs, args, device, rows, skipped, t_start) -> None:
    import torch

    from . import bench

    for i, (case, providers) in enumerate(jobs, 1):
        if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
            for provider in providers:
                skipped.setdefault(f"--time-budget {args.time_budget:g}s spent", []).append(f"{case.id}/{provider}")
            continue
        print(
            f"[{i}/{len(jobs)} {time.perf_counter() - t_start:5.0f}s] {case.id}: {', '.join(providers)}",
            file=sys.stderr,
            flush=True,
        )
        try:
            case_rows, case_skipped = bench.run_providers(
                case, providers, device, repeats=args.repeats, min_round_s=args.min_round_ms / 1e3
            )
        except torch.cuda.OutOfMemoryError as exc:  # large shapes x compile on a small card
            case_rows, case_skipped = [], {p: f"out of memory: {str(exc).splitlines()[0][:120]}" for p in providers}
            torch.cuda.empty_cache()
        rows.extend(case_rows)
        for provider, why in case_skipped.items():
            skipped.setdefault(why, []).append(f"{case.id}/{provider}")


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a SIGINT until the block ends, then raise KeyboardInterrupt: the block (two renames) runs whole.

    Python runs signal handlers between bytecodes of the main thread only, so elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _write_outputs(out: str, name: str, payload, rows, info) -> None:
    """Write ``out/<name>.json`` and ``out/<name>.png`` of one run, or neither.

    Both are written under temporary names first and renamed together at the end, so an interrupt or a failure
    leaves the previous run's pair as it was. Without a plot (no matplotlib, no rows), the previous run's PNG is
    removed rather than left beside a JSON it does not belong to.
    """
    from . import bench

    json_path, png_path = os.path.join(out, name + ".json"), os.path.join(out, name + ".png")
    # Hidden names in the same folder (a rename within one file system is atomic); the plot's file type is read
    # from the extension, so the PNG's temporary name ends in .png too.
    tmp_json = os.path.join(out, f".{name}.{os.getpid()}.tmp.json")
    tmp_png = os.path.join(out, f".{name}.{os.getpid()}.tmp.png")
    try:
        bench.write_json(tmp_json, payload)
        why_no_plot = None
        if not rows:
            why_no_plot = "no rows were timed"
        else:
            try:
                bench.plot(rows, tmp_png, info)
            except ImportError as exc:
                why_no_plot = str(exc)
        with _sigint_deferred():
            os.replace(tmp_json, json_path)
            stale = why_no_plot is not None and os.path.lexists(png_path)
            if why_no_plot is None:
                os.replace(tmp_png, png_path)
            elif stale:
                os.remove(png_path)
    finally:
        for tmp in (tmp_json, tmp_png):
            if os.path.lexists(tmp):
                os.remove(tmp)
    print(f"wrote {json_path}")
    if why_no_plot is None:
        print(f"wrote {png_path}")
    else:
        print(
            f"ptfast: no plot written: {why_no_plot}" + (f"; removed the previous run's {png_path}" if stale else ""),
            file=sys.stderr,
        )


_SIGINTS: list = []


def _on_sigint(signum, frame):
    _SIGINTS.append(signum)
    raise KeyboardInterrupt


def _check_interrupted() -> None:
    """Raise the Ctrl-C that library import code swallowed or turned into an ImportError (bare ``except`` clauses
    in optional imports, transformers' lazy modules): the handler recorded it."""
    if _SIGINTS:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit code. Ctrl-C at any point prints one line and returns 130, never a traceback."""
    _SIGINTS.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("ptfast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # A sign of life when the imports take a while (seconds in a fresh process; `import ptfast` itself imports no
    # torch); where torch is already loaded nothing is printed, and a usage error stays one line
    note = threading.Timer(0.3, lambda: print("ptfast: loading torch", file=sys.stderr, flush=True))
    note.daemon = True
    note.start()
    try:
        import torch
    finally:
        note.cancel()
    _check_interrupted()

    from . import bench

    try:
        device, cases, wanted = _check_args(args)
    except _UsageError as exc:
        return _fail(str(exc))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    use_compile = args.compile == "on" or (args.compile == "auto" and (device != "cpu" or args.grid == "full"))
    jobs = []
    for case in cases:
        providers = [
            p
            for p in bench.providers_for(case, device, compile=use_compile)
            if wanted is None or p in wanted or p == "peft"
        ]
        jobs.append((case, providers))
    n_timings = sum(len(providers) for _, providers in jobs)
    # First sign of life: what the run will do, before the slower steps (machine info loads peft, then parity).
    print(
        f"ptfast: {'' if args.no_parity else 'a parity check, then '}{_plural(len(jobs), 'case')} "
        f"({_plural(n_timings, 'timing')}, {_plural(args.repeats, 'round')} each) on {device}; progress below",
        file=sys.stderr,
        flush=True,
    )
    try:
        bench.require_peft()
    except bench.Unavailable as exc:  # installed but broken
        _check_interrupted()
        return _fail(str(exc))
    _check_interrupted()
    if device == "cpu" and any(c.dtype != "fp32" for c in cases):
        print(
            "note: low-precision dtypes on CPU are slow in both PEFT and ptfast; the CPU numbers are for fp32",
            file=sys.stderr,
        )

    bench.pin_allocator()
    info = bench.machine_info(device)
    print(bench.machine_line(info), flush=True)
    hint = _busy_hint(info, device, args.threads)
    if hint:
        print(hint, file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- parity
    parity_rows = []
    if not args.no_parity:
        for shape, dtype in dict.fromkeys((c.shape, c.dtype) for c in cases):
            try:
                r = bench.parity(shape, dtype, device)
            except bench.Unavailable as exc:
                return _fail(str(exc))
            parity_rows.append(r)
            for line in bench.parity_lines(r):
                print(line, flush=True)
        print(bench.PARITY_LEGEND)

    # ---------------------------------------------------------------- timing
    rows, skipped = [], {}
    interrupted = False
    t_start = time.perf_counter()
    try:
        _time_jobs(jobs, args, device, rows, skipped, t_start)
    except KeyboardInterrupt:  # Ctrl-C, or `timeout --signal=INT` in gpu_check.sh: keep what was measured
        print("ptfast: interrupted: reporting the rows measured so far", file=sys.stderr, flush=True)
        skipped.setdefault("interrupted", []).append("the remaining cases")
        interrupted = True
    bench.add_speedups(rows)
    elapsed = time.perf_counter() - t_start

    print()
    print(bench.format_table(rows))
    for why, which in skipped.items():
        print(f"skipped ({why}): {', '.join(which[:4])}{' ...' if len(which) > 4 else ''}")
    compile_notes = sorted({f"{r['id']}/{r['provider']}: {r['note']}" for r in rows if r.get("note")})
    for note in compile_notes:
        print(f"  {note}")
    n_cases = len({r["id"] for r in rows})
    print(
        f"timed {_plural(n_cases, 'case')} (the table's rows), {_plural(len(rows), 'timing')} (case x provider), "
        f"in {elapsed:.1f}s; {_plural(args.repeats, 'round')} each, median per call"
    )

    if args.out:
        payload = {
            "machine": info,
            "command": "python -m ptfast " + " ".join(argv if argv is not None else sys.argv[1:]),
            "repeats": args.repeats,
            "min_round_s": args.min_round_ms / 1e3,
            "parity": parity_rows,
            "results": rows,
            "skipped": skipped,
            "interrupted": interrupted,
        }
        _write_outputs(args.out, args.name or info["device_slug"], payload, rows, info)
    return EXIT_INTERRUPTED if interrupted else 0


def cli() -> None:
    """``python -m ptfast`` and the ``ptfast`` console script: exit with ``main()``'s code. After a Ctrl-C the process
    leaves at once with 130: Python's shutdown puts SIGINT back to its default, so a signal arriving then would end
    the process by signal instead."""
    code = main()
    if code == EXIT_INTERRUPTED:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
