"""When a computed virtual-token table is still valid: snapshots of what it depends on, and the table cache.

A :class:`Snapshot` records, when a table is computed, everything that can change the result:

* global state: a structure generation (bumped by PyTorch's global registration hooks whenever a module that
  some snapshot depends on gets a module, parameter or buffer assigned), a count of ``torch.optim`` steps (fused
  optimizer kernels do not bump version counters), the autocast state, the fp32 matmul precision settings and the
  ``PTFAST_BACKEND`` choice;
* every parameter's and buffer's version counter (optimizer steps, ``load_state_dict``, in-place edits, running
  statistics) and memory address (``.half()`` / ``.to()`` on a submodule, which the encoder's ``_apply`` does not
  see, and ``p.data = t`` replace the memory without bumping the counter);
* the ``training`` flag of every module whose output can depend on it (anything but the stateless layers of
  PEFT's head);
* the forward hooks of the head's modules and the process-wide module forward hooks.

``is_current()`` re-reads only these, so a hit costs a few attribute reads instead of a walk over the module
tree. What none of these sees is listed in the README: in-place writes through ``.data``, ``del`` of a submodule
or parameter, and optimizers that bypass ``Optimizer.step``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from operator import attrgetter

import torch
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _env

__all__ = ["Snapshot", "TableCache", "global_state"]

_structure_generation = 0
_optimizer_steps = 0
_hooks_installed = False

# Layers whose forward ignores ``training``: their flag is left out of the key (PEFT's head is made of these).
_MODE_FREE = (nn.Linear, nn.ReLU, nn.Sequential, nn.Embedding, nn.Identity, nn.GELU, nn.Tanh, nn.SiLU)
_version_of = attrgetter("_version")
_address_of = torch.Tensor.data_ptr


# Every module some snapshot depends on. Registrations on other modules (building an unrelated model) do not
# invalidate anything.
_tracked: weakref.WeakSet[nn.Module] = weakref.WeakSet()


# (weakref to the root, generation) of the last tree added to _tracked. The same live root at the same generation
# is the same tree (any registration in it would have bumped the generation), so it need not be added again: a
# WeakSet add costs a weakref per module, a tenth of a cache miss at the seed shape. A weakref, so that a deleted
# encoder's weights are not kept alive here.
_tracked_at = (None, -1)


def _track(modules: list) -> None:
    global _tracked_at
    root_ref, generation = _tracked_at
    if generation == _structure_generation and root_ref is not None and root_ref() is modules[0]:
        return
    _tracked.update(modules)
    _tracked_at = (weakref.ref(modules[0]), _structure_generation)


def _bump_structure(module, *_args) -> None:
    global _structure_generation
    if module in _tracked:
        _structure_generation += 1


def _count_optimizer_step(*_args) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _install_hooks() -> None:
    """Registered once, when the first table is cached, so importing ptfast changes nothing global."""
    global _hooks_installed
    if _hooks_installed:
        return
    _module_globals.register_module_module_registration_hook(_bump_structure)
    _module_globals.register_module_parameter_registration_hook(_bump_structure)
    _module_globals.register_module_buffer_registration_hook(_bump_structure)
    register_optimizer_step_post_hook(_count_optimizer_step)
    _hooks_installed = True


def _autocast_state() -> tuple | None:
    cpu, cuda = torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
    return (torch.get_autocast_dtype("cpu") if cpu else None, torch.get_autocast_dtype("cuda") if cuda else None)


_backend_key = _env.backend_key
# The new precision API's getter never raises on mixed legacy/new settings; torch before 2.9 has only the legacy
# flags, read through the public getter there. Both are private C entry points only for speed on the hit path.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
if hasattr(torch._C, "_get_fp32_precision_getter"):
    _fp32_precision = torch._C._get_fp32_precision_getter
else:  # pragma: no cover - torch < 2.9: one setting, which allow_tf32 and set_float32_matmul_precision both write

    def _fp32_precision(backend: str, op: str) -> str:
        return torch.get_float32_matmul_precision()


def global_state() -> tuple:
    """The process-wide inputs of a table: changes anywhere, autocast, matmul precision, backend choice."""
    return (
        _structure_generation,
        _optimizer_steps,
        _any_autocast() and _autocast_state(),
        _fp32_precision("cuda", "matmul"),
        _fp32_precision("generic", "all"),
        _backend_key(),
    )


def _global_hook_dicts() -> list:
    return [_module_globals._global_forward_hooks, _module_globals._global_forward_pre_hooks]


def _hook_signature(dicts: list) -> list:
    # A registration adds the next (largest) handle id and a removal shortens the dict: length plus last key
    # tells a different set of hooks from the old one.
    return [(len(d), next(reversed(d))) if d else 0 for d in dicts]


def _storages(tensors: list) -> list:
    """The memory of ``tensors``, held by a snapshot so that no other tensor can be allocated at a recorded address
    while the snapshot lives: after ``p.data = t`` freed the old memory, a later ``p.data = u`` could otherwise
    land at the recorded address and look unchanged. (Memory a replaced tensor left stays allocated until the next
    call retakes the snapshot.)"""
    storages = []
    for t in tensors:
        if t.data_ptr() == 0 and t.numel():  # a wrapper subclass (FSDP's DTensor, say): no memory of its own
            raise RuntimeError("a tensor without memory of its own cannot be tracked")
        storages.append(t.untyped_storage())
    return storages


class Snapshot:
    """What a table computed from ``root`` depends on; ``is_current()`` says whether it still holds."""

    __slots__ = ("recorded", "tensors", "storages", "moded", "hook_dicts", "modules", "params")

    @classmethod
    def take(
        cls, root: nn.Module, *, with_modes: bool = True, like: Snapshot | None = None, reading: tuple | None = None
    ) -> Snapshot | None:
        """``None`` when ``root`` holds tensors without version counters (made under ``inference_mode``) or without
        memory of their own (wrapper subclasses): nothing can tell whether such a table is current.

        ``like``: an earlier snapshot of the same ``root``. While no module, parameter or buffer has been
        registered anywhere in the tree since (the structure generation is unchanged), its lists of modules and
        tensors still describe the tree, and only the values are read again: a miss after an optimizer step
        costs no walk. ``reading``: what the lookup that missed read, from whatever snapshot was cached then; the
        caller passes it only when it was read in the current structure generation, where every snapshot of the
        tree lists the same tensors, modules and hook dicts, so it is a reading of ``like``'s lists.
        """
        if (
            like is not None
            and like.modules[0] is root
            and like.recorded[0][0] == _structure_generation
            and bool(like.moded) == with_modes
        ):
            snap = cls()
            snap.tensors, snap.params, snap.modules = like.tensors, like.params, like.modules
            snap.moded, snap.hook_dicts = like.moded, like.hook_dicts
            try:
                snap.recorded = like.reading() if reading is None else reading
                # The memory ``like`` holds is where the tensors still are when the addresses match.
                snap.storages = like.storages if snap.recorded[2] == like.recorded[2] else _storages(snap.tensors)
            except RuntimeError:  # a tensor without version counter or storage was put in with .data
                return None
            return snap
        _install_hooks()
        modules: list[nn.Module] = [root]
        params: list[torch.Tensor] = []
        buffers: list[torch.Tensor] = []
        for module in modules:  # a work list: children are appended while it is walked
            params += [p for p in module._parameters.values() if p is not None]
            if module._buffers:
                buffers += [b for b in module._buffers.values() if b is not None]
            modules += [m for m in module._modules.values() if m is not None]
        snap = cls()
        snap.tensors = params + buffers
        snap.params = params
        snap.moded = [m for m in modules if type(m) not in _MODE_FREE] if with_modes else []
        snap.hook_dicts = [d for m in modules[1:] for d in (m._forward_hooks, m._forward_pre_hooks)]
        snap.hook_dicts += _global_hook_dicts()
        try:
            snap.recorded = snap.reading()
            snap.storages = _storages(snap.tensors)
        except RuntimeError:  # inference tensors have no version counter, wrapper subclasses no storage
            return None
        snap.modules = modules  # keeps them alive, so the objects behind the recorded state stay the same
        _track(modules)
        return snap

    def reading(self, global_now: tuple | None = None) -> tuple:
        """Everything the table depends on, read now: the global state, every tensor's version and address, the
        modes, the hooks. Current while it equals ``recorded``.

        ``global_now``: ``global_state()`` read by a caller that checks several snapshots at once."""
        tensors, dicts = self.tensors, self.hook_dicts
        return (
            global_state() if global_now is None else global_now,
            list(map(_version_of, tensors)),
            list(map(_address_of, tensors)),
            [m.training for m in self.moded] if self.moded else None,
            _hook_signature(dicts) if any(dicts) else None,
        )

    def is_current(self, global_now: tuple | None = None) -> bool:
        return self.reading(global_now) == self.recorded

    def requires_grad(self) -> bool:
        """Whether a gradient could flow into any parameter (read now: ``requires_grad_`` bumps nothing)."""
        return any(p.requires_grad for p in self.params)


def _only_values_changed(now: tuple, then: tuple) -> bool:
    """Whether two readings of one snapshot differ at most where writes into the tensors show: their version
    counters and the optimizer-step count (optimizers update parameters in place)."""
    return now[2:] == then[2:] and now[0][0] == then[0][0] and now[0][2:] == then[0][2:]


def _computed(compute: Callable[[], torch.Tensor | None], grad_enabled: bool) -> torch.Tensor | None:
    # Outside inference mode, so the table is a normal tensor with a version counter that shows callers' writes,
    # and stays usable after an inference_mode block ends; under no_grad, so it records no graph.
    if grad_enabled or torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            return compute()
    return compute()


class TableCache:
    """One cached table: returned while its snapshot is current and nobody wrote into it, recomputed otherwise.

    The snapshot, the table, the table's version at caching time and the table's ``refresh`` are one tuple
    (``entry``), replaced whole and read once per lookup: a thread filling the cache while another looks it up
    can never pair one call's snapshot with another call's table (computed under that thread's autocast, say).

    ``refresh`` (from the encoder's ``bind`` when it filled the cache, or None) recomputes the table from the same
    tensors. When a lookup finds only values changed (an optimizer step, ``load_state_dict``, an in-place edit:
    the same tensors at the same addresses, in the same modules, modes and settings) it refreshes the table
    without the walk and the choices of a full computation.
    """

    __slots__ = ("entry", "tree")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.entry: tuple[Snapshot, torch.Tensor, int, Callable | None] | None = None
        self.tree: tuple | None = None  # (root, structure generation, parameters): see _parameters

    @property
    def snapshot(self) -> Snapshot | None:
        entry = self.entry
        return None if entry is None else entry[0]

    @property
    def table(self) -> torch.Tensor | None:
        entry = self.entry
        return None if entry is None else entry[1]

    def _parameters(self, root: nn.Module) -> list[torch.Tensor]:
        """``root``'s parameters, listed once per structure generation: in training every call is a miss, and
        walking the module tree each time to ask whether a gradient can flow costs more than the rest of it."""
        tree = self.tree
        if tree is not None and tree[0] is root and tree[1] == _structure_generation:
            return tree[2]
        _install_hooks()
        modules = list(root.modules())
        _track(modules)  # so that a registration anywhere in the tree bumps the generation
        params = [p for m in modules for p in m._parameters.values() if p is not None]
        self.tree = (root, _structure_generation, params)
        return params

    def lookup(self, grad_enabled: bool) -> tuple[torch.Tensor | None, tuple | None]:
        """``(table, None)`` while the cached table is valid, or after only values changed refreshed, and no
        gradient can flow. Otherwise ``(None, reading)``: nothing is computed, and ``reading`` (what the snapshot
        read, or None) goes to ``fill``."""
        entry = self.entry
        if entry is None:
            return None, None
        snap, table, table_version, refresh = entry
        if table._version != table_version:
            return None, None
        if grad_enabled and snap.requires_grad():  # training: nothing to read (any() stops at the first parameter)
            return None, None
        reading = snap.reading()
        if reading == snap.recorded:
            return table, None
        if refresh is not None and _only_values_changed(reading, snap.recorded):
            table = _computed(refresh, grad_enabled)
            if table is not None:
                # the same tensors, modules and hooks: only the values in the snapshot change (no walk)
                new = Snapshot.take(snap.modules[0], with_modes=bool(snap.moded), like=snap, reading=reading)
                if new is not None:
                    self.entry = (new, table, table._version, refresh)
                    return table, None
        return None, reading

    def fill(
        self,
        root: nn.Module,
        compute: Callable[[], torch.Tensor],
        *,
        grad_enabled: bool,
        cacheable: Callable[[], bool],
        reading: tuple | None = None,
        bind: Callable[[], Callable[[], torch.Tensor | None] | None] | None = None,
    ) -> torch.Tensor | None:
        """After a miss (``lookup`` returned no table, and ``reading``): compute the table of ``root`` now and
        store it. ``bind()`` (when given) returns the table's refresh, a callable that computes the table from
        the same tensors, or returns None where it cannot (see the class), or None; the table is the refresh's,
        else ``compute()``'s.

        Returns ``None`` when the table must not be cached: a gradient can flow (``grad_enabled`` and a parameter
        requires grad), ``cacheable()`` is False (a stochastic module in training mode), or ``root`` holds
        tensors without version counters. The caller then computes the table itself, with autograd.
        """
        last = self.snapshot
        if last is not None and (last.modules[0] is not root or last.recorded[0][0] != _structure_generation):
            last = None  # another tree, or this one changed shape: walk it again
        if last is None or reading is None or reading[0][0] != _structure_generation:
            reading = None  # read from an older tree: the retake reads again
        if grad_enabled and any(p.requires_grad for p in self._parameters(root)):
            return None  # training: nothing to record
        if not cacheable():
            self.clear()
            return None
        snap = Snapshot.take(root, like=last, reading=reading)
        if snap is None:
            self.clear()
            return None
        refresh = None if bind is None else bind()
        table = None if refresh is None else _computed(refresh, grad_enabled)
        if table is None:
            table = _computed(compute, grad_enabled)
        self.entry = (snap, table, table._version, refresh)
        return table
