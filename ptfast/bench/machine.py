"""Where the numbers come from: the device, its name, the versions, the git commit, and the allocator pinning."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from typing import Any

import torch

from .cases import Unavailable
from .floors import hbm_bytes_per_s


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``. Raises ``Unavailable`` for CUDA without CUDA."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise Unavailable(
                f"--device {device} was requested but {why} (torch {torch.__version__}); "
                "use --device cpu or --device auto"
            )
        return device
    if device == "cpu":
        return device
    raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")


def available_memory(device: str) -> tuple[int | None, str]:
    """``(bytes, what they are)`` a run on ``device`` can use, or ``(None, why unknown)``.

    CUDA: the free memory of the device (``torch.cuda.mem_get_info``). CPU: the physical memory
    (``SC_PAGE_SIZE x SC_PHYS_PAGES``; psutil is not a dependency), an upper bound of what is free.
    """
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), f"free on {device_name(device)}"
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "of physical memory"
    except (AttributeError, ValueError, OSError) as exc:
        return None, f"unknown ({exc})"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cores, threads = os.cpu_count(), torch.get_num_threads()
    return f"{cpu_name()} ({cores} core{'s' * (cores != 1)}, {threads} torch thread{'s' * (threads != 1)})"


def device_slug(device: str) -> str:
    """A file-name-safe device name, e.g. ``cpu-amd-epyc-2c`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.startswith("cuda"):
        name = "cuda-" + torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"cpu-{cpu_name()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


#: The folder that holds the ``ptfast`` package: a source checkout's root, or site-packages in an install.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git(args, cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(package_parent: str = PACKAGE_PARENT) -> str | None:
    """The commit of the checkout ptfast runs from (``+dirty`` with uncommitted changes to tracked files), or None.

    Only when ``package_parent`` is the top level of a git work tree, i.e. ptfast is run from its own checkout (or an
    editable install of it). An installed copy sitting somewhere inside another repository (a virtualenv in a
    project folder) would otherwise record that repository's HEAD.
    """
    toplevel = _git(["rev-parse", "--show-toplevel"], package_parent)
    if toplevel is None or os.path.realpath(toplevel) != os.path.realpath(package_parent):
        return None
    head = _git(["rev-parse", "HEAD"], package_parent)
    if not head:
        return None
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], package_parent)
    return head + ("+dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


_ALLOCATOR_PINNED: str | None = None


def pin_allocator() -> str | None:
    """Fix glibc malloc's mmap/trim thresholds at 256 MiB for the whole run, for every provider alike.

    glibc raises its mmap threshold dynamically as large blocks are freed, so whether a ~5 MB output (the B=8
    prompt rows) comes from the heap or from fresh, page-faulting mmap depends on what the process allocated
    before. That history differs between providers and made B=8 prompt rows swing by 2-3x (benchmarks/NOTES.md).
    Returns a description of what was set, or None where there is no glibc.
    """
    global _ALLOCATOR_PINNED
    if _ALLOCATOR_PINNED is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold, size = -1, -3, 256 << 20
            if libc.mallopt(m_mmap_threshold, size) == 1 and libc.mallopt(m_trim_threshold, size) == 1:
                _ALLOCATOR_PINNED = "glibc mmap/trim thresholds 256 MiB"
        except (OSError, AttributeError):
            pass
    return _ALLOCATOR_PINNED


def machine_info(device: str) -> dict[str, Any]:
    """Device, versions and load: stored with every result file."""
    from .. import __version__

    info = {
        "device": device,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "ptfast": __version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "hbm_bytes_per_s": hbm_bytes_per_s() if device.startswith("cuda") else None,
        "allocator": _ALLOCATOR_PINNED,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(info: dict[str, Any]) -> str:
    return f"{info['device_name']} | torch {info['torch']} | triton {info['triton'] or 'n/a'} | ptfast {info['ptfast']}"
