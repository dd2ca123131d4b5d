"""A stand-in CUDA driver, so that Triton's real launch path runs on a machine without a GPU.

Host cost (everything the CPU does around a kernel launch) is what keeps small kernels from beating PyTorch's eager
path, and it can be measured without a GPU: with this driver active, ``kernel[grid](...)`` goes through Triton's
``JITFunction.run`` (binding, specialization, cache key), its real C launcher (argument parsing, pointer checks)
and ``cuLaunchKernelEx`` -- which here is a stub in a tiny ``libcuda.so.1`` that only counts launches and
records their grids. Kernels are compiled for real, for ``GPUTarget("cuda", 90, 32)``, by the ptxas in Triton's
wheel. Tensors stay on the CPU; nothing is computed.

    with stub_driver.active() as launches:
        fused_mlp_head(x, ...)          # CPU tensors, PTFAST_BACKEND=triton
    launches.count, launches.grids

Linux x86_64 with a C compiler only (Triton's own launcher is compiled the same way on a GPU machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import tempfile

__all__ = ["Launches", "active", "available", "unavailable_reason"]

# Every driver entry point Triton 3.x's driver.c calls; each succeeds. cuLaunchKernelEx records the launch.
_STUB_SOURCE = r"""
#include <stddef.h>
#include <string.h>
typedef struct { unsigned gx, gy, gz, bx, by, bz, smem; void *stream; void *attrs; unsigned nattrs; } launch_config;
typedef struct { int id; char pad[4]; int value; char rest[60]; } launch_attribute;

static long n_launches = 0;
static int last[8];  /* grid x, y, z, block x, cooperative */
static unsigned long long last_first_arg = 0;  /* the first kernel parameter, read as a pointer */

long ptfast_stub_launches(void) { return n_launches; }
void ptfast_stub_last(int *out) { memcpy(out, last, sizeof(last)); }
unsigned long long ptfast_stub_first_arg(void) { return last_first_arg; }

static int attribute(int attr) {
    switch (attr) {
    case 75: return 9;            /* compute capability 9.0: an H100 */
    case 76: return 0;
    case 16: return 132;          /* SMs */
    case 10: return 32;           /* warp size */
    case 12: return 65536;        /* registers per block */
    case 97: return 232448;       /* shared memory per block, opt-in */
    case 81: return 233472;       /* shared memory per SM */
    case 13: return 1755000;      /* clock, kHz */
    case 36: return 2619000;      /* memory clock, kHz */
    case 37: return 5120;         /* bus width, bits */
    default: return 1;
    }
}

int cuInit(unsigned flags) { return 0; }
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuDeviceGet(int *d, int ordinal) { *d = ordinal; return 0; }
int cuDeviceGetAttribute(int *v, int attr, int dev) { *v = attribute(attr); return 0; }
int cuDevicePrimaryCtxRetain(void **ctx, int dev) { *ctx = (void *)1; return 0; }
int cuCtxGetCurrent(void **ctx) { *ctx = (void *)1; return 0; }
int cuCtxSetCurrent(void *ctx) { return 0; }
int cuCtxGetDevice(int *d) { *d = 0; return 0; }
int cuCtxGetLimit(size_t *v, int limit) { *v = 0; return 0; }
int cuCtxSetLimit(int limit, size_t v) { return 0; }
int cuGetErrorString(int e, const char **s) { *s = "stub driver"; return 0; }
int cuModuleLoadData(void **m, const void *image) { *m = (void *)1; return 0; }
int cuModuleUnload(void *m) { return 0; }
int cuModuleGetFunction(void **f, void *m, const char *name) { *f = (void *)1; return 0; }
int cuFuncGetAttribute(int *v, int attr, void *f) { *v = attr == 0 ? 1024 : 0; return 0; }
int cuFuncSetAttribute(void *f, int attr, int v) { return 0; }
int cuFuncSetCacheConfig(void *f, int c) { return 0; }
int cuOccupancyMaxActiveClusters(int *n, void *f, const void *cfg) { *n = 1; return 0; }
int cuPointerGetAttribute(void *data, int attr, unsigned long long ptr) { return 0; }
int cuPointerGetAttributes(unsigned n, int *attrs, void **data, unsigned long long ptr) { return 0; }
int cuStreamIsCapturing(void *stream, int *status) { *status = 0; return 0; }
int cuTensorMapEncodeTiled(void) { return 0; }
int cuTensorMapEncodeIm2col(void) { return 0; }
int cuLaunchKernelEx(const launch_config *c, void *f, void **params, void **extra) {
    n_launches++;
    last_first_arg = params ? *(unsigned long long *)params[0] : 0;
    last[0] = c->gx; last[1] = c->gy; last[2] = c->gz; last[3] = c->bx; last[4] = 0;
    const launch_attribute *a = (const launch_attribute *)c->attrs;
    for (unsigned i = 0; i < c->nattrs; i++)
        if (a[i].id == 2 && a[i].value) last[4] = 1;   /* CU_LAUNCH_ATTRIBUTE_COOPERATIVE */
    return 0;
}
"""

_LIB: ctypes.CDLL | None = None
_REASON: str | None = None


def _load_stub() -> ctypes.CDLL | None:
    """Build the stub ``libcuda.so.1`` once per process and load it globally, so that Triton's ``dlopen`` and the
    link of its launcher find it (glibc reuses an already-loaded library with the same soname)."""
    global _LIB, _REASON
    if _LIB is not None or _REASON is not None:
        return _LIB
    try:
        import torch

        if torch.cuda.is_available():
            raise RuntimeError("a real CUDA driver is present; measure there instead")
        folder = tempfile.mkdtemp(prefix="ptfast-stub-cuda-")
        src = os.path.join(folder, "stub.c")
        lib = os.path.join(folder, "libcuda.so.1")
        with open(src, "w") as f:
            f.write(_STUB_SOURCE)
        cc = os.environ.get("CC", "cc")
        subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", src, "-o", lib],
            check=True,
            capture_output=True,
            text=True,
        )
        os.symlink(lib, os.path.join(folder, "libcuda.so"))  # what `-lcuda` looks for
        _LIB = ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        os.environ["TRITON_LIBCUDA_PATH"] = folder
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        _REASON = f"cannot build the stand-in CUDA driver: {detail.strip()[:300]}"
    return _LIB


def _driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StubCudaDriver(CudaDriver):
        """Triton's CUDA driver over the stub library: device 0, stream 0, an sm_90 target; torch stays on CPU."""

        def __init__(self):
            super().__init__()
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: (9, 0)
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        @staticmethod
        def is_active():
            return True

    return StubCudaDriver


def available() -> bool:
    """Whether the stand-in driver can be used here (Linux, a C compiler, Triton, no real GPU)."""
    from .. import _env

    if _env.interpreting():
        global _REASON
        _REASON = _REASON or "TRITON_INTERPRET is set: the interpreter replaces the launch path being measured"
        return False
    return _load_stub() is not None


def unavailable_reason() -> str | None:
    available()
    return _REASON


class Launches:
    """What the stub's ``cuLaunchKernelEx`` saw since this object was made."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        self._lib.ptfast_stub_launches.restype = ctypes.c_long
        self._start = self._lib.ptfast_stub_launches()

    @property
    def count(self) -> int:
        return self._lib.ptfast_stub_launches() - self._start

    def last(self) -> tuple[tuple[int, int, int], int, bool]:
        """(grid, threads per program, cooperative) of the latest launch."""
        out = (ctypes.c_int * 8)()
        self._lib.ptfast_stub_last(out)
        return (out[0], out[1], out[2]), out[3], bool(out[4])

    def last_first_pointer(self) -> int:
        """The first argument of the latest launch as the kernel received it (every ptfast kernel's first
        argument is a tensor's address)."""
        self._lib.ptfast_stub_first_arg.restype = ctypes.c_ulonglong
        return self._lib.ptfast_stub_first_arg()


@contextlib.contextmanager
def active():
    """Make the stand-in driver Triton's active driver, and let ptfast run its Triton kernels on CPU tensors."""
    from .. import _env

    if not available():
        raise RuntimeError(unavailable_reason())
    from triton.runtime import driver

    previous = driver._active
    driver.set_active(_driver_class()())
    token = _env.allow_triton_on_cpu(True)
    try:
        yield Launches(_LIB)
    finally:
        _env.allow_triton_on_cpu(token)
        driver._active = previous
