"""What the C++ extension is built from: sources, flags and the build id. Standard library only.

``setup.py`` loads this file standalone (without the package, without torch) for the ahead-of-time build, and
``ptfast.native`` imports it for the JIT build, so both stamp the same build id into the library.

The stamp. Every library carries the string ``PTFAST_SRC_SHA256=<build id>_<source digest>_<torch hex>;``
(``csrc/prepend_prompts.cpp`` stringifies the bare token passed as ``-DPTFAST_SOURCE_HASH=...``; a token of hex
digits and underscores survives ninja's and setuptools' command lines unquoted):

- ``source digest``: SHA-256 of the source files and the compile flags;
- ``torch hex``: the torch version the library was compiled against, hex-encoded;
- ``build id``: SHA-256 of the digest and that torch version.

So a library can be checked without loading it, and without the sources: it may be loaded only where
``build_id(digest, <this torch version>)`` equals its stamped id (built for this torch) and, where the sources are
present, that id equals ``source_hash(sources, <this torch version>)`` too (built from these sources).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import NamedTuple

OP_NAME = "ptfast::prepend_prompts"
SOURCES = ("prepend_prompts.cpp", "table_check.cpp")
EXTRA_CFLAGS = ("-O3", "-fopenmp")  # at::parallel_for is header-inline OpenMP: without -fopenmp it runs serially
EXTRA_LDFLAGS = ("-fopenmp",)

STAMP_RE = re.compile(rb"PTFAST_SRC_SHA256=([0-9a-f]{64})(?:_([0-9a-f]{64})_((?:[0-9a-f]{2})+))?;")


class Stamp(NamedTuple):
    """The stamp read back from a library. ``digest`` and ``torch_version`` are None for a library built before
    they were stamped (such a library cannot be verified without the sources)."""

    build_id: str
    digest: str | None
    torch_version: str | None


def source_digest(src_dir: str) -> str:
    """SHA-256 of the source files (names and bytes) and the compile flags."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0")
        with open(os.path.join(src_dir, name), "rb") as f:
            h.update(f.read() + b"\0")
    h.update(" ".join(EXTRA_CFLAGS + EXTRA_LDFLAGS).encode())
    return h.hexdigest()


def build_id(digest: str, torch_version: str) -> str:
    """The build id of sources with ``digest`` compiled against ``torch_version``."""
    return hashlib.sha256(f"{digest}\0{torch_version}".encode()).hexdigest()


def source_hash(src_dir: str, torch_version: str) -> str:
    """Build id of the sources in ``src_dir`` for ``torch_version``."""
    return build_id(source_digest(src_dir), torch_version)


def stamp_define(src_dir: str, torch_version: str) -> str:
    """The compiler flag that stamps the build id, source digest and torch version into the library."""
    digest = source_digest(src_dir)
    return f"-DPTFAST_SOURCE_HASH={build_id(digest, torch_version)}_{digest}_{torch_version.encode().hex()}"


def read_stamp(path: str) -> Stamp | None:
    """The stamp of a compiled library, read from the file without loading it; None if it has none."""
    try:
        with open(path, "rb") as f:
            m = STAMP_RE.search(f.read())
    except OSError:
        return None
    if m is None:
        return None
    try:
        torch_version = bytes.fromhex(m.group(3).decode()).decode() if m.group(3) else None
    except ValueError:
        torch_version = None
    return Stamp(m.group(1).decode(), m.group(2).decode() if m.group(2) else None, torch_version)


def unverified_reason(stamp: Stamp | None, torch_version: str, expected: str | None) -> str | None:
    """Why a library with ``stamp`` must not be loaded under ``torch_version`` (None: it may be loaded).

    ``expected`` is the build id of the sources at hand, or None where there are no sources: the stamp is then
    checked against the torch version alone, through its digest.
    """
    if stamp is None:
        return "it carries no ptfast build id"
    if expected is not None:
        if stamp.build_id == expected:
            return None
        built_for = _built_for(stamp)
        if built_for is not None and built_for != torch_version:
            return f"it was built for torch {built_for}, this is torch {torch_version}"
        return "its build id does not match the C++ sources and torch of this environment"
    if stamp.digest is None:
        return "its build id cannot be verified without the C++ sources (it records no source digest)"
    if build_id(stamp.digest, torch_version) == stamp.build_id:
        return None
    built_for = _built_for(stamp)
    if built_for is not None:
        return f"it was built for torch {built_for}, this is torch {torch_version}"
    return f"its build id does not match torch {torch_version}"


def _built_for(stamp: Stamp) -> str | None:
    """The torch version the stamp names, if the stamp is self-consistent (otherwise it is not to be quoted)."""
    if stamp.digest and stamp.torch_version and build_id(stamp.digest, stamp.torch_version) == stamp.build_id:
        return stamp.torch_version
    return None
