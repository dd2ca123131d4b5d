"""What ``PromptEncoder`` and ``PrefixEncoder`` share: a table computed from the parameters, indexed by virtual-token
indices, and cached when no gradient can flow.

Both encoders map ``(batch, T')`` indices to rows of one ``(num_rows, width)`` table that depends only on their
parameters (``_compute_table``). :class:`TableEncoder` holds the cache (``ptfast._cache.TableCache``), validates
the indices (remembering the last ones it checked), and answers ``forward``:

* a cached, current table: a view of it for the canonical ``arange`` rows (what ``PeftModel.get_prompt`` passes),
  ``F.embedding`` for any other indices;
* otherwise the table is computed (and cached when no gradient can flow) and indexed the same way;
* ``_bypass``: what a subclass computes without the table (the LSTM's non-arange rows; PEFT's own op for a
  prefix encoder without projection when a gradient can flow).

Under ``torch.compile`` the trace skips the cache and the data-dependent checks (``_traced_forward``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native as _native
from ._cache import RUN_MODULES, TableCache, _global_hook_dicts, _module_hook_dicts, training_dependent

# Non-None while torch.jit.trace records a graph (torch.jit.is_tracing's C call, without its Python wrapper)
_tracing_state = torch._C._get_tracing_state

__all__ = ["TableEncoder", "adopt_parameters", "is_plain_sequential"]


class _IndexCheck:
    """Remembers the last validated index tensor, so the per-call check is a few attribute reads.

    It keeps a reference to that tensor's memory (its storage: a ``.data =`` on the tensor would free the memory the
    tensor object alone points at), so no other tensor can be allocated there while we hold it, and a matching
    address, layout and version counter mean the same values.
    """

    __slots__ = ("tensor", "storage", "key", "is_arange", "table", "num_rows", "native_key", "same_native_key")

    def __init__(self, tensor: torch.Tensor, key: tuple, is_arange: bool, table: torch.Tensor | None, num_rows: int):
        self.tensor = tensor
        try:
            self.storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass without memory of its own: nothing to hold
            self.storage = None
        self.key = key
        self.is_arange = is_arange
        self.table = table  # the cached table whose rows and device the indices were checked against
        self.num_rows = num_rows  # the encoder's row count they were checked against
        # The same key packed by the C++ extension, where it is loaded: compared in one call on a cached hit.
        module = _native.table_check_module()
        self.native_key = None if module is None else module.tensor_key(tensor)
        self.same_native_key = None if self.native_key is None else module.same_tensor_key

    def matches(self, indices: torch.Tensor) -> bool:
        """Whether ``indices`` are the tensor checked, unchanged (same key)."""
        same = self.same_native_key
        return same(indices, self.native_key) if same is not None else self.key == _index_key(indices)

    def covers(self, table: torch.Tensor) -> bool:
        """Whether the check holds for ``table``: the one it was made against, or one of the same shape on the
        same device (a refreshed table: TableCache), which then takes its place."""
        if self.table is table:
            return True
        checked = self.table
        if checked is None or checked.shape != table.shape or checked.device != table.device:
            return False
        self.table = table
        return True


def _index_key(indices: torch.Tensor) -> tuple | None:
    try:
        # The dtype too: a float64 view of int64 indices has the same address, shape and strides.
        return (indices.data_ptr(), indices._version, indices.shape, indices.stride(), indices.device, indices.dtype)
    except RuntimeError:  # inference tensors have no version counter
        return None


_module_globals = nn.modules.module


def is_plain_sequential(head: nn.Module, kinds: tuple) -> bool:
    """Whether ``head`` is an ``nn.Sequential`` of exactly these layer types, every Linear with a bias, and no
    hooks on it, its layers or every module (nn.Module's process-wide hooks).

    Only then does a fused op compute exactly what running the modules would; anything else (a swapped activation,
    a layer without bias, weight-norm's pre-hooks, a debugging hook) runs the modules themselves. Runs on every
    computed table: plain attribute reads, no helper calls.
    """
    g = _module_globals
    if (
        type(head) is not nn.Sequential
        or g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    ):
        return False
    children = head._modules
    if len(children) != len(kinds):
        return False
    for module, kind in zip((head, *children.values()), (nn.Sequential, *kinds)):
        if (
            type(module) is not kind
            or module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
            or (kind is nn.Linear and module._parameters.get("bias") is None)
        ):
            return False
    return True


def adopt_parameters(src: nn.Module, dst: nn.Module, *, share: bool) -> None:
    """Put ``src``'s parameters into ``dst`` under the same names: the same objects if ``share``, else copies.

    Both ways between PEFT's encoders and ours (the names must match).
    """
    theirs, ours = dict(src.named_parameters()), dict(dst.named_parameters())
    if ours.keys() != theirs.keys():
        raise ValueError(
            f"cannot convert {type(src).__name__} to {type(dst).__name__}: parameters {sorted(theirs)} do not "
            f"match {sorted(ours)}"
        )
    for name, param in theirs.items():
        if not share:
            param = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        module_name, _, attr = name.rpartition(".")
        setattr(dst.get_submodule(module_name), attr, param)  # RNNBase.__setattr__ keeps LSTM's weights in sync


class TableEncoder(nn.Module):
    """Base of the encoders: the cached table and the indexed forward. Subclasses define ``_compute_table``,
    ``_num_rows`` and ``_traced_forward``, and may define ``_bypass``."""

    #: The forward argument's name in error messages (PEFT's: ``indices`` for P-tuning, ``prefix`` for prefixes).
    _INDICES_NAME = "indices"

    def __init__(self):
        super().__init__()
        self._cache = TableCache()
        self._index_check: _IndexCheck | None = None

    # ------------------------------------------------------------------ what a subclass defines
    def _compute_table(self) -> torch.Tensor:
        """The ``(num_rows, width)`` table, computed now (with autograd when a gradient can flow)."""
        raise NotImplementedError

    @property
    def _num_rows(self) -> int:
        raise NotImplementedError

    def _traced_forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The forward under ``torch.compile``: no cache, no data-dependent checks, so no graph break."""
        raise NotImplementedError

    def _bind_table(self):
        """The table's refresh (``ptfast._cache.TableCache``), or None where nothing is cheaper than
        ``_compute_table``. The refresh is a callable that returns what ``_compute_table()`` would, no gradient
        flowing, from the same tensors without deciding again how; it returns None instead when it cannot run now
        (then the cache computes in full). Asked on each full computation of a table to be cached, which takes the
        refresh's first result; later, when only values changed, the cache calls it again."""
        return None

    #: A train step's table prepared for the next steps (``TableCache.trained``): a method returning a callable that
    #: returns what ``_compute_table()`` would with a gradient flowing, or None where it cannot run now (then the
    #: table is computed in full); or None where nothing is cheaper than ``_compute_table``.
    _bind_train_step = None

    def _bypass(self, indices: torch.Tensor, is_arange: bool, cached: bool, grad_enabled: bool):
        """The output when it must not come from the table, else None. Asked only when ``indices`` are not the
        canonical arange or no table is cached (the hot path, a cached arange call, never asks)."""
        return None

    def _modules_forward(self, indices: torch.Tensor) -> torch.Tensor:
        """PEFT's computation as is: the modules themselves on ``indices``, the embedding module included."""
        raise NotImplementedError

    def _embedding_hooked(self) -> bool:
        """Whether a hook would run on the embedding module (its own or a process-wide one, forward or backward).
        The table is computed from the embedding's weight without calling the module, so then the modules run
        instead, on the indices, uncached, as in PEFT. (A hook registered after a table was cached changes the
        snapshot: that call misses.)"""
        return any(_module_hook_dicts(self._modules["embedding"])) or any(_global_hook_dicts())

    def _training_dependent_now(self) -> bool:
        """``training_dependent`` of the modules below this one, by a walk torch.compile can trace."""
        return training_dependent(m for m in self.modules() if m is not self)

    # ------------------------------------------------------------------ the table
    def table(self) -> torch.Tensor:
        """The table, ``(num_rows, width)``.

        Cached when no gradient can flow (then the cached tensor itself: see ``forward``); otherwise computed now,
        with autograd.
        """
        if not self._embedding_hooked():
            grad_enabled = torch.is_grad_enabled()
            table, reading = self._cache.lookup(grad_enabled)
            if table is None:
                table = self._table_after_miss(grad_enabled, reading)
            if table is not None:
                return table
        # PEFT's computation of the arange row, uncached: a hooked embedding (see _embedding_hooked), or a module
        # computing differently in training mode (see _table_after_miss)
        weight = self._modules["embedding"]._parameters["weight"]
        return self._modules_forward(torch.arange(self._num_rows, device=weight.device).unsqueeze(0))[0]

    def _table_after_miss(self, grad_enabled: bool, reading: tuple | None) -> torch.Tensor | None:
        """The table after a miss, or None where the modules must run on the call's own indices instead: a module
        computes differently in training mode (``ptfast._cache.training_dependent``: a dropout draws per row)."""
        table = self._cache.fill(
            self,
            self._compute_table,
            grad_enabled=grad_enabled,
            reading=reading,
            bind=self._bind_table,
            bind_train=self._bind_train_step,
        )
        if table is RUN_MODULES:
            return None
        return self._compute_table() if table is None else table

    def invalidate_cache(self) -> None:
        """Drop the cached table. Needed only after changes autograd cannot see, such as in-place writes through
        ``.data``."""
        self._cache.clear()

    # ------------------------------------------------------------------ pickling (pickle, torch.save, deepcopy)
    def __getstate__(self):
        # The cache's snapshot records version counters and process-wide counters of *these* tensors and this
        # process; a copy has fresh ones, which could match by chance and serve a stale table. Start empty instead.
        state = super().__getstate__()
        state.pop("_cache", None)
        state.pop("_index_check", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache = TableCache()
        self._index_check = None

    def _apply(self, fn, *args, **kwargs):
        self.invalidate_cache()  # dtype/device moves replace parameter storage
        self._index_check = None
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def _check_indices(self, indices: torch.Tensor, table: torch.Tensor | None) -> bool:
        """Validate ``indices`` (against ``table``'s device too, when given); return whether every row is
        ``arange(num_rows)``. ``forward`` skips this for the indices it checked last against the same table;
        without a table (a miss) those need no new check either, the table's device is checked later."""
        name = self._INDICES_NAME
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
        key = _index_key(indices)
        check = self._index_check
        n = self._num_rows
        if table is None and key is not None and check is not None and check.key == key and check.num_rows == n:
            return check.is_arange
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer (int64 or int32) tensor, got dtype {indices.dtype}")
        if indices.dim() != 2:
            raise ValueError(
                f"{name} must have shape (batch, num_tokens), got {indices.dim()} dims: {tuple(indices.shape)}"
            )
        weight = self.embedding.weight
        if indices.device != weight.device:
            raise ValueError(
                f"the {name} tensor is on {indices.device} but the encoder's weights are on {weight.device}"
            )
        is_arange = False
        if indices.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(indices))
            if lo < 0 or hi >= n:
                raise IndexError(
                    f"virtual-token index out of range: the {name} tensor spans [{lo}, {hi}] but the encoder has {n} "
                    f"virtual tokens (valid: 0..{n - 1})"
                )
            if indices.shape[1] == n:
                arange = torch.arange(n, device=indices.device, dtype=indices.dtype)
                is_arange = bool(torch.equal(indices, arange.expand_as(indices)))
        if table is not None and table.device != indices.device:  # load_state_dict(assign=True) can move weights
            raise ValueError(f"the {name} tensor is on {indices.device} but the encoder's table is on {table.device}")
        if key is not None:
            self._index_check = _IndexCheck(indices, key, is_arange, table, n)
        return is_arange

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a graph: no cache, no data-dependent path
            if self._embedding_hooked() or self._training_dependent_now():
                return self._modules_forward(indices)
            return self._traced_forward(indices)
        if _tracing_state() is not None:  # torch.jit.trace keeps aten ops only (no cache, no Triton launch)
            return self._modules_forward(indices)  # PEFT's computation, as its traced encoder records it
        grad_enabled = torch.is_grad_enabled()
        table, reading = self._cache.lookup(grad_enabled)  # no table unless cached and current
        check = self._index_check
        if table is not None and check is not None and check.matches(indices) and check.covers(table):
            is_arange = check.is_arange  # the same indices as last time, checked against this table's device
        else:
            is_arange = self._check_indices(indices, table)
        if table is None or not is_arange:
            if table is None and self._embedding_hooked():
                return self._modules_forward(indices)
            out = self._bypass(indices, is_arange, table is not None, grad_enabled)
            if out is not None:
                return out
        if table is None:
            table = self._table_after_miss(grad_enabled, reading)
            if table is None:  # a module computing differently in training: each row its own draw, as in PEFT
                return self._modules_forward(indices)
            if table.device != indices.device:
                name = self._INDICES_NAME
                raise ValueError(
                    f"the {name} tensor is on {indices.device} but the encoder's table is on {table.device}"
                )
        if is_arange:  # PeftModel.get_prompt's call: a view, no gather
            batch = indices.shape[0]
            # at B=1 not expand, whose backward is a sum (one more kernel per train step); [None] is an unsqueeze
            # (a view both ways), and the cheapest one to call
            return table[None] if batch == 1 else table.expand(batch, -1, -1)
        return F.embedding(indices, table)
