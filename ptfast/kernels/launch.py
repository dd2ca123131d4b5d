"""Launching a compiled Triton kernel without ``JITFunction.run`` on every call.

``kernel[grid](*args, **constexprs)`` binds the arguments, specializes each one, builds a cache key and looks the
binary up before it launches: several microseconds of Python per launch, more than a small kernel runs on the GPU.
A :class:`Launcher` holds one kernel with fixed compile-time constants, grid and launch options (what a launch plan
decides) and calls Triton's JIT once per argument specialization; after that it hands the arguments, tensors as
their addresses, straight to the compiled kernel's C launcher (:class:`_Binary`).

What the JIT would specialize on must be in the key, or a binary compiled for other arguments would run:
* dtypes, and integer arguments (``== 1``, ``% 16 == 0``) that follow from the plan's shapes, key the plan that owns
  the launcher; integers that vary between its calls (``int_slots``) key the compiled kernels;
* pointer alignment (``data_ptr() % 16``) can change from call to call (a view at an offset): each launch checks
  it, and only calls whose tensors are all 16-byte aligned (what the allocator returns) launch directly;
* the device: a compiled kernel's function handle belongs to one device.
Under the interpreter, with launch hooks installed (profilers such as proton), or with a Triton whose compiled
kernels lack the launcher this uses, every launch goes through ``kernel[grid]``.

``Launcher.bind`` goes one step further for a caller that launches the same tensors again and again: every argument
is fixed once (``BoundLaunch``), and a launch swaps in the addresses that change (the table cache's refresh: a new
output; a prepared train step: its new outputs and gradients).
"""

from __future__ import annotations

import types

import torch

__all__ = ["Launcher", "BoundLaunch"]


_RUNTIME = None


def _triton_runtime():
    global _RUNTIME
    if _RUNTIME is None:
        import triton
        from triton.runtime import driver

        try:
            from triton import knobs
        except ImportError:  # pragma: no cover - Triton < 3.4: the JIT path only
            knobs = None
        _RUNTIME = (triton, driver, knobs)
    return _RUNTIME


def _hooks_installed(knobs) -> bool:
    """Whether a launch hook is set: Triton's default hooks are empty ``HookChain`` objects (their ``calls``),
    a user's may be any callable."""
    runtime = knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(exit_, "calls", exit_))


class _Binary:
    """One compiled kernel, launched through Triton's C launcher with the pointer arguments already as integers.

    ``CompiledKernel.run`` is a Python wrapper (``CudaLauncher.__call__``) that builds closures and checks for
    scratch allocators on every launch, and its C launcher calls ``data_ptr()`` and ``cuPointerGetAttribute`` for each
    tensor; here the C launcher gets integers, which it takes as device pointers as they are (the ops validated the
    tensors' devices before any launch). Every attribute the direct call relies on is checked, failing closed: when
    the kernel needs what only the wrapper provides (global or profile scratch, sanitizer state, tensor
    descriptors), or the launcher is not Triton's CUDA one, every launch goes through ``kernel.run``; so does every
    launch after the C launcher refused the call (another Triton's argument layout: it raises before launching).
    """

    __slots__ = ("kernel", "run", "c_launch", "fixed", "annotations", "signature")

    def __init__(self, kernel):
        self.kernel = kernel
        run = kernel.run
        self.run = run
        self.c_launch = None
        self.annotations = getattr(run, "arg_annotations", None)
        self.signature = getattr(run, "kernel_signature", None)
        if (
            isinstance(getattr(run, "launch", None), types.BuiltinFunctionType)  # no tensordesc wrapper around it
            and getattr(run, "global_scratch_size", 1) == 0
            and getattr(run, "profile_scratch_size", 1) == 0
            and not getattr(run, "gsan_enabled", False)  # absent before Triton had the sanitizer
            and self.annotations is not None
            and self.signature is not None
            and hasattr(run, "launch_cooperative_grid")
            and hasattr(run, "launch_pdl")
        ):
            self.c_launch = run.launch
            # the arguments of every launch of this kernel
            self.fixed = (
                kernel.function,
                bool(run.launch_cooperative_grid),
                bool(run.launch_pdl),
                kernel.packed_metadata,
            )

    def __call__(self, grid, stream: int, args: list) -> None:
        if self.c_launch is not None:
            function, cooperative, pdl, metadata = self.fixed
            try:
                self.c_launch(
                    grid[0], grid[1], grid[2], stream, function, cooperative, pdl, metadata,
                    None, None, None, None, None, self.annotations, self.signature, args,
                )  # fmt: skip
                return
            except TypeError:  # the argument layout of another Triton's launcher: nothing was launched
                self.c_launch = None
        k = self.kernel
        self.run(grid[0], grid[1], grid[2], stream, k.function, k.packed_metadata, None, None, None, *args)


class Launcher:
    """``launcher(*args)`` launches ``fn[grid](*args, **constexprs, **options)``; ``args`` are the kernel's
    runtime arguments in signature order (the constexprs come after them in every ptfast kernel)."""

    __slots__ = ("fn", "grid", "constexprs", "options", "tail", "tensor_slots", "int_slots", "compiled", "direct")

    def __init__(
        self,
        fn,
        grid: tuple[int, ...],
        constexprs: dict,
        *,
        num_warps: int,
        num_stages: int,
        cooperative: bool = False,
        int_slots: tuple[int, ...] = (),
    ):
        """``int_slots``: positions of integer arguments that may change between calls of this launcher and that
        the JIT specializes (``== 1``, ``% 16 == 0``); they join the key of the compiled kernels."""
        triton, _, knobs = _triton_runtime()
        self.fn = fn
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexprs = dict(constexprs)
        self.options = dict(num_warps=num_warps, num_stages=num_stages)
        if cooperative:
            self.options["launch_cooperative_grid"] = True
        params = getattr(fn, "params", None)
        # The constexpr values, in signature order, follow the runtime arguments in the compiled kernel's call.
        if params is not None:
            names = [p.name for p in params if p.is_constexpr]
            self.tail = tuple(self.constexprs[n] for n in names)
        else:  # the interpreter's wrapper
            self.tail = ()
        self.tensor_slots: tuple[int, ...] = ()
        self.int_slots = tuple(int_slots)
        self.compiled: dict[tuple, _Binary] = {}
        self.direct = knobs is not None and params is not None and isinstance(fn, triton.runtime.JITFunction)

    def __call__(self, *args):
        self.launch(self.grid, args)

    def _compiled_for(self, args: tuple) -> tuple:
        """``(device, key, values, binary)``: the current device, the compiled-kernel key of ``args``, ``args``
        with tensors as their addresses, and the compiled kernel that launches them directly now (``values`` then
        end with the constexprs), or None: not compiled for this key yet, a tensor not 16-byte aligned (a view at an
        odd offset: the JIT compiles or finds the binary for it), or a launch hook installed."""
        _, driver, knobs = _triton_runtime()
        device = driver.active.get_current_device()
        values = list(args)
        addresses = 0
        for i in self.tensor_slots:
            ptr = values[i] = args[i].data_ptr()
            addresses |= ptr
        key = (device, *[(args[i] == 1, args[i] % 16 == 0) for i in self.int_slots]) if self.int_slots else device
        binary = self.compiled.get(key) if addresses % 16 == 0 else None
        if binary is None or _hooks_installed(knobs):
            return device, key, values, None
        values += self.tail
        return device, key, values, binary

    def bind(self, args: tuple) -> BoundLaunch | None:
        """These arguments, tensors as their addresses, for later launches on the current device through the
        compiled kernel (``BoundLaunch``); None unless ``launcher(*args)`` would launch that way now (a warmed-up
        launcher, no launch hook installed, 16-byte aligned tensors)."""
        if not self.direct or not self.tensor_slots:
            return None
        device, _, values, binary = self._compiled_for(args)
        return None if binary is None else BoundLaunch(binary, self.grid, device, values)

    def launch(self, grid: tuple[int, int, int], args: tuple) -> None:
        """Launch on ``grid`` (three dimensions) instead of the plan's."""
        if not self.direct:
            self.fn[grid](*args, **self.constexprs, **self.options)
            return
        device, key, values, binary = self._compiled_for(args)
        if binary is not None:
            binary(grid, _RUNTIME[1].active.get_current_stream(device), values)
            return
        kernel = self.fn[grid](*args, **self.constexprs, **self.options)
        if not self.tensor_slots:
            self.tensor_slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        addresses = 0
        for i in self.tensor_slots:
            addresses |= args[i].data_ptr()
        if (
            addresses % 16 == 0
            and key not in self.compiled  # launched through the JIT only because a hook is installed
            and hasattr(kernel, "packed_metadata")
            and hasattr(kernel, "run")
        ):
            self.compiled[key] = _Binary(kernel)


class BoundLaunch:
    """One compiled kernel with its arguments fixed (``Launcher.bind``): a launch only swaps some addresses in (the
    outputs, and what else is new at every call).

    The tensors behind the addresses must outlive it; whoever binds keeps them (or their storages).
    """

    __slots__ = ("binary", "grid", "device", "values")

    def __init__(self, binary: _Binary, grid: tuple[int, int, int], device: int, values: list):
        self.binary, self.grid, self.device, self.values = binary, grid, device, values

    def launch_with(self, slots: tuple[int, ...], addresses: tuple[int, ...], stream: int) -> bool:
        """Launch with ``addresses[i]`` as argument ``slots[i]`` on ``stream``; False (nothing launched) when the
        current device is not the bound one or a launch hook has been installed since (the caller then launches
        through its ``Launcher``)."""
        _, driver, knobs = _triton_runtime()
        if driver.active.get_current_device() != self.device or _hooks_installed(knobs):
            return False
        values = self.values.copy()  # the list is shared by every launch (and thread) of this binding
        for slot, address in zip(slots, addresses):
            values[slot] = address
        self.binary(self.grid, stream, values)
        return True
