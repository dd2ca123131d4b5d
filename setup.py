"""setup.py: packaging metadata lives in pyproject.toml; this file adds two things.

1. ``build_py`` also copies the top-level ``csrc/`` C++ sources into the built package as ``ptfast/csrc/``, so a wheel
   (or a non-editable install) carries them and ``ptfast.native`` can JIT-build the extension from an installed
   package. Editable installs and checkouts read ``<repo>/csrc`` directly. (sdists get ``csrc/`` via MANIFEST.in.)

2. Opt-in ahead-of-time build of the C++ extension ``ptfast._C``::

       PTFAST_BUILD_EXT=1 pip install --no-build-isolation -e .     # or without -e

   ``--no-build-isolation`` is required: the extension links against libtorch and must be compiled against the
   very torch that will import it; an isolated build environment would download some other torch for the build.
   Without ``PTFAST_BUILD_EXT=1`` nothing is compiled at install time (the extension is JIT-built on first use).
   If the toolchain is missing or the build fails, a message is printed and the install goes on without ``_C``.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _say(msg: str) -> None:
    print(f"ptfast setup.py: {msg}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Ship ``csrc/*.cpp|h`` as package data ``ptfast/csrc/``."""

    def run(self):
        super().run()
        if os.path.isdir(CSRC) and not getattr(self, "editable_mode", False):
            target = os.path.join(self.build_lib, "ptfast", "csrc")
            self.mkpath(target)
            for name in sorted(os.listdir(CSRC)):
                if name.endswith((".cpp", ".h", ".hpp")):
                    self.copy_file(os.path.join(CSRC, name), os.path.join(target, name))


def _load_standalone(name: str):
    """A dependency-free module of the package, loaded by path: the package itself needs torch to import."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_ptfast_setup_{name}", os.path.join(HERE, "ptfast", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_env = _load_standalone("_env")  # every environment flag is read there


def _extension_kwargs() -> dict:
    if not _env.build_ext_requested():
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing: most likely build isolation is on
        _say(
            f"PTFAST_BUILD_EXT=1 but torch cannot be imported ({e}); install with --no-build-isolation. "
            "Skipping the ahead-of-time build; the extension will be JIT-built on first use."
        )
        return {}
    cxx = _env.cxx()
    if shutil.which(cxx.split()[0]) is None:
        _say(f"PTFAST_BUILD_EXT=1 but no C++ compiler was found (CXX={cxx!r}); skipping the ahead-of-time build.")
        return {}

    # The build id stamped into the library (ptfast/native.py skips a prebuilt _C whose id does not match the
    # sources and torch it runs with; the stamp also carries the source digest and torch version, so the id can be
    # checked against torch where the sources are missing).
    native = _load_standalone("_native_spec")
    build_id = native.source_hash(CSRC, torch.__version__)

    class OptionalBuildExtension(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - an optional extension never fails the install
                _say(
                    f"building ptfast._C failed ({type(e).__name__}: {e}); installing without it. "
                    "ptfast will JIT-build it on first use, or use its eager fallback."
                )

    ext = CppExtension(
        "ptfast._C",
        sources=[os.path.relpath(os.path.join(CSRC, s), HERE) for s in native.SOURCES],
        extra_compile_args=list(native.EXTRA_CFLAGS) + [native.stamp_define(CSRC, torch.__version__)],
        extra_link_args=list(native.EXTRA_LDFLAGS),
    )
    _say(f"building ptfast._C ahead of time against torch {torch.__version__} (build id {build_id[:16]})")
    return {
        "ext_modules": [ext],
        "cmdclass": {
            "build_py": BuildPyWithSources,
            "build_ext": OptionalBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None),
        },
    }


kwargs = {"cmdclass": {"build_py": BuildPyWithSources}}
kwargs.update(_extension_kwargs())
setup(**kwargs)
