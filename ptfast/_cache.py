"""When a computed virtual-token table is still valid: snapshots of what it depends on, and the table cache.

A :class:`Snapshot` records, when a table is computed, everything that can change the result:

* global state: a structure generation (bumped by PyTorch's global registration hooks whenever a module that
  some snapshot depends on gets a module, parameter or buffer assigned), a count of ``torch.optim`` steps (fused
  optimizer kernels do not bump version counters), the autocast state, the fp32 matmul precision settings and the
  ``PTFAST_BACKEND`` choice;
* every parameter and buffer, read from its place (module dict and key: tensors put straight into the dict, as
  ``torch.func.functional_call`` does, register nothing): its version counter (optimizer steps,
  ``load_state_dict``, in-place edits, running statistics), memory address (``.half()`` / ``.to()`` on a
  submodule, which the encoder's ``_apply`` does not see, and ``p.data = t`` replace the memory without bumping the
  counter), sizes and strides (``p.data = p.data.t()`` keeps the memory);
* the ``training`` flag of every module whose output can depend on it (anything but the stateless layers of
  PEFT's head);
* the forward and backward hooks of the head's modules and the process-wide module hooks.

``is_current()`` re-reads only these, so a hit costs a few attribute reads instead of a walk over the module tree.
When only version counters and the optimizer-step count moved, :class:`TableCache` refreshes the table with the
computation the encoder prepared (no walk, no choices made again). What none of these sees is listed in the README:
in-place writes through ``.data``, a submodule put straight into ``_modules``, ``del`` of a submodule or parameter,
and optimizers that bypass ``Optimizer.step``."""

from __future__ import annotations

import weakref
from array import array
from collections.abc import Callable
from operator import attrgetter
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _env
from . import native as _native

__all__ = ["Snapshot", "TableCache", "global_state"]

_structure_generation = 0
_optimizer_steps = 0
_hooks_installed = False

# Layers whose forward ignores ``training``: their flag is left out of the key (PEFT's head is made of these).
_MODE_FREE = (nn.Linear, nn.ReLU, nn.Sequential, nn.Embedding, nn.Identity, nn.GELU, nn.Tanh, nn.SiLU)


def same_in_training(module: nn.Module) -> bool:
    """Whether ``module`` computes in training mode what it computes in eval mode. Any other module in training mode
    may draw (dropout) or keep state (BatchNorm's running statistics), so a table computed once cannot stand in
    for PEFT's computation on every row of every call (``training_dependent``)."""
    if type(module) in _MODE_FREE:
        return True
    if isinstance(module, nn.RNNBase):  # dropout only between layers
        return module.dropout == 0 or module.num_layers == 1
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0


def training_dependent(modules) -> bool:
    """Whether one of ``modules`` is in training mode and computes differently there (``same_in_training``: a
    dropout swapped into the head, a BatchNorm, an LSTM with dropout between layers). Then nothing may be cached,
    and a batch of rows must not share one computed table: the modules run on each call's own indices, as in PEFT.
    Read live (a dropout's ``p`` set later counts at once): pass the modules below the encoder."""
    return any(m.training and not same_in_training(m) for m in modules)


def _below(root: nn.Module) -> list:
    """The modules of ``root``'s tree below it (a fresh walk: a module put straight into a ``_modules`` dict, which
    registers nothing, is there too)."""
    return list(root.modules())[1:]


#: What ``TableCache.fill`` returns where the modules must run on the call's own indices (``training_dependent``).
RUN_MODULES = object()


_version_of = attrgetter("_version")
_address_of = torch.Tensor.data_ptr
_sizes_of = torch._C.TensorBase.size
_strides_of = torch._C.TensorBase.stride


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


_num_threads = torch.get_num_threads

# Positions in global_state(): the counters, and the backend choice (the other entries are settings).
_G_GENERATION, _G_STEPS, _G_BACKEND = 0, 1, 5


# Thread counts from this one on share one value in the key (the native check's settings word has 10 bits for it).
_MAX_THREADS_KEY = 1023


def global_state() -> tuple:
    """The process-wide inputs of a table: changes anywhere, autocast, fp32 precisions, backend choice, CPU threads.

    The fp32 precisions: CUDA matmul (the head's linears), cuDNN RNN (the LSTM), oneDNN matmul and RNN (on CPU,
    where a bf16 setting makes oneDNN round through bf16), and the levels above them that they inherit from. The
    thread count: a CPU matmul may split its sums by thread, which moves the last bits."""
    return (
        _structure_generation,
        _optimizer_steps,
        _any_autocast() and _autocast_state(),
        _fp32_precision("cuda", "matmul"),
        _fp32_precision("generic", "all"),
        _backend_key(),
        _fp32_precision("cuda", "all"),
        _fp32_precision("cuda", "rnn"),
        _fp32_precision("mkldnn", "all"),
        _fp32_precision("mkldnn", "matmul"),
        _fp32_precision("mkldnn", "rnn"),
        min(_num_threads(), _MAX_THREADS_KEY),
    )


def _global_hook_dicts() -> list:
    g = _module_globals
    return [
        g._global_forward_hooks,
        g._global_forward_pre_hooks,
        g._global_backward_hooks,
        g._global_backward_pre_hooks,
    ]


def _module_hook_dicts(module: nn.Module) -> tuple:
    # Backward hooks too: with them the head's own modules run instead of the fused op (is_plain_sequential).
    return (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)


def _hook_signature(dicts: list) -> list:
    # A registration adds the next (largest) handle id, at the end or (prepend=True) at the front, and a removal
    # shortens the dict: which dicts hold hooks, with their length and first and last key, tell a different set of
    # hooks from the old one.
    return [(i, len(d), next(iter(d)), next(reversed(d))) for i, d in enumerate(dicts) if d]


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


_getitem = dict.__getitem__
_get = dict.get

# Positions in a reading (see Snapshot.reading).
_GLOBAL, _VERSIONS, _ADDRESSES, _SIZES, _STRIDES = 0, 1, 2, 3, 4


class Snapshot:
    """What a table computed from ``root`` depends on; ``is_current()`` says whether it still holds.

    Tensors are recorded by where they live, a module's ``_parameters`` / ``_buffers`` dict and key, and read from
    there on every reading: ``torch.func.functional_call`` and accelerate put tensors straight into those dicts,
    which runs no registration hook, so a snapshot that kept the tensor objects would read the wrong ones.
    """

    __slots__ = (
        "recorded",
        "holders",
        "names",
        "param_holders",
        "param_names",
        "empty",
        "storages",
        "moded",
        "hook_dicts",
        "modules",
        "with_modes",
        "native_lists",
    )

    @classmethod
    def take(
        cls, root: nn.Module, *, with_modes: bool = True, like: Snapshot | None = None, reading: tuple | None = None
    ) -> Snapshot | None:
        """``None`` when ``root`` holds tensors without version counters (made under ``inference_mode``) or without
        memory of their own (wrapper subclasses): nothing can tell whether such a table is current.

        ``like``: an earlier snapshot of the same ``root``. While no module, parameter or buffer has been
        registered anywhere in the tree since (the structure generation is unchanged), its lists of modules and
        tensor places still describe the tree, and only the values are read again: a miss after an optimizer step
        costs no walk. ``reading``: what the lookup that missed read, from whatever snapshot was cached then; the
        caller passes it only when it was read in the current structure generation, where every snapshot of the
        tree lists the same places, modules and hook dicts, so it is a reading of ``like``'s lists.
        """
        if (
            like is not None
            and like.modules[0] is root
            and like.recorded[_GLOBAL][0] == _structure_generation
            and like.with_modes == with_modes
        ):
            recorded = like.reading() if reading is None else reading
            snap = None if recorded is None else like.with_reading(recorded)
            if snap is not None:
                return snap
            # else a tensor was deleted, set to None or replaced by one that cannot be tracked: walk again
        _install_hooks()
        modules: list[nn.Module] = [root]
        params: list[tuple] = []
        buffers: list[tuple] = []
        empty: list[tuple] = []
        for module in modules:  # a work list: children are appended while it is walked
            for holder, places in ((module._parameters, params), (module._buffers, buffers)):
                for name, tensor in holder.items():
                    (places if tensor is not None else empty).append((holder, name))
            modules += [m for m in module._modules.values() if m is not None]
        snap = cls()
        slots = params + buffers
        snap.holders, snap.names = [h for h, _ in slots], [n for _, n in slots]
        snap.param_holders, snap.param_names = snap.holders[: len(params)], snap.names[: len(params)]
        snap.empty = empty  # places that held None: a tensor assigned straight into one is a change of structure
        snap.with_modes = with_modes
        snap.moded = [m for m in modules if type(m) not in _MODE_FREE] if with_modes else []
        snap.hook_dicts = [d for m in modules[1:] for d in _module_hook_dicts(m)]
        snap.hook_dicts += _global_hook_dicts()
        snap.recorded = snap.reading()
        if snap.recorded is None:  # inference tensors have no version counter
            return None
        try:
            snap.storages = _storages(snap.tensors())
        except RuntimeError:  # wrapper subclasses have no storage
            return None
        snap.modules = modules  # keeps them alive, so the objects behind the recorded state stay the same
        snap.native_lists = None
        _track(modules)
        return snap

    def with_reading(self, recorded: tuple) -> Snapshot | None:
        """This snapshot's lists with ``recorded`` (a reading of them) as the recorded state; None when a tensor
        now at a place has no memory of its own."""
        snap = Snapshot()
        snap.holders, snap.names, snap.empty = self.holders, self.names, self.empty
        snap.param_holders, snap.param_names = self.param_holders, self.param_names
        snap.moded, snap.hook_dicts, snap.with_modes = self.moded, self.hook_dicts, self.with_modes
        snap.modules = self.modules
        snap.native_lists = self.native_lists
        snap.recorded = recorded
        if recorded[_ADDRESSES] == self.recorded[_ADDRESSES]:
            snap.storages = self.storages  # the memory this one holds is where the tensors still are
        else:
            try:
                snap.storages = _storages(snap.tensors())
            except (RuntimeError, KeyError):
                return None
        return snap

    def tensors(self) -> list:
        """The tensors at the recorded places now."""
        return list(map(_getitem, self.holders, self.names))

    def reading(self, global_now: tuple | None = None) -> tuple | None:
        """Everything the table depends on, read now: ``(global state, versions, addresses, sizes, strides, training
        flags, hook signatures)`` of the tensors at the recorded places. Current while it equals ``recorded``. None when
        the places no longer hold what can be read (a tensor deleted or set to None, one without a version counter
        put in, a tensor put where None was): then the tree must be walked again.

        ``global_now``: ``global_state()`` read by a caller that checks several snapshots at once."""
        try:
            tensors = list(map(_getitem, self.holders, self.names))
            versions = list(map(_version_of, tensors))
            addresses = list(map(_address_of, tensors))
            # the same memory in another layout (``p.data = p.data.t()``) is another tensor
            sizes, strides = list(map(_sizes_of, tensors)), list(map(_strides_of, tensors))
        except (KeyError, AttributeError, TypeError, RuntimeError):
            return None
        if self.empty and any(_get(holder, name) is not None for holder, name in self.empty):
            return None
        dicts = self.hook_dicts
        return (
            global_state() if global_now is None else global_now,
            versions,
            addresses,
            sizes,
            strides,
            [m.training for m in self.moded] if self.moded else None,
            _hook_signature(dicts) if any(dicts) else None,
        )

    def is_current(self, global_now: tuple | None = None) -> bool:
        return self.reading(global_now) == self.recorded

    def requires_grad(self) -> bool:
        """Whether a gradient could flow into any parameter now (``requires_grad_`` bumps nothing; True when a
        recorded place no longer holds a parameter, so the caller computes with autograd)."""
        try:
            return any(p.requires_grad for p in map(_getitem, self.param_holders, self.param_names))
        except (KeyError, AttributeError):
            return True


def _only_values_changed(now: tuple, then: tuple) -> bool:
    """Whether two readings of one snapshot differ at most where writes into the tensors show: their version
    counters and the optimizer-step count (optimizers update parameters in place)."""
    g_now, g_then = now[_GLOBAL], then[_GLOBAL]
    return (
        now[_ADDRESSES:] == then[_ADDRESSES:]
        and g_now[_G_GENERATION] == g_then[_G_GENERATION]
        and g_now[_G_STEPS + 1 :] == g_then[_G_STEPS + 1 :]
    )


def _computed(compute: Callable[[], torch.Tensor | None], grad_enabled: bool) -> torch.Tensor | None:
    # Outside inference mode, so the table is a normal tensor with a version counter that shows callers' writes,
    # and stays usable after an inference_mode block ends; under no_grad, so it records no graph.
    if grad_enabled or torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            return compute()
    return compute()


# A native record (csrc/table_check.cpp's Field) is the snapshot's lists (7 entries, shared by the records of its
# refreshes), then what it recorded, in this order.
_NATIVE_LISTS = 7
(
    _R_VERSIONS,
    _R_ADDRESSES,
    _R_FLAGS,
    _R_TABLE,
    _R_TABLE_VERSION,
    _R_GENERATION,
    _R_STEPS,
    _R_BACKEND,
    _R_SETTINGS,
    _R_LAYOUTS,
) = range(_NATIVE_LISTS, _NATIVE_LISTS + 10)


def _layouts(sizes: list, strides: list) -> bytes:
    """A native record's layouts: each tensor's dim, sizes and strides, packed as the C++ check packs them."""
    flat = []
    for size, stride in zip(sizes, strides):
        flat.append(len(size))
        flat += size
        flat += stride
    return array("q", flat).tobytes()


def _native_recorded(
    versions, addresses, flags, table, table_version, generation, steps, backend, settings, layouts
) -> tuple:
    """A native record's recorded part, in the order of the _R_ positions."""
    return (
        tuple(versions),
        tuple(addresses),
        tuple(flags),
        table,
        table_version,
        generation,
        steps,
        backend,
        settings,
        layouts,
    )


# The tensor types the native check reads itself (csrc/table_check.cpp): others may answer attribute reads through
# __torch_function__, so at their places the check leaves the decision to Python.
_NATIVE_TYPES = (torch.Tensor, nn.Parameter)


def _native_record(snap: Snapshot, table: torch.Tensor, table_version: int) -> tuple | None:
    """``(table_current, record)``: what ``csrc/table_check.cpp`` needs to tell, in one call, that ``snap`` still
    holds and nobody wrote into ``table``. None where the hit is checked in Python only: no native library loaded
    (``native.table_check_module`` never compiles), or hooks recorded (their signature is Python's).

    The record repeats ``snap``'s recorded reading, except the settings that live in C++ (fp32 precision, autocast,
    CPU threads), which the library reads itself: so they are read now, after checking that Python sees them
    unchanged since ``snap`` recorded them (the table was computed under those).
    """
    module = _native.table_check_module()
    if module is None:
        return None
    g, versions, addresses, sizes, strides, flags, hooks = snap.recorded
    if hooks is not None:
        return None
    lists = snap.native_lists
    if lists is None:
        lists = snap.native_lists = (
            tuple(snap.holders),
            tuple(snap.names),
            len(snap.param_holders),
            tuple(snap.empty),
            tuple(snap.moded),
            tuple(snap.hook_dicts),
            _NATIVE_TYPES,
        )
    settings = module.settings_word()
    if global_state() != g:
        return None
    recorded = _native_recorded(
        versions,
        addresses,
        flags or (),
        table,
        table_version,
        g[_G_GENERATION],
        g[_G_STEPS],
        g[_G_BACKEND],
        settings,
        _layouts(sizes, strides),
    )
    return module.table_current, lists + recorded


class Entry(NamedTuple):
    """A cached table and what it was computed from."""

    snapshot: Snapshot
    table: torch.Tensor
    table_version: int  # the table's version counter when cached: a caller's write into it moves it
    refresh: Callable[[], torch.Tensor | None] | None  # recomputes the table from the same tensors (TableCache)
    native: tuple | None  # (check, record): the hit checked in one native call (_native_record), or None

    @classmethod
    def of(cls, snapshot: Snapshot, table: torch.Tensor, refresh) -> Entry:
        version = table._version
        return cls(snapshot, table, version, refresh, _native_record(snapshot, table, version))


class TrainRecord(NamedTuple):
    """What the last train step of a tree was computed from, and its prepared computation (``TableCache.trained``).
    Without a native record (``native`` None) nothing is prepared and nothing is held: the tree is computed in full
    until its structure changes, or until ``retry_in`` more steps have passed (see ``_retry_wait``)."""

    root: nn.Module
    generation: int  # the structure generation it was recorded in
    # What the tree was. It holds the recorded tensors' memory, so that no other tensor at a recorded address can
    # pass the native check as the recorded one (see _storages).
    snapshot: Snapshot | None
    native: tuple | None  # (check, record): the snapshot checked in one native call (see trained)
    # (places_hold, its arguments: dicts, keys, objects, sized dicts, sizes): the modules and tensors the step was
    # bound to, at their places, by identity, and the sizes of the modules' dicts
    places: tuple | None
    step: Callable[[], torch.Tensor | None] | None  # the encoder's bind_train(): the table with autograd, or None
    retry_in: int = 0  # unprepared: full steps left before the tree is recorded again
    wait: int = 0  # unprepared: the retry_in it was given
    moded: tuple = ()  # prepared: the modules below the root whose training mode may matter (training_dependent)


# A tree that could not be prepared is recorded again after 1, 2, 4, ... full steps, at most this many: what kept it
# unprepared (a hook, functional_call's fast weights, an extension not loaded yet) may be gone without any
# registration showing it, and a tree that stays hooked pays one walk per this many full steps (its cost:
# benchmarks/NOTES.md, "Sixth pass").
_MAX_RETRY_WAIT = 64


def _retry_wait(last: TrainRecord | None, root: nn.Module) -> int:
    """The steps to wait before recording ``root`` again after a recording that prepared nothing."""
    if last is None or last.native is not None or last.root is not root:
        return 1
    return min(2 * last.wait, _MAX_RETRY_WAIT)


# Stands in for the table in a train record's native record: a train step caches no table, and nothing writes here.
# A normal CPU tensor whatever the context ptfast is imported in (inference mode has no version counters).
with torch.inference_mode(False):
    _NO_TABLE = torch.empty(0, device="cpu")


def _train_record(root: nn.Module, bind: Callable, wait: int) -> TrainRecord:
    """Record ``root`` for prepared train steps (``TableCache.trained``), and prepare one (``bind()``). Where
    nothing can be prepared, the record says to try again after ``wait`` full steps."""
    unprepared = TrainRecord(root, _structure_generation, None, None, None, None, retry_in=wait, wait=wait)
    module = _native.table_check_module()
    if module is None:  # no native check: no walk either (the extension may still load later: tried after the wait)
        return unprepared
    # A fresh walk: what changed may be a module put straight into a dict, which no registration shows, so an
    # earlier snapshot's lists of this generation would still name the old modules; and the new ones are tracked.
    snap = Snapshot.take(root)
    if snap is not None:
        _tracked.update(snap.modules)
    tensors = None if snap is None else snap.tensors()
    # Plain leaf tensors only: the native check leaves other types to Python (every step would record again), and a
    # step must not keep non-leaf tensors (functional_call's fast weights) and their graphs alive.
    if tensors is None or not all(type(t) in _NATIVE_TYPES and t.grad_fn is None for t in tensors):
        return unprepared
    native = _native_record(snap, _NO_TABLE, _NO_TABLE._version)
    if native is None:
        return unprepared
    # Autograd needs the very objects, not only the same memory (a detached alias at a place must get no gradient),
    # and the modules too (one put straight into a _modules dict, or a _parameters dict replaced, registers nothing).
    dicts, keys, objects, sized = [], [], [], []
    for m in snap.modules:
        attrs = m.__dict__
        for name in ("_parameters", "_buffers", "_modules"):
            dicts.append(attrs)
            keys.append(name)
            objects.append(attrs[name])
            sized.append(attrs[name])  # a key added straight into one (a sixth layer in the head) changes its size
        for name, child in m._modules.items():
            dicts.append(m._modules)
            keys.append(name)
            objects.append(child)
    dicts += snap.holders
    keys += snap.names
    objects += tensors
    places = (module.places_hold, (tuple(dicts), tuple(keys), tuple(objects), tuple(sized), tuple(map(len, sized))))
    moded = tuple(m for m in snap.modules if m is not root and type(m) not in _MODE_FREE)
    return TrainRecord(root, _structure_generation, snap, native, places, bind(), moded=moded)


class TableCache:
    """One cached table: returned while its snapshot is current and nobody wrote into it, recomputed otherwise.

    The snapshot, the table, the table's version at caching time and the table's refresh are one ``Entry``,
    replaced whole and read once per lookup: a thread filling the cache while another looks it up can never pair
    one call's snapshot with another call's table (computed under that thread's autocast, say).

    The refresh (the encoder's ``bind()`` when it filled the cache; None where there is none) recomputes the table
    from the same tensors without deciding again how. A lookup that finds only values changed (an optimizer step,
    ``load_state_dict``, an in-place edit: the same tensors at the same places and addresses, in the same modules,
    modes, hooks and settings) refreshes the table instead of a full computation.
    """

    __slots__ = ("entry", "tree", "train")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.entry: Entry | None = None
        self.tree: tuple | None = None  # (root, structure generation, parameter places): see _requires_grad
        self.train: TrainRecord | None = None  # see trained

    @property
    def snapshot(self) -> Snapshot | None:
        entry = self.entry
        return None if entry is None else entry.snapshot

    @property
    def table(self) -> torch.Tensor | None:
        entry = self.entry
        return None if entry is None else entry.table

    def _requires_grad(self, root: nn.Module) -> bool:
        """Whether a gradient can flow into any of ``root``'s parameters now, read from their places, listed once
        per structure generation: in training every call is a miss, and walking the module tree each time costs
        more than the rest of it."""
        tree = self.tree
        if tree is not None and tree[0] is root and tree[1] == _structure_generation:
            try:
                return any(p is not None and p.requires_grad for p in map(_getitem, tree[2], tree[3]))
            except KeyError:  # a parameter deleted from its dict: list the places again
                pass
        _install_hooks()
        modules = list(root.modules())
        _track(modules)  # so that a registration anywhere in the tree bumps the generation
        places = [(m._parameters, name) for m in modules for name in m._parameters]
        self.tree = (root, _structure_generation, [h for h, _ in places], [n for _, n in places])
        return any(p is not None and p.requires_grad for m in modules for p in m._parameters.values())

    def lookup(self, grad_enabled: bool) -> tuple[torch.Tensor | None, tuple | None]:
        """``(table, None)`` while the cached table is valid, or after only values changed refreshed, and no
        gradient can flow. Otherwise ``(None, reading)``: nothing is computed, and ``reading`` (what the snapshot
        read, or None) goes to ``fill``."""
        entry = self.entry
        if entry is None:
            return None, None
        snap, table, table_version, refresh, native = entry
        if native is not None:
            steps = _optimizer_steps
            answer = native[0](native[1], _structure_generation, steps, _backend_key(), grad_enabled)
            if answer is True:
                return table, None  # what the Python reading below would conclude, read in C++
            if answer is None:
                return None, None  # training: a parameter requires grad
            if answer is not False:  # only values changed: the version counters now, the reading Python would take
                recorded = snap.recorded
                g = recorded[_GLOBAL]
                reading = ((g[_G_GENERATION], steps, *g[_G_STEPS + 1 :]), list(answer), *recorded[_ADDRESSES:])
                return self._refreshed(entry, reading, grad_enabled, answer)
        if table._version != table_version:
            return None, None
        if grad_enabled and snap.requires_grad():  # training: nothing to read (any() stops at the first parameter)
            return None, None
        reading = snap.reading()
        if reading == snap.recorded:
            return table, None
        if reading is not None and refresh is not None and _only_values_changed(reading, snap.recorded):
            return self._refreshed(entry, reading, grad_enabled)
        return None, reading

    def _refreshed(
        self, entry: Entry, reading: tuple, grad_enabled: bool, versions: tuple | None = None
    ) -> tuple[torch.Tensor | None, tuple | None]:
        """``lookup``'s answer after only values changed: the table refreshed (and cached with ``reading``), or no
        table and ``reading`` where the refresh cannot run now. ``versions``: the native check's reading of the
        version counters, when it found only those changed (then its record carries over with them)."""
        snap, _, _, refresh, native = entry
        table = None if refresh is None else _computed(refresh, grad_enabled)
        if table is not None:
            # What the refresh read is what ``reading`` saw (or newer values, which the next lookup sees move):
            # the new snapshot is this one's lists with that reading, whatever another thread registered since.
            new = snap.with_reading(reading)
            if new is not None:
                if versions is None:
                    self.entry = Entry.of(new, table, refresh)
                else:  # the native check just read everything else equal to its record: the record carries over
                    check, old = native
                    version = table._version
                    record = old[:_NATIVE_LISTS] + _native_recorded(
                        versions, old[_R_ADDRESSES], old[_R_FLAGS], table, version, old[_R_GENERATION],
                        reading[_GLOBAL][_G_STEPS], old[_R_BACKEND], old[_R_SETTINGS], old[_R_LAYOUTS],
                    )  # fmt: skip
                    self.entry = Entry(new, table, version, refresh, (check, record))
                return table, None
        return None, reading

    def fill(
        self,
        root: nn.Module,
        compute: Callable[[], torch.Tensor],
        *,
        grad_enabled: bool,
        reading: tuple | None = None,
        bind: Callable[[], Callable[[], torch.Tensor | None] | None] | None = None,
        bind_train: Callable[[], Callable[[], torch.Tensor | None] | None] | None = None,
    ) -> torch.Tensor | object | None:
        """After a miss (``lookup`` returned no table, and ``reading``): compute the table of ``root`` now and
        store it. ``bind`` (when given) returns the table's refresh or None (see the class); the table is the
        refresh's first result, or ``compute()``'s where there is no refresh or it returned None.

        Where a gradient can flow (``grad_enabled`` and a parameter requires grad) nothing is cached: the result is
        the table with autograd from ``bind_train``'s prepared step (``trained``), or None. Returns ``None`` too
        when ``root`` holds tensors without version counters: the caller then computes the table itself. Returns
        ``RUN_MODULES``, computing nothing, while a module computes differently in training mode
        (``training_dependent``): the caller then runs the modules on the call's own indices.
        """
        if grad_enabled and self._requires_grad(root):
            if bind_train is None:
                return RUN_MODULES if training_dependent(_below(root)) else None
            return self.trained(root, bind_train)  # training: no table to cache
        last = self.snapshot
        if last is not None and (last.modules[0] is not root or last.recorded[_GLOBAL][0] != _structure_generation):
            last = None  # another tree, or this one changed shape: walk it again
        if last is None or reading is None or reading[_GLOBAL][0] != _structure_generation:
            reading = None  # read from an older tree: the retake reads again
        self.train = None  # a full computation without gradients: a train record would only hold what it recorded
        below = _below(root)  # a fresh walk: a miss without gradients walks the tree anyway
        if training_dependent(below):
            self.clear()
            return RUN_MODULES
        if any(m.training and type(m) not in _MODE_FREE and not isinstance(m, nn.RNNBase) for m in below):
            # the same in training mode for now, but through an attribute no key reads (a dropout's p): computed,
            # not cached, so that a change of it counts at the next call. PEFT's LSTM (no dropout between its
            # layers by default) stays cached in training; its `dropout` set later is not seen (README)
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
        self.entry = Entry.of(snap, table, refresh)
        return table

    def trained(self, root: nn.Module, bind: Callable[[], Callable[[], torch.Tensor | None] | None]):
        """A train step's table, with autograd, from the step prepared at an earlier one (``bind()``, the encoder's
        ``_bind_train_step``), or None: then the caller computes it in full.

        The prepared step is used while the tree is what it was when it was prepared: the same module and tensor
        objects at the same places, the same addresses, sizes and strides, modes, hooks (none) and settings; only
        values may have changed (the optimizer's steps). Two native calls check that: ``table_current`` on a
        record of the tree (as for a cached table) and ``places_hold`` (identity). Where no native record can be
        made (hooks, tensor subclasses, non-leaf tensors at the places) nothing is prepared, and the tree is
        recorded again only after 1, 2, 4, ... full steps (``_retry_wait``), or at once when its structure changes:
        what stood in the way may go without any registration showing it (a hook removed). Without the extension
        the tree is not walked. Anything else that changed records the tree again and prepares a new step; a
        step that cannot run (another stream, a launch hook, a new layout of its tensors) returns None, and the
        computation is the full one. ``RUN_MODULES`` while a module computes differently in training mode
        (``training_dependent``): read from the record's modules once its places hold, else from a fresh walk."""
        rec = self.train
        if rec is not None:
            if rec.native is not None:
                check, record = rec.native
                hold, places = rec.places
                current = check(record, _structure_generation, _optimizer_steps, _backend_key(), False) is not False
                if current and hold(*places):
                    if training_dependent(rec.moded):
                        return RUN_MODULES
                    return None if rec.step is None else rec.step()
            elif rec.root is root and rec.generation == _structure_generation and rec.retry_in > 0:
                self.train = rec._replace(retry_in=rec.retry_in - 1)
                return RUN_MODULES if training_dependent(_below(root)) else None
        self.train = rec = _train_record(root, bind, _retry_wait(rec, root))
        if training_dependent(_below(root) if rec.native is None else rec.moded):
            return RUN_MODULES
        return None if rec.step is None else rec.step()
