"""ptfast's C++ extension (``csrc/``): lazy build, load, and fallback.

The extension registers ``torch.ops.ptfast.prepend_prompts`` (CPU and Meta kernels) and is also a Python module
whose ``table_current`` checks a table cache hit in one call (``csrc/table_check.cpp``, ``ptfast._cache``). Nothing
here runs at ``import ptfast``: the library is loaded (and, if needed, compiled) the first time a CPU
``prepend_prompts`` call or ``native_available()`` asks for it; the table cache loads it only where that takes no
compile (``table_check_module``), and otherwise checks hits in Python.

Where the library comes from, in order:

1. Already registered in this process (e.g. loaded by hand): used as is.
2. Prebuilt: ``ptfast/_C*.so``, made by ``PTFAST_BUILD_EXT=1 pip install --no-build-isolation .`` (see setup.py).
   Used only if the build id stamped into it (see ``_native_spec``: a SHA-256 of the C++ sources, the flags and
   the torch version, read from the file without loading it) matches the sources and torch of this environment;
   a stale one is skipped (logged at INFO level) and the JIT build below is used instead. Where the sources are
   missing, the stamp's source digest still lets its id be checked against this torch; a library whose id cannot
   be verified is never loaded (an ABI mismatch can crash the process instead of raising).
3. JIT: ``torch.utils.cpp_extension.load`` compiles ``csrc/prepend_prompts.cpp`` with ninja into
   ``<torch extensions dir>/ptfast_native_<build id>/`` and caches it there; later processes load the cached
   ``.so`` directly (no compiler needed). The build id is part of the name, so a torch upgrade or a source change
   builds a new library instead of loading a stale one. The first compile prints one line on stderr (what is
   built, where, and how to build it ahead of time); loading a cached build prints nothing. A cached ``.so`` that
   does not load (a corrupt file, a link interrupted after it wrote the stamp) is removed and rebuilt once, with
   its objects, under the process lock below; if the rebuilt one does not load either, ptfast falls back.

Concurrent first uses (several processes / ranks at once): torch's own guard is a ``FileBaton`` (an ``O_EXCL`` lock
file), which does serialize processes, but a builder that dies mid-compile leaves the lock file behind and every
later process then waits forever. So the build runs under an ``fcntl.flock`` on ``ptfast.flock`` in the build
directory (released by the kernel when its holder dies); whoever holds it first re-checks for a finished ``.so``
and removes a stale torch baton before building. Threads of one process serialize on a lock here.

Sources: the C++ files are looked up in ``ptfast/csrc/`` (wheel installs: setup.py's ``build_py`` copies the
top-level ``csrc/`` there) and then in ``<repo>/csrc/`` (editable installs and source checkouts).

Fallback: if the extension cannot be had (switched off, no compiler, no ninja, no sources, build or load failure),
ONE ``NativeFallbackWarning`` naming the cause is issued per process and the eager PyTorch implementation is used;
its results are bit-for-bit the same (both are pure copies).

Environment switches
--------------------
``PTFAST_NO_NATIVE=1``
    Never build or load the extension; CPU calls use the eager implementation and ``native_available()`` returns
    False. Read at call time (no warning is issued for this deliberate choice).
``PTFAST_BACKEND=auto|eager|triton``
    (read by ``ptfast.ops.prepend`` at call time; same switch and values as ``fused_mlp_head``) ``eager`` forces
    the eager implementation everywhere; ``triton`` forces the Triton kernel (CPU tensors need
    ``TRITON_INTERPRET=1``). Default ``auto``: CUDA -> Triton, CPU/Meta -> native if available, else eager.
``PTFAST_BUILD_VERBOSE=1``
    Show the compiler and ninja output of the JIT build.
``PTFAST_BUILD_EXT=1``
    Install time only (setup.py): build ``ptfast._C`` ahead of time. Needs ``--no-build-isolation`` so the
    extension is compiled against the torch that will import it.
``TORCH_EXTENSIONS_DIR``, ``CXX``, ``MAX_JOBS``
    torch's own: where JIT builds are cached (default ``~/.cache/torch_extensions/<py>_<cpu|cuXXX>``), the C++
    compiler (default ``c++``), ninja's parallelism.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import threading
import time
import warnings

import torch

from . import _env
from . import _native_spec as _spec

__all__ = ["native_available", "native_status", "NativeFallbackWarning", "OP_NAME", "source_hash"]

logger = logging.getLogger("ptfast.native")

OP_NAME = _spec.OP_NAME
SOURCES = _spec.SOURCES
EXTRA_CFLAGS = _spec.EXTRA_CFLAGS
EXTRA_LDFLAGS = _spec.EXTRA_LDFLAGS
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


class NativeFallbackWarning(RuntimeWarning):
    """The C++ extension is unavailable; ptfast uses its eager PyTorch implementation (same results, slower)."""


native_disabled = _env.native_disabled  # ``PTFAST_NO_NATIVE`` is set (read now)


def source_dir() -> str | None:
    """The directory holding the C++ sources: ``ptfast/csrc`` (installed wheel) or ``<repo>/csrc`` (checkout)."""
    for d in (os.path.join(_PKG_DIR, "csrc"), os.path.join(os.path.dirname(_PKG_DIR), "csrc")):
        if all(os.path.isfile(os.path.join(d, s)) for s in SOURCES):
            return d
    return None


def source_hash(src_dir: str, torch_version: str | None = None) -> str:
    """Build id of the sources in ``src_dir`` for ``torch_version`` (default: this torch); see ``_native_spec``."""
    return _spec.source_hash(src_dir, torch_version or torch.__version__)


def read_build_id(path: str) -> str | None:
    """The build id stamped into a compiled library, read from the file without loading it."""
    stamp = _spec.read_stamp(path)
    return stamp.build_id if stamp else None


def _op_registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CPU")
    except Exception:  # pragma: no cover - very old torch / unknown op name
        return False


# ------------------------------------------------------------------------------------------------ state
_lock = threading.Lock()
_status: dict | None = None  # set once per process by _ensure_loaded


class _Unavailable(Exception):
    """Why the extension cannot be used; its message is the cause shown in the warning."""


class _NotBuilt(Exception):
    """A load that must not compile (``_ensure_loaded(build=False)``) found nothing built."""


def _prebuilt_candidates() -> list:
    out = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        out += glob.glob(os.path.join(_PKG_DIR, "_C" + suffix))
    return sorted(set(out))


def _try_prebuilt(expected: str | None) -> tuple:
    """Load the first installed ``_C`` whose stamp verifies against ``expected`` (the build id of the sources at
    hand) or, with no sources (``expected=None``), against this torch. Returns (path or None, reasons why each
    candidate was not used)."""
    reasons = []
    for path in _prebuilt_candidates():
        why = _spec.unverified_reason(_spec.read_stamp(path), torch.__version__, expected)
        if why is None:
            try:
                torch.ops.load_library(path)
                return path, reasons
            except Exception as e:  # e.g. a corrupt file
                why = f"it does not load ({_one_line(e, innermost=True)})"
        logger.info("ptfast: not loading prebuilt %s: %s", path, why)
        reasons.append(f"{path}: {why}")
    return None, reasons


def _one_line(e: BaseException, innermost: bool = False) -> str:
    """An exception as one line (its last three lines); ``innermost``: that of its root cause instead
    (``torch.ops.load_library`` wraps the dlopen error in one that names only the path)."""
    while innermost and e.__cause__ is not None:
        e = e.__cause__
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {' | '.join(lines[-3:])}" if lines else type(e).__name__


def _build_dir(name: str) -> str:
    """torch's layout: ``$TORCH_EXTENSIONS_DIR/<name>`` or ``~/.cache/torch_extensions/<py>_<cpu|cuXXX>/<name>``."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # private helper moved: same layout by hand, without the accelerator tag
        root = _env.torch_extensions_dir() or cpp_extension.get_default_build_root()
        return os.path.join(os.path.expanduser(root), name)


@contextlib.contextmanager
def _process_lock(build_dir: str):
    """Exclusive across processes (flock, freed by the kernel if the holder dies); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: torch's baton alone
        yield
        return
    fd = os.open(os.path.join(build_dir, "ptfast.flock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


AOT_HINT = "PTFAST_BUILD_EXT=1 pip install --no-build-isolation -e ."


def _file_signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _jit_build(src_dir: str, build_id: str, build: bool = True) -> tuple:
    """Load the cached JIT library, building it first if needed. Returns (path, seconds spent building or None).

    A cached library with the right id that does not load is removed and rebuilt once, under the process lock.
    ``build=False``: load a cached library only; raise ``_NotBuilt`` where that would take a compile.
    """
    name = f"ptfast_native_{build_id[:16]}"
    try:
        build_dir = _build_dir(name)  # creates it
    except OSError as e:
        raise _Unavailable(f"cannot create the torch extensions directory ({e})") from e
    so_path = os.path.join(build_dir, name + ".so")

    broken = None  # (file signature, cause) of a cached library with the right id that did not load
    if read_build_id(so_path) == build_id:
        signature = _file_signature(so_path)
        try:  # fast path: a finished build from an earlier process; needs no compiler
            torch.ops.load_library(so_path)
            return so_path, None
        except Exception as e:
            broken = (signature, _one_line(e, innermost=True))
            logger.info("ptfast: cached %s does not load (%s)", so_path, broken[1])
    if not build:
        raise _NotBuilt

    from torch.utils import cpp_extension

    unusable = f"the cached {so_path} does not load ({broken[1]}) and it cannot be rebuilt: " if broken else ""
    cxx = _env.cxx()
    if shutil.which(cxx.split()[0]) is None:
        raise _Unavailable(f"{unusable}no C++ compiler found (CXX={cxx!r} is not on PATH)")
    if not cpp_extension.is_ninja_available():
        raise _Unavailable(f"{unusable}ninja is not installed (pip install ninja)")
    try:
        os.makedirs(build_dir, exist_ok=True)
    except OSError as e:
        raise _Unavailable(f"cannot create the build directory {build_dir} ({e})") from e

    with _process_lock(build_dir):
        # Someone else may have finished (or replaced the broken library) while we waited for the lock.
        if read_build_id(so_path) == build_id and (broken is None or _file_signature(so_path) != broken[0]):
            signature = _file_signature(so_path)
            try:
                torch.ops.load_library(so_path)
                return so_path, None
            except Exception as e:
                broken = (signature, _one_line(e, innermost=True))
                logger.info("ptfast: cached %s does not load (%s); rebuilding it", so_path, broken[1])
        if broken is not None:  # rebuild from scratch: an object file may be as corrupt as the library
            for stale in glob.glob(os.path.join(build_dir, "*.o")):
                os.remove(stale)
        if os.path.isfile(so_path):
            os.remove(so_path)  # unloadable, stale or from an interrupted link: force ninja to relink
        baton = os.path.join(build_dir, "lock")
        if os.path.exists(baton):  # we hold the flock, so no live ptfast builder owns it
            logger.info("ptfast: removing stale torch build lock %s", baton)
            os.remove(baton)
        what = (
            f"rebuilding its C++ extension in {build_dir}, the cached library does not load ({broken[1]})"
            if broken
            else f"compiling its C++ extension ({OP_NAME}) into {build_dir}, once per torch version (~10-20 s)"
        )
        print(f"ptfast: {what}. To build it ahead of time instead: {AOT_HINT}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            cpp_extension.load(  # compiles, links, then loads the library
                name=name,
                sources=[os.path.join(src_dir, s) for s in SOURCES],
                extra_cflags=list(EXTRA_CFLAGS) + [_spec.stamp_define(src_dir, torch.__version__)],
                extra_ldflags=list(EXTRA_LDFLAGS),
                build_directory=build_dir,
                verbose=_env.build_verbose(),
                is_python_module=False,
            )
        except Exception as e:
            if read_build_id(so_path) == build_id:  # we removed it above: this one was linked just now
                again = " either" if broken else ""
                cause = _one_line(e, innermost=True)
                raise _Unavailable(f"the freshly built {so_path} does not load{again} ({cause})") from e
            raise _Unavailable(f"building the C++ extension failed: {_one_line(e)}") from e
        return so_path, time.perf_counter() - t0


def _ensure_loaded(build: bool = True) -> bool:
    """Load the extension once per process (see the module docstring); whether it is available.

    ``build=False`` (the cache's hit check, which must never start a compile): when loading would take a compile,
    return False and record nothing, so a later call that may build still does.
    """
    global _status
    if _status is not None:
        return _status["available"]
    # build=False: a cached forward must not wait out another thread's compile (it tries again at its next entry)
    if not _lock.acquire(blocking=build):
        return False
    try:
        if _status is not None:
            return _status["available"]
        status = {"available": False, "source": None, "path": None, "error": None, "build_seconds": None}
        t0 = time.perf_counter()
        try:
            if _op_registered():
                status.update(available=True, source="preloaded")
            else:
                src_dir = source_dir()
                build_id = source_hash(src_dir) if src_dir else None
                path, skipped = _try_prebuilt(build_id)
                if path is not None:
                    status.update(available=True, source="prebuilt", path=path)
                elif src_dir is None:
                    found = "; ".join(skipped) if skipped else "none is installed"
                    raise _Unavailable(
                        "the C++ sources were not found (looked in ptfast/csrc and <repo>/csrc) and no prebuilt "
                        f"ptfast._C verified against torch {torch.__version__} can be loaded ({found})"
                    )
                else:
                    path, secs = _jit_build(src_dir, build_id, build)
                    status.update(available=True, source="jit", path=path, build_seconds=secs)
            if not _op_registered():
                raise _Unavailable(f"the library loaded but {OP_NAME} has no CPU kernel")
        except _NotBuilt:
            return False
        except Exception as e:
            if not build:
                return False  # the next call that may build reports it
            cause = str(e) if isinstance(e, _Unavailable) else f"{type(e).__name__}: {e}"
            logger.debug("ptfast: native extension unavailable", exc_info=True)
            status.update(available=False, source=None, error=cause)
            warnings.warn(
                f"ptfast: C++ extension unavailable ({cause}); using the eager PyTorch implementation of "
                "prepend_prompts (identical results, slower). Set PTFAST_NO_NATIVE=1 to silence this.",
                NativeFallbackWarning,
                stacklevel=3,
            )
        status["load_seconds"] = time.perf_counter() - t0
        _status = status
        return status["available"]
    finally:
        _lock.release()


_check_module = None  # the library imported as a Python module (its cache check), once loaded
_NOT_LOOKED = object()
_check_looked_at = _NOT_LOOKED  # the _status under which no module could be had: not looked for again until it changes


def table_check_module():
    """The extension as a Python module (``csrc/table_check.cpp``: the cache's hit check), or None.

    Never compiles: the library is used once it is loaded (by ``prepend_prompts``, ``native_available()``) or
    loadable without a build (prebuilt, or a JIT build cached by an earlier process); until then the cache checks
    in Python. None under ``PTFAST_NO_NATIVE=1``, and for a library loaded by hand (no path to import it from).
    """
    global _check_module, _check_looked_at
    if native_disabled():
        return None
    if _check_module is not None:
        return _check_module
    if _status is _check_looked_at:
        return None
    module = None
    if _status is not None or _ensure_loaded(build=False):
        module = _import_module(_status)
    if module is None:
        _check_looked_at = _status
    else:
        _check_module = module
    return module


def _import_module(status: dict) -> object | None:
    if not status["available"] or status["path"] is None:
        return None
    path = status["path"]
    # The name its PyInit function was compiled with: TORCH_EXTENSION_NAME, the JIT build's name or setup.py's _C.
    name = "ptfast._C" if status["source"] == "prebuilt" else os.path.basename(path).partition(".")[0]
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # not expected (the build id covers the sources): the cache checks in Python
        logger.info("ptfast: %s does not import as a module (%s)", path, _one_line(e))
        return None
    return module


def native_available() -> bool:
    """Whether CPU calls of ``prepend_prompts`` run the C++ extension.

    The first call loads the extension, compiling it if there is no cached build (tens of seconds, once per
    machine); a failure issues one ``NativeFallbackWarning`` and returns False. ``PTFAST_NO_NATIVE=1`` makes it
    return False without loading anything.
    """
    if native_disabled():
        return False
    return _ensure_loaded()


def native_status() -> dict:
    """Details of the load attempt: ``available``, ``source`` (``"prebuilt"``, ``"jit"``, ``"preloaded"``),
    ``path``, ``error`` (the fallback cause), ``build_seconds`` (compile time if this process compiled it),
    ``load_seconds``, ``disabled`` (``PTFAST_NO_NATIVE``). Triggers the load like ``native_available()`` unless
    disabled."""
    if native_disabled():
        base = (
            dict(_status)
            if _status is not None
            else {"available": False, "source": None, "path": None, "error": None, "build_seconds": None}
        )
        base.update(available=False, disabled=True)
        return base
    _ensure_loaded()
    return dict(_status, disabled=False)
