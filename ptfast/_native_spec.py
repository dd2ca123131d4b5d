"""What the C++ extension is built from: sources, flags and the build id. Standard library only.

``setup.py`` loads this file standalone (without the package, without torch) for the ahead-of-time build, and
``ptfast.native`` imports it for the JIT build, so both stamp the same build id into the library.
"""

from __future__ import annotations

import hashlib
import os

OP_NAME = "ptfast::prepend_prompts"
SOURCES = ("prepend_prompts.cpp",)
EXTRA_CFLAGS = ("-O3", "-fopenmp")  # at::parallel_for is header-inline OpenMP: without -fopenmp it runs serially
EXTRA_LDFLAGS = ("-fopenmp",)


def source_hash(src_dir: str, torch_version: str) -> str:
    """Build id: SHA-256 of the source files (names and bytes), the compile flags and the torch version."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0")
        with open(os.path.join(src_dir, name), "rb") as f:
            h.update(f.read() + b"\0")
    h.update(" ".join(EXTRA_CFLAGS + EXTRA_LDFLAGS).encode() + b"\0")
    h.update(torch_version.encode())
    return h.hexdigest()


def build_id_define(build_id: str) -> str:
    """The compiler flag that stamps ``build_id`` into the library (read back by ``ptfast.native.read_build_id``)."""
    return f"-DPTFAST_SOURCE_HASH={build_id}"
