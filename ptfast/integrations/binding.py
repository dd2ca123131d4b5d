"""Per-instance method overrides that survive pickling: how ``ptfast.patch`` gives one model its own ``generate``
and ``_setup_prompt_encoder`` without touching the class or other instances (used by ``peft.py`` and
``generation.py``)."""

from __future__ import annotations

__all__ = ["BoundToModel", "bind_to_instance", "unbind_from_instance"]


class BoundToModel:
    """``func`` bound to one model, for a per-instance override kept in the model's ``__dict__`` (``generate``,
    ``_setup_prompt_encoder``): the class, and every other instance, are left alone.

    A bound method would do the same, but it does not survive pickling (``pickle``, ``torch.save``, a spawned
    worker): pickle rebuilds it as ``getattr(model, func.__name__)`` on the not yet filled model, which
    ``PeftModel.__getattr__`` answers with ``AttributeError: ... no attribute 'base_model'``. This one is rebuilt
    from ``func`` (a module-level function, pickled by name) and the model, and ``copy.deepcopy`` binds it to the
    copy. ``__func__`` / ``__self__`` are named as on a bound method.
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, func, model):
        self.__func__ = func
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return type(self), (self.__func__, self.__self__)

    def __repr__(self) -> str:
        return f"<ptfast {self.__func__.__qualname__} of {type(self.__self__).__name__} at {id(self.__self__):#x}>"


def bind_to_instance(model, name: str, func) -> None:
    """``model.<name>`` becomes ``func`` bound to ``model`` (an instance attribute)."""
    model.__dict__[name] = BoundToModel(func, model)


def unbind_from_instance(model, name: str, func) -> None:
    """Undo :func:`bind_to_instance` (only if ``model.<name>`` is ``func`` bound there): the class's method again."""
    if getattr(model.__dict__.get(name), "__func__", None) is func:
        del model.__dict__[name]
