"""fused_mlp_head: the P-tuning MLP head, relu(relu(x @ w1.T + b1) @ w2.T + b2) @ w3.T + b3.

Public API
----------
``fused_mlp_head(x, w1, b1, w2, b2, w3, b3, *, precision=None)``

* ``x`` is ``(..., D)``; weights in ``nn.Linear`` layout: w1 (H, D), w2 (H, H), w3 (D, H);
  biases (H,), (H,), (D,). fp32 / fp16 / bf16, all the same dtype and device; fp32 accumulation.
* Backends: ``PTFAST_BACKEND=triton`` -> Triton kernels (``ptfast/kernels/mlp_head.py``); by default (``auto``)
  the eager reference below, on CUDA too, until a GPU run measures the kernels faster (README, Benchmarks): a plain
  ``F.linear`` chain with native autograd that is op-for-op PEFT's ``nn.Sequential`` (so CPU results are bitwise
  PEFT's). ``PTFAST_BACKEND=eager|triton`` (read at call time) forces a backend; forcing ``triton`` on CPU tensors
  requires ``TRITON_INTERPRET=1`` to be set before triton is imported (that is how the kernels are tested without a
  GPU).
* ``precision`` (fp32 only; 16-bit inputs ignore it) follows PyTorch by default (``None``): with
  ``torch.set_float32_matmul_precision("highest")`` (PyTorch's default) the kernels use 3xTF32 ("tf32x3":
  tensor cores, about fp32's error), with ``"high"`` or ``"medium"`` TF32 ("tf32"), as cuBLAS does for PEFT's
  ``F.linear``. Explicit choices: ``"tf32x3"``, ``"tf32"``, ``"ieee"`` (exact fp32 FMA on CUDA cores, slow) or
  PyTorch's names ``"highest"``/``"high"``/``"medium"``. ``resolve_precision`` is the one place that maps them;
  the eager backend follows PyTorch's setting like any ``F.linear``.
* Autograd: Triton backward kernels for dx, dw1..3, db1..3. The forward saves the post-ReLU
  activations h1, h2 (M x H each, tiny next to the weights) and uses (h > 0) as the ReLU masks,
  instead of recomputing them (which would re-stream w1/w2). Double backward is not supported on the
  Triton backend.
* Registration: ``torch.ops.ptfast.mlp_head_fwd`` / ``torch.ops.ptfast.mlp_head_bwd`` via
  ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` so ``torch.compile(
  fullgraph=True)`` sees one opaque op without a graph break. In eager mode the launchers are called directly
  (``_FusedHead`` when a gradient can flow): the dispatcher's host time would exceed the kernels' GPU time.
* Errors (TypeError / ValueError naming the offending argument) are raised before any launch.
"""

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import native
from .._env import resolve_backend

__all__ = [
    "fused_mlp_head",
    "bind_mlp_head",
    "bind_mlp_head_train",
    "mlp_head_reference",
    "resolve_precision",
    "PRECISIONS",
]

#: Kernel precisions (what ``tl.dot`` receives) and PyTorch's matmul-precision names, mapped onto them.
_KERNEL_PRECISIONS = ("tf32x3", "tf32", "ieee")
_TORCH_NAMES = {"highest": "tf32x3", "high": "tf32", "medium": "tf32"}
PRECISIONS = _KERNEL_PRECISIONS + tuple(_TORCH_NAMES)
_PRECISIONS = PRECISIONS + (None,)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mlp_head_reference(x, w1, b1, w2, b2, w3, b3):
    """Eager PyTorch, op for op what PEFT's ``nn.Sequential`` head does (so CPU results are bitwise PEFT's)."""
    # torch.relu: the aten op nn.ReLU reaches through F.relu's Python wrapper, without the wrapper
    h = torch.relu(F.linear(x, w1, b1))
    h = torch.relu(F.linear(h, w2, b2))
    return F.linear(h, w3, b3)


# ------------------------------------------------------------------------------------------------
# Validation and backend choice
# ------------------------------------------------------------------------------------------------

_NAMES = ("x", "w1", "b1", "w2", "b2", "w3", "b3")


_FP32_PRECISION = getattr(torch._C, "_get_fp32_precision_getter", None)  # what the torch.backends properties read


def _torch_allows_tf32() -> bool:
    """PyTorch's fp32 CUDA-matmul setting: torch >= 2.9 ``backends.cuda.matmul.fp32_precision`` ("ieee"/"tf32",
    "none" = inherit ``backends.fp32_precision``), else ``allow_tf32``; "high" and "medium" both mean TF32 for
    cuBLAS (``set_float32_matmul_precision`` sets these)."""
    p = None
    if _FP32_PRECISION is not None:
        p = _FP32_PRECISION("cuda", "matmul")
        if p == "none":
            p = _FP32_PRECISION("generic", "all")
    if p in ("ieee", "tf32"):
        return p == "tf32"
    return bool(torch._C._get_cublas_allow_tf32())


# Dynamo cannot trace the flag getters, so they are read at trace time: what torch.compiler.assume_constant_result
# does (it sets this attribute, torch/_dynamo/decorators.py), without importing torch._dynamo, which would add
# seconds to `import ptfast`. tests/test_mlp_head.py checks that the decorator still does exactly this.
_torch_allows_tf32._dynamo_marked_constant = True


def resolve_precision(precision=None, dtype=torch.float32) -> str:
    """The kernel precision a call runs with: "tf32x3", "tf32" or "ieee" (always "ieee" for 16-bit dtypes).

    ``None`` follows PyTorch's fp32 matmul setting (``torch.set_float32_matmul_precision`` /
    ``torch.backends.cuda.matmul``): "highest" -> "tf32x3", "high"/"medium" -> "tf32". Read at call time, so a
    cache of results should key on this value.
    """
    if precision is None:
        precision = "tf32" if _torch_allows_tf32() else "tf32x3"
    elif not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"fused_mlp_head: precision must be None or one of {PRECISIONS}, got {precision!r}")
    precision = _TORCH_NAMES.get(precision, precision)
    return precision if dtype == torch.float32 else "ieee"


# The "tf32" kernels failed their GPU test (test_gpu_precisions_and_paths[*-tf32]; benchmarks/NOTES.md) while
# "tf32x3" and "ieee" passed. Until the cause is known, a "tf32" request runs the 3xTF32 kernels: slower, never wrong.
_RUNS_AS = {"tf32": "tf32x3"}


def kernel_precision(precision=None, dtype=torch.float32) -> str:
    """The kernels a call actually runs: ``resolve_precision``, with "tf32" run as "tf32x3" (see _RUNS_AS)."""
    if precision is None and dtype is torch.float32:  # the common call, on every computed table
        return _FOLLOWING_TORCH[_torch_allows_tf32()]
    p = resolve_precision(precision, dtype)
    return _RUNS_AS.get(p, p)


# What an fp32 call that follows PyTorch's setting runs, by whether that setting allows TF32.
_FOLLOWING_TORCH = {allows: _RUNS_AS.get(p, p) for allows, p in ((True, "tf32"), (False, "tf32x3"))}


def _validate(tensors, precision) -> None:
    if precision in _PRECISIONS and _well_formed(*tensors):
        return  # the common case; the checks below only find the message for what is wrong
    if not (precision is None or (isinstance(precision, str) and precision in PRECISIONS)):
        raise ValueError(f"fused_mlp_head: precision must be None or one of {PRECISIONS}, got {precision!r}")
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_mlp_head: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"fused_mlp_head: {name} must be a floating-point tensor, got {t.dtype}")
    x, w1, b1, w2, b2, w3, b3 = tensors
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if t.dtype != x.dtype:
            raise TypeError(f"fused_mlp_head: all inputs must share x's dtype {x.dtype}, but {name} is {t.dtype}")
        if t.device != x.device:
            raise ValueError(
                f"fused_mlp_head: all inputs must be on x's device {x.device}, but {name} is on {t.device}"
            )
    if x.dim() < 1:
        raise ValueError("fused_mlp_head: x must have at least 1 dimension (..., D), got a 0-d tensor")
    for name, t, rank in (("w1", w1, 2), ("w2", w2, 2), ("w3", w3, 2), ("b1", b1, 1), ("b2", b2, 1), ("b3", b3, 1)):
        if t.dim() != rank:
            raise ValueError(f"fused_mlp_head: {name} must be {rank}-D, got shape {tuple(t.shape)}")
    D = x.shape[-1]
    H = w1.shape[0]
    if D == 0 or H == 0:
        raise ValueError(f"fused_mlp_head: D and H must be >= 1, got D={D}, H={H}")
    expected = {"w1": (H, D), "b1": (H,), "w2": (H, H), "b2": (H,), "w3": (D, H), "b3": (D,)}
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"fused_mlp_head: {name} has shape {tuple(t.shape)}, expected {expected[name]} "
                f"(x is (..., D={D}), w1 is (H={H}, D))"
            )


def _well_formed(x, w1, b1, w2, b2, w3, b3) -> bool:
    try:
        dtype, device = x.dtype, x.device
        if not x.is_floating_point() or x.dim() < 1:
            return False
        D, H = x.shape[-1], w1.shape[0]
        if (
            D == 0
            or H == 0
            or (w1.shape, b1.shape, w2.shape, b2.shape, w3.shape, b3.shape)
            != ((H, D), (H,), (H, H), (H,), (D, H), (D,))
        ):
            return False
        # unrolled: a generator over the six tensors costs more than the comparisons
        return (
            w1.dtype == dtype
            and b1.dtype == dtype
            and w2.dtype == dtype
            and b2.dtype == dtype
            and w3.dtype == dtype
            and b3.dtype == dtype
            and w1.device == device
            and b1.device == device
            and w2.device == device
            and b2.device == device
            and w3.device == device
            and b3.device == device
        )
    except AttributeError:  # not tensors
        return False


_KERNELS = None


def _kernels():
    """ptfast.kernels.mlp_head, imported on first use (it imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        from ..kernels import mlp_head

        _KERNELS = mlp_head
    return _KERNELS


# ------------------------------------------------------------------------------------------------
# torch.library registration: one opaque op for torch.compile, with a Triton backward
# ------------------------------------------------------------------------------------------------


def _fwd_impl(x, w1, b1, w2, b2, w3, b3, precision):
    return _kernels().mlp_head_forward(x, w1, b1, w2, b2, w3, b3, precision=precision)


def _bwd_impl(grad_out, x, w1, w2, w3, h1, h2, precision):
    return _kernels().mlp_head_backward(grad_out, x, w1, w2, w3, h1, h2, precision=precision)


@torch.library.custom_op("ptfast::mlp_head_fwd", mutates_args=())
def _mlp_head_fwd_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(x, w1, b1, w2, b2, w3, b3, precision)


@_mlp_head_fwd_op.register_fake
def _(x, w1, b1, w2, b2, w3, b3, precision):
    M, D = x.shape
    H = w1.shape[0]
    return x.new_empty((M, D)), x.new_empty((M, H)), x.new_empty((M, H))


@torch.library.custom_op("ptfast::mlp_head_bwd", mutates_args=())
def _mlp_head_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    h1: torch.Tensor,
    h2: torch.Tensor,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad_out, x, w1, w2, w3, h1, h2, precision)


@_mlp_head_bwd_op.register_fake
def _(grad_out, x, w1, w2, w3, h1, h2, precision):
    H, D = w1.shape
    return (
        x.new_empty(x.shape),
        w1.new_empty((H, D)),
        w1.new_empty((H,)),
        w2.new_empty((H, H)),
        w2.new_empty((H,)),
        w3.new_empty((D, H)),
        w3.new_empty((D,)),
    )


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, w3, b3, precision = inputs
    out, h1, h2 = output
    ctx.save_for_backward(x, w1, w2, w3, h1, h2)
    ctx.precision = precision


def _backward(ctx, grad_out, grad_h1, grad_h2):
    # h1 / h2 are internal (saved activations); the public function never exposes them.
    x, w1, w2, w3, h1, h2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, dw3, db3 = torch.ops.ptfast.mlp_head_bwd(grad_out, x, w1, w2, w3, h1, h2, ctx.precision)
    return dx, dw1, db1, dw2, db2, dw3, db3, None


_mlp_head_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _triton_head(x2d, w1, b1, w2, b2, w3, b3, precision):
    return torch.ops.ptfast.mlp_head_fwd(x2d, w1, b1, w2, b2, w3, b3, precision)[0]


# ------------------------------------------------------------------------------------------------
# Eager mode: the launchers called directly (no torch.library dispatch: it costs more host time than the kernels
# take on the GPU at the seed shape), under a plain autograd.Function when a gradient can flow
# ------------------------------------------------------------------------------------------------


def first_order_only(backward):
    """``once_differentiable``, paid only where it acts: a backward run with grad mode on (``create_graph=True``)
    goes through it, so a second derivative through the op raises instead of being silently zero; the usual
    backward (grad mode off) skips its ``no_grad`` context and checks (benchmarks/NOTES.md, "Host cost")."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return once(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


class _FusedHead(torch.autograd.Function):
    """The Triton head with autograd. h1 / h2 are saved, not returned, so autograd makes no zero gradients for them.
    ``prepared``: a train step's prepared launches (``_PreparedTrainStep``), used where they can launch."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3, precision, prepared=None):
        result = None if prepared is None else prepared.forward_launch()
        if result is None:
            result = _kernels().mlp_head_forward(x, w1, b1, w2, b2, w3, b3, precision=precision)
        out, h1, h2 = result
        ctx.save_for_backward(x, w1, w2, w3, h1, h2)
        ctx.precision, ctx.prepared = precision, prepared
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        x, w1, w2, w3, h1, h2 = ctx.saved_tensors
        prepared = ctx.prepared
        grads = None if prepared is None else prepared.backward_launch(grad_out, h1, h2)
        if grads is None:
            grads = _kernels().mlp_head_backward(grad_out, x, w1, w2, w3, h1, h2, precision=ctx.precision)
        return (*grads, None, None)


def _needs_grad(tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t.requires_grad:
            return True
    return False


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------


def fused_mlp_head(x, w1, b1, w2, b2, w3, b3, *, precision=None) -> torch.Tensor:
    """``relu(relu(x @ w1.T + b1) @ w2.T + b2) @ w3.T + b3`` for ``x`` of shape ``(..., D)``.

    Args:
        x: ``(..., D)``; w1 ``(H, D)``, b1 ``(H,)``, w2 ``(H, H)``, b2 ``(H,)``, w3 ``(D, H)``, b3 ``(D,)``.
        precision: fp32 dot precision; ``None`` follows ``torch.get_float32_matmul_precision()`` (see
            ``resolve_precision``).

    Returns: ``(..., D)``, x's dtype. Example::

        y = fused_mlp_head(x, l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias)

    See the module docstring for backends and autograd. The eager backend accepts any
    floating dtype; the Triton backend accepts fp32 / fp16 / bf16.
    """
    tensors = (x, w1, b1, w2, b2, w3, b3)
    _validate(tensors, precision)
    if resolve_backend("mlp_head", x.device) == "eager":
        return mlp_head_reference(x, w1, b1, w2, b2, w3, b3)
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"fused_mlp_head: the Triton backend supports float32/float16/bfloat16, got {x.dtype}")
    D = x.shape[-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, D)
    p = kernel_precision(precision, x.dtype)
    if torch.compiler.is_compiling():  # one opaque node for the graph (the custom op and its fake)
        out = _triton_head(x2d, w1, b1, w2, b2, w3, b3, p)
    elif _needs_grad(tensors):
        out = _FusedHead.apply(x2d, w1, b1, w2, b2, w3, b3, p, None)
    else:
        out = _kernels().mlp_head_forward(x2d, w1, b1, w2, b2, w3, b3, precision=p, keep_activations=False)[0]
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], D)


# ------------------------------------------------------------------------------------------------
# Recomputing on the same tensors (the encoders' table cache after an optimizer step)
# ------------------------------------------------------------------------------------------------


def bind_mlp_head(x, w1, b1, w2, b2, w3, b3):
    """``fused_mlp_head(x, w1, ..., b3)`` prepared for computing again and again from these same tensors' current
    values, where no gradient flows: what the call decides (validation, backend, precision, launch plan) is
    decided once, here.

    Returns a callable of no arguments that returns the ``(M, D)`` result, or None (computing nothing) where it
    cannot launch now what it prepared: then call ``fused_mlp_head``. It stays valid while the tensors keep their
    memory, shapes and strides and the backend, fp32 matmul precision and autocast settings are the ones of this
    call; the caller checks that (the encoders' cache snapshot records them). ``x`` is 2-D.
    """
    return _decided("bind_mlp_head", (x, w1, b1, w2, b2, w3, b3), _PreparedHead)


def _decided(name: str, tensors: tuple, prepared_cls):
    """What one ``fused_mlp_head`` call on ``tensors`` decides, decided once: the eager reference bound to them, or
    on the Triton backend ``prepared_cls(tensors, precision)``. Raises as the call would on bad input."""
    x = tensors[0]
    _validate(tensors, None)
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D (M, D), got shape {tuple(x.shape)}")
    if resolve_backend("mlp_head", x.device) == "eager":
        return functools.partial(mlp_head_reference, *tensors)
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"fused_mlp_head: the Triton backend supports float32/float16/bfloat16, got {x.dtype}")
    return prepared_cls(tensors, kernel_precision(None, x.dtype))


class _PreparedHead:
    """``bind_mlp_head``'s Triton callable. Its first call runs the launchers (compiling on first use); its second
    prepares the one launch (``kernels.mlp_head.bind_forward``: ``bound``), which every later call makes directly,
    where there is one (not under the interpreter, not for shapes that take several launches). Preparing on the
    second call keeps a table computed only once (the first call after a change of structure) as cheap as a plain
    ``fused_mlp_head`` call."""

    __slots__ = ("tensors", "precision", "bound", "calls")

    def __init__(self, tensors: tuple, precision: str):
        self.tensors, self.precision, self.bound, self.calls = tensors, precision, None, 0

    def __call__(self) -> torch.Tensor | None:
        bound = self.bound
        if bound is not None:
            return bound()
        self.calls = calls = self.calls + 1
        if calls == 2:  # threads racing here each prepare an equivalent launch; the last one stays
            self.bound = bound = _kernels().bind_forward(*self.tensors, precision=self.precision)
            if bound is not None:
                return bound()
        return _kernels().mlp_head_forward(*self.tensors, precision=self.precision, keep_activations=False)[0]


# ------------------------------------------------------------------------------------------------
# A train step on the same tensors again and again (the encoders' prepared train step)
# ------------------------------------------------------------------------------------------------


def bind_mlp_head_train(x, w1, b1, w2, b2, w3, b3):
    """``fused_mlp_head(x, w1, ..., b3)`` with autograd, prepared for a train step that runs again and again on
    these same tensors: what the call decides (validation, backend, precision, launch plans) is decided once, here.

    Returns a callable of no arguments that returns the ``(M, D)`` output with its graph, or None (computing
    nothing) where the tensors' memory, dtype, device, shapes or strides changed since (then call
    ``fused_mlp_head``); returns None instead of a callable where it cannot check that (no native extension
    loaded). The rest is the caller's to check, as for ``bind_mlp_head``: the same tensors, and the backend, fp32
    matmul precision and autocast settings of this call (the encoders' train record holds them). ``x`` is 2-D.
    """
    tensors = (x, w1, b1, w2, b2, w3, b3)
    compute = _decided("bind_mlp_head_train", tensors, _PreparedTrainStep)
    module = native.table_check_module()
    layout = None if module is None else module.layout_key(tensors)
    return None if layout is None else _LayoutChecked(compute, tensors, layout, module.same_layout)


class _LayoutChecked:
    """``compute()`` while ``tensors`` keep the memory and layout they had (``layout``), else None."""

    __slots__ = ("compute", "tensors", "layout", "same_layout")

    def __init__(self, compute, tensors: tuple, layout: bytes, same_layout):
        self.compute, self.tensors, self.layout, self.same_layout = compute, tensors, layout, same_layout

    def __call__(self) -> torch.Tensor | None:
        return self.compute() if self.same_layout(self.tensors, self.layout) else None


class _PreparedTrainStep:
    """``bind_mlp_head_train``'s Triton callable: ``_FusedHead`` on the bound tensors, its forward and backward
    launched as prepared launches (``kernels.mlp_head.bind_forward`` / ``bind_backward``) where there are (not
    under the interpreter, not for shapes that take several launches). Each is prepared at its second call, once
    the first one launched (and compiled), as ``_PreparedHead`` does."""

    __slots__ = ("tensors", "precision", "forward", "backward", "forward_calls", "backward_calls")

    def __init__(self, tensors: tuple, precision: str):
        self.tensors, self.precision = tensors, precision
        self.forward = self.backward = None
        self.forward_calls = self.backward_calls = 0

    def __call__(self) -> torch.Tensor:
        return _FusedHead.apply(*self.tensors, self.precision, self)

    def forward_launch(self) -> tuple | None:
        """``(out, h1, h2)`` from the prepared launch, or None (nothing launched: the caller runs the launchers)."""
        bound = self.forward
        if bound is None:
            self.forward_calls = calls = self.forward_calls + 1
            if calls != 2:
                return None
            self.forward = bound = _kernels().bind_forward(*self.tensors, precision=self.precision)
            if bound is None:
                return None
        return bound.with_activations()

    def backward_launch(self, grad_out, h1, h2) -> tuple | None:
        """The seven gradients from the prepared launch, or None (nothing launched)."""
        bound = self.backward
        if bound is None:
            self.backward_calls = calls = self.backward_calls + 1
            if calls != 2:
                return None
            x, w1, _, w2, _, w3, _ = self.tensors
            self.backward = bound = _kernels().bind_backward(x, w1, w2, w3, precision=self.precision)
            if bound is None:
                return None
        return bound(grad_out, h1, h2)
