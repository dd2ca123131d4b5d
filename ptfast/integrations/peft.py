"""Use ``ptfast.PromptEncoder`` inside PEFT models.

Supported PEFT versions: written for PEFT >= 0.13 (the floor in ``pyproject.toml``) and coded defensively for the
hooks that only recent versions have; **only PEFT 0.21.x is tested**. peft is imported lazily, inside the functions.

Per model::

    model = get_peft_model(base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    ptfast.patch(model)      # every P-tuning adapter now runs a ptfast.PromptEncoder (same Parameter objects),
                             # and so do the ones add_adapter / load_adapter add to this model later; prefix
                             # tuning gets a ptfast.PrefixEncoder; every prompt-learning method (also prompt
                             # tuning) a correct generate where the installed PEFT needs one
    ...
    ptfast.unpatch(model)    # back to PEFT's own PromptEncoder, with the current weights

Globally (Liger-style), for every ``PeftModel`` created afterwards (``get_peft_model``, ``PeftModel.from_pretrained``,
``add_adapter``, ``load_adapter``)::

    ptfast.patch_peft()
    model = get_peft_model(base, config)   # already ptfast
    ptfast.unpatch_peft()                  # new models get PEFT's encoder again (existing ones are left as they are,
                                           # adapters added to them later included)

How it works
------------
* ``patch`` builds each replacement with ``PromptEncoder.from_peft(encoder, share_parameters=True)``: the new encoder
  holds PEFT's very ``nn.Parameter`` objects, so dtype, device, ``requires_grad``, optimizer state (keyed by
  parameter), DDP's gradient hooks and buckets, and ``model.state_dict()`` keys are all unchanged. The PEFT encoder
  is dropped from the model; whoever still holds it sees the same parameters (both modules compute the same thing).
  Forward hooks registered on the encoder itself are carried over; accelerate's ``_hf_hook`` is not (PEFT removes it
  from prompt encoders itself), a warning says so.
* Patched models carry their own ``generate`` (where the installed PEFT needs the fix: ``generation.py``) and
  ``_setup_prompt_encoder`` (so P-tuning adapters added later are converted) as instance attributes: the class is
  untouched, and pickle, ``torch.save``, ``copy.deepcopy`` and spawned workers give back a patched copy.
* ``patch_peft`` wraps ``PeftModel._setup_prompt_encoder``, the one place where PEFT builds prompt-learning encoders:
  after PEFT has built its encoder (same init order, so the same seed gives the same weights as without the patch) it
  is converted as ``patch`` does. ``PEFT_TYPE_TO_TUNER_MAPPING`` is left alone: ``save_and_load`` calls PEFT's
  classmethods (``_get_adapter_state_dict``, ``_remap_adapter_state_dict_for_load``) on that class.
* Checkpoints: PEFT's ``save_pretrained``/``load_adapter`` work unchanged on patched models. PEFT >= 0.21 loads
  through ``encoder._load_adapter_state_dict(state_dict)``, which ``ptfast.PromptEncoder`` implements; older PEFT
  writes ``encoder.embedding`` directly, which also works (the cached table notices the write).

Resuming training from a PEFT checkpoint
----------------------------------------
PEFT saves only the reparameterized table ``prompt_embeddings`` (``mlp_head(embedding.weight)``), not the MLP/LSTM
head. In PEFT 0.21:

* ``PeftModel.from_pretrained(base, dir)`` builds the encoder with ``inference_mode=True`` (embedding only), loads the
  table into ``embedding`` and uses it as is: the prompts are exactly the saved ones, but nothing is trainable.
* ``PeftModel.from_pretrained(..., is_trainable=True)`` and ``load_adapter(dir, new_name, is_trainable=True)`` raise
  ``ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")``.
* The only route left, ``get_peft_model(base, config)`` followed by ``load_adapter(dir, "default")`` (or
  ``set_peft_model_state_dict``), loads the saved table into ``embedding`` of a full encoder whose head is freshly
  initialized: the prompts become ``fresh_mlp(saved_table)``, i.e. the trained prompts are lost.

To resume exactly, also write the full encoder with ``save_encoder_state(model, dir)`` (a ``ptfast_encoder.safetensors``
beside PEFT's files, which PEFT ignores) and rebuild with ``load_for_training(base, dir)`` or ``get_peft_model`` +
``load_encoder_state``. PEFT's own files stay loadable by plain PEFT.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Any

import torch
from torch import nn

from ..config import PATCHABLE_TYPES, PREFIX_TUNING, is_p_tuning, is_prompt_learning, peft_type_name  # noqa: F401 (re-exported)
from ..encoder import PromptEncoder, adopt_parameters, is_inference_encoder
from ..prefix_encoder import PrefixEncoder
from . import generation
from .binding import BoundToModel, bind_to_instance, unbind_from_instance  # noqa: F401 (re-exported)

__all__ = [
    "is_p_tuning",
    "is_prompt_learning",
    "is_peft_patched",
    "patch",
    "patch_peft",
    "peft_type_name",
    "unpatch",
    "unpatch_peft",
]


# nn.Module's hook dictionaries (names present in torch >= 2.0; missing ones are skipped).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


# ---------------------------------------------------------------------------------------------------- helpers
def _peft_model_cls():
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - peft is an optional dependency
        raise ImportError("ptfast.integrations.peft needs peft: pip install 'ptfast[peft]'") from e
    return PeftModel


def _peft_encoder_cls():
    from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder

    return PeftPromptEncoder


def _peft_prefix_encoder_cls():
    from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder

    return PeftPrefixEncoder


def _unwrap(model: Any, caller: str):
    """The ``PeftModel`` in ``model``: the model itself, or the ``.module`` of a (Distributed)DataParallel wrapper."""
    PeftModel = _peft_model_cls()
    inner = model
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    if isinstance(inner, PeftModel):
        return inner
    hint = ""
    if hasattr(inner, "_orig_mod"):
        hint = " (a torch.compile'd model: patch the PeftModel before compiling it)"
    elif isinstance(inner, nn.Module) and hasattr(inner, "peft_config"):
        hint = " (a model with PEFT adapters injected in place: P-tuning needs a PeftModel from get_peft_model)"
    raise TypeError(
        f"{caller} expects a peft.PeftModel (or a DistributedDataParallel/DataParallel wrapping one), "
        f"got {type(model).__module__}.{type(model).__qualname__}{hint}"
    )


def _prompt_learning_adapters(peft_model, caller: str) -> list[str]:
    """Names of the adapters ``patch`` takes (in ``peft_config`` order); ValueError naming what was found if none."""
    configs = dict(getattr(peft_model, "peft_config", {}) or {})
    names = [name for name, config in configs.items() if is_prompt_learning(config)]
    if not names:
        found = {name: peft_type_name(config) for name, config in configs.items()} or "no adapters"
        raise ValueError(
            f"{caller}: {type(peft_model).__name__} has no prompt-learning adapter ptfast handles (found {found}). "
            f"ptfast takes the PEFT types {list(PATCHABLE_TYPES)} (PromptEncoderConfig, PromptTuningConfig, "
            "MultitaskPromptTuningConfig, PrefixTuningConfig)."
        )
    return names


def _carry_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Move the encoder-level hooks to the new module (sharing the dicts, so existing handles still remove them)."""
    for attr in _HOOK_DICTS:
        hooks = getattr(src, attr, None)
        if hooks and hasattr(dst, attr):
            setattr(dst, attr, hooks)
    if getattr(src, "_hf_hook", None) is not None:
        warnings.warn(
            f"the {type(src).__name__} being replaced has an accelerate hook (_hf_hook); it is not carried over "
            "to the new encoder (PEFT itself removes these from prompt encoders)."
        )
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in src.modules() if m is not src):
        warnings.warn(
            f"hooks registered on submodules of the {type(src).__name__} being replaced are not carried over; "
            "register them on the new encoder's submodules."
        )


def _check_same_parameters(src: nn.Module, dst: nn.Module) -> None:
    a, b = dict(src.named_parameters()), dict(dst.named_parameters())
    if a.keys() != b.keys() or any(a[k] is not b[k] for k in a):  # pragma: no cover - a bug in from_peft
        raise RuntimeError(f"converting {type(src).__name__} did not keep its parameter objects")


def _to_ptfast(encoder: nn.Module) -> PromptEncoder:
    new = PromptEncoder.from_peft(encoder, share_parameters=True)
    _check_same_parameters(encoder, new)
    _carry_hooks(encoder, new)
    return new


def _to_peft(encoder: PromptEncoder) -> nn.Module:
    PeftPromptEncoder = _peft_encoder_cls()
    lstm = encoder._modules.get("lstm_head")
    config = types.SimpleNamespace(
        token_dim=encoder.token_dim,
        encoder_hidden_size=encoder.hidden_size,
        num_virtual_tokens=encoder.total_virtual_tokens,
        num_transformer_submodules=1,
        encoder_reparameterization_type=encoder.encoder_type,
        inference_mode=is_inference_encoder(encoder),
        encoder_num_layers=lstm.num_layers if lstm is not None else 2,
        encoder_dropout=lstm.dropout if lstm is not None else 0.0,
    )
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # the MLP `encoder_num_layers` warning was given when the adapter was built
        new = PeftPromptEncoder(config)
    adopt_parameters(encoder, new, share=True)
    _check_same_parameters(encoder, new)
    new.train(encoder.training)
    _carry_hooks(encoder, new)
    if type(new) is not PeftPromptEncoder:  # pragma: no cover
        raise RuntimeError(f"unpatch built a {type(new).__name__}, expected PEFT's PromptEncoder")
    return new


def _prefix_to_ptfast(encoder: nn.Module) -> PrefixEncoder:
    new = PrefixEncoder.from_peft(encoder, share_parameters=True)
    _check_same_parameters(encoder, new)
    _carry_hooks(encoder, new)
    return new


def _prefix_to_peft(encoder: PrefixEncoder) -> nn.Module:
    PeftPrefixEncoder = _peft_prefix_encoder_cls()
    head = encoder._modules.get("transform")
    weight = encoder.embedding.weight
    if head is not None:
        token_dim = weight.shape[1]
        num_layers, hidden = head[-1].weight.shape[0] // (2 * token_dim), head[0].weight.shape[0]
    else:  # the table itself: PEFT's encoder then holds Embedding(T, num_layers * 2 * token_dim); only the product
        token_dim, num_layers, hidden = weight.shape[1] // 2, 1, None
    config = types.SimpleNamespace(
        num_virtual_tokens=weight.shape[0],
        token_dim=token_dim,
        num_layers=num_layers,
        encoder_hidden_size=hidden,
        prefix_projection=head is not None,
        inference_mode=head is None,
        init_weights=None,
    )
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        new = PeftPrefixEncoder(config)
    new.prefix_projection = encoder.prefix_projection  # PEFT keeps the config's flag, even on a table-only encoder
    adopt_parameters(encoder, new, share=True)
    _check_same_parameters(encoder, new)
    new.train(encoder.training)
    _carry_hooks(encoder, new)
    if type(new) is not PeftPrefixEncoder:  # pragma: no cover
        raise RuntimeError(f"unpatch built a {type(new).__name__}, expected PEFT's PrefixEncoder")
    return new


def _to_ptfast_encoder(peft_model, name: str) -> None:
    """Swap the encoder of adapter ``name`` for ptfast's (P-tuning: PromptEncoder, prefix tuning: PrefixEncoder)."""
    config, encoders = peft_model.peft_config[name], peft_model.prompt_encoder
    if is_p_tuning(config) and not isinstance(encoders[name], PromptEncoder):
        encoders[name] = _to_ptfast(encoders[name])
    elif peft_type_name(config) == PREFIX_TUNING and not isinstance(encoders[name], PrefixEncoder):
        encoders[name] = _prefix_to_ptfast(encoders[name])


def _convert_new_adapter(peft_model, adapter_name: str) -> None:
    """After PEFT built the encoder of ``adapter_name``: make it ptfast's if the adapter is P-tuning or prefix
    tuning, and give the model the fixed generate if the adapter is any prompt-learning method ptfast takes."""
    if is_prompt_learning(peft_model.peft_config[adapter_name]):
        _to_ptfast_encoder(peft_model, adapter_name)
        generation.patch_generate(peft_model)
        _convert_later_adapters(peft_model)  # also after unpatch_peft(), as for a model given to patch()


def _convert_later_adapters(peft_model) -> None:
    if hasattr(type(peft_model), "_setup_prompt_encoder"):  # PEFT's one builder of prompt encoders (patch_peft)
        bind_to_instance(peft_model, "_setup_prompt_encoder", _setup_prompt_encoder_of_patched_model)


def _setup_prompt_encoder_of_patched_model(peft_model, adapter_name, *args, **kwargs):
    """A patched model's own ``_setup_prompt_encoder``: ``add_adapter`` / ``load_adapter`` of a P-tuning adapter
    gives a ptfast encoder (and any prompt-learning adapter the fixed generate), as on a model built under
    :func:`patch_peft`."""
    result = type(peft_model)._setup_prompt_encoder(peft_model, adapter_name, *args, **kwargs)
    _convert_new_adapter(peft_model, adapter_name)
    return result


# ---------------------------------------------------------------------------------------------------- per model
def patch(model):
    """Make the prompt-learning adapters of ``model`` ptfast's; return ``model``.

    * P-tuning (``PromptEncoderConfig``): the encoder becomes a ``ptfast.PromptEncoder``.
    * Prefix tuning / P-tuning v2 (``PrefixTuningConfig``): the encoder becomes a ``ptfast.PrefixEncoder`` (a cached
      key/value table; the projection head computed once per table, not per row).
    * Every method it takes (P-tuning, prompt tuning, multitask prompt tuning, prefix tuning / P-tuning v2): the
      model instance gets a correct ``generate`` where the installed PEFT generates wrongly for that method
      (``generation.py``: a probe per method decides).

    ``model`` is a ``peft.PeftModel`` of any task type (or a ``DistributedDataParallel``/``DataParallel`` wrapping
    one; the wrapper is returned). The new encoders hold the *same* ``nn.Parameter`` objects (so dtype, device,
    ``requires_grad``, optimizer state, DDP hooks and ``state_dict`` keys are unchanged) and the same train/eval mode.
    Idempotent: encoders that already are ptfast's are left alone. Adapters of other PEFT types are never touched.
    Prompt-learning adapters added to this model later (``add_adapter``, ``load_adapter``) are handled too.

    Raises:
        TypeError: ``model`` is not a ``PeftModel`` (or a DDP/DataParallel wrapper of one).
        ValueError: the model has no adapter of a method ptfast takes (LoRA, CPT, ...). The message lists the
            adapters and PEFT types it found. This is an error rather than a warning because a silent no-op would
            leave a user believing they run ptfast while they do not.
    """
    peft_model = _unwrap(model, "ptfast.patch")
    for name in _prompt_learning_adapters(peft_model, "ptfast.patch"):
        _to_ptfast_encoder(peft_model, name)
    generation.patch_generate(peft_model)  # KV-cached generate that prepends the prompt once (README)
    _convert_later_adapters(peft_model)
    return model


def unpatch(model):
    """Put PEFT's own encoders back (``PromptEncoder`` on P-tuning adapters, ``PrefixEncoder`` on prefix-tuning
    ones) and PEFT's ``generate`` back on the instance; return ``model``.

    The restored encoders hold the current ``nn.Parameter`` objects of the ptfast encoders (so training state is kept)
    and their train/eval mode. Idempotent; raises like :func:`patch` (TypeError / ValueError).
    """
    peft_model = _unwrap(model, "ptfast.unpatch")
    names = _prompt_learning_adapters(peft_model, "ptfast.unpatch")
    encoders = peft_model.prompt_encoder
    for name in names:
        if isinstance(encoders[name], PromptEncoder):
            encoders[name] = _to_peft(encoders[name])
        elif isinstance(encoders[name], PrefixEncoder):
            encoders[name] = _prefix_to_peft(encoders[name])
    generation.unpatch_generate(peft_model)
    unbind_from_instance(peft_model, "_setup_prompt_encoder", _setup_prompt_encoder_of_patched_model)
    return model


# ---------------------------------------------------------------------------------------------------- global
def _current_setup(PeftModel):
    return PeftModel.__dict__.get("_setup_prompt_encoder")


def patch_peft() -> None:
    """Make every ``PeftModel`` created from now on use ``ptfast.PromptEncoder`` for its P-tuning adapters,
    ``ptfast.PrefixEncoder`` for its prefix-tuning ones, and a correct ``generate`` for its prompt-learning adapters
    (where the installed PEFT needs it), as :func:`patch` does.

    Wraps ``PeftModel._setup_prompt_encoder`` (used by ``get_peft_model``, ``PeftModel.from_pretrained``,
    ``add_adapter`` and ``load_adapter``): PEFT builds its encoder as usual, then it is converted like :func:`patch`
    does. Other PEFT types (LoRA, CPT, ...) are untouched. Idempotent; undo with :func:`unpatch_peft`. Models that
    exist already are not changed: use :func:`patch` on them.
    """
    PeftModel = _peft_model_cls()
    original = _current_setup(PeftModel)
    if original is None:  # pragma: no cover - very old or future PEFT
        raise RuntimeError(
            "ptfast.patch_peft: this PEFT version has no PeftModel._setup_prompt_encoder; use ptfast.patch(model)"
        )
    if getattr(original, "_ptfast_original", None) is not None:
        return  # already patched

    @functools.wraps(original)
    def _setup_prompt_encoder(self, adapter_name, *args, **kwargs):
        result = original(self, adapter_name, *args, **kwargs)
        _convert_new_adapter(self, adapter_name)
        return result

    _setup_prompt_encoder._ptfast_original = original
    PeftModel._setup_prompt_encoder = _setup_prompt_encoder


def unpatch_peft() -> None:
    """Undo :func:`patch_peft`: new models get PEFT's own encoder again. Idempotent.

    Models created while patched keep their ptfast encoders, and P-tuning adapters added to them later are ptfast's
    too (use :func:`unpatch` on them). If someone wrapped
    ``_setup_prompt_encoder`` again after ``patch_peft``, their wrapper is left in place and a warning is given.
    """
    PeftModel = _peft_model_cls()
    current = _current_setup(PeftModel)
    original = getattr(current, "_ptfast_original", None)
    if original is not None:
        PeftModel._setup_prompt_encoder = original
        return
    inner = getattr(current, "__wrapped__", None)
    while inner is not None:
        if getattr(inner, "_ptfast_original", None) is not None:
            warnings.warn(
                "ptfast.unpatch_peft: PeftModel._setup_prompt_encoder was wrapped again after patch_peft(); "
                "leaving it as is, so new models still get ptfast encoders."
            )
            return
        inner = getattr(inner, "__wrapped__", None)


def is_peft_patched() -> bool:
    """Whether :func:`patch_peft` is in effect."""
    return getattr(_current_setup(_peft_model_cls()), "_ptfast_original", None) is not None
