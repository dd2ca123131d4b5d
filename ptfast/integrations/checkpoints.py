"""The full P-tuning or prefix-tuning encoder in a checkpoint, for resuming training exactly (PEFT saves only the
table).

``save_encoder_state`` writes ``ptfast_encoder.safetensors`` beside PEFT's files (PEFT ignores it);
``load_encoder_state`` and ``load_for_training`` restore it. See ``ptfast.integrations.peft`` for why PEFT's own
files cannot resume a P-tuning adapter; a prefix-tuning adapter with ``prefix_projection`` has the same problem (its
embedding and ``transform`` head are not saved, only the projected table), and one without projection is saved whole
by PEFT (its table is its only parameter), but is covered too, so that one call handles every adapter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from torch import nn

from ..config import PREFIX_TUNING, is_p_tuning, peft_type_name
from ..encoder import is_inference_encoder
from ..errors import UnknownAdapterError
from .peft import _unwrap
from .peft import patch as _patch

__all__ = ["ENCODER_STATE_FILE", "load_encoder_state", "load_for_training", "save_encoder_state"]

ENCODER_STATE_FILE = "ptfast_encoder.safetensors"
_FORMAT_VERSION = "1"


# Keys of a head in the file: P-tuning's MLP/LSTM, prefix tuning's projection.
_HEAD_KEY_PREFIXES = ("mlp_head.", "lstm_head.", "transform.")


def _is_prefix_tuning(config) -> bool:
    return peft_type_name(config) == PREFIX_TUNING


def _is_prefix_encoder(encoder: nn.Module) -> bool:
    """PEFT's ``PrefixEncoder`` or ptfast's (both have ``prefix_projection``; P-tuning encoders do not)."""
    return "embedding" in encoder._modules and hasattr(encoder, "prefix_projection")


def _encoder_adapters(peft_model, caller: str, selected: Iterable[str] | None = None) -> list[str]:
    """Names of the P-tuning and prefix-tuning adapters (in ``peft_config`` order), the ones whose encoder PEFT does
    not save whole; ValueError naming what was found if there are none."""
    configs = dict(getattr(peft_model, "peft_config", {}) or {})
    if selected is not None:
        selected = [selected] if isinstance(selected, str) else list(selected)
        unknown = [name for name in selected if name not in configs]
        if unknown:
            raise UnknownAdapterError(f"{caller}: unknown adapter(s) {unknown}; the model has {sorted(configs)}")
        configs = {name: configs[name] for name in selected}
    encoders = getattr(peft_model, "prompt_encoder", None)
    names = [
        name
        for name, config in configs.items()
        if (is_p_tuning(config) or _is_prefix_tuning(config)) and encoders is not None and name in encoders
    ]
    if not names:
        found = {name: peft_type_name(config) for name, config in configs.items()} or "no adapters"
        raise ValueError(
            f"{caller}: {type(peft_model).__name__} has no P-tuning adapter and no prefix-tuning adapter (found "
            f"{found}). Only those encoders (peft.PromptEncoderConfig, peft.PrefixTuningConfig) are saved here."
        )
    return names


def _metadata(encoder: nn.Module, name: str) -> dict:
    """What the file says about the encoder (informational: loading checks the keys and shapes themselves)."""
    metadata = {"format": "pt", "ptfast_encoder_format": _FORMAT_VERSION, "adapter_name": name}
    if _is_prefix_encoder(encoder):
        head = encoder._modules.get("transform")
        num_virtual_tokens, width = encoder.embedding.weight.shape
        metadata.update(
            peft_type=PREFIX_TUNING, num_virtual_tokens=str(num_virtual_tokens), prefix_projection=str(head is not None)
        )
        if head is not None:
            metadata.update(
                token_dim=str(width),
                encoder_hidden_size=str(head[0].weight.shape[0]),
                table_width=str(head[-1].weight.shape[0]),
            )
        else:
            metadata.update(table_width=str(width))
        return metadata
    encoder_type = getattr(encoder.encoder_type, "value", encoder.encoder_type)
    metadata.update(
        encoder_type=str(encoder_type),
        total_virtual_tokens=str(encoder.total_virtual_tokens),
        token_dim=str(encoder.token_dim),
        encoder_hidden_size=str(encoder.hidden_size),
    )
    return metadata


def _adapter_dir(directory: str, adapter_name: str) -> str:
    # PEFT's save_pretrained layout: the "default" adapter at the top, the others in a sub-folder named after them.
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def save_encoder_state(
    model,
    save_directory: str,
    *,
    selected_adapters: Iterable[str] | None = None,
    is_main_process: bool = True,
) -> list[str]:
    """Write the *full* encoder of each P-tuning adapter (embedding and MLP/LSTM head) and prefix-tuning adapter
    (embedding and, with ``prefix_projection``, the ``transform`` head) to ``ptfast_encoder.safetensors``.

    The file goes where ``model.save_pretrained(save_directory)`` puts that adapter's files (``save_directory`` for
    ``"default"``, ``save_directory/<name>`` otherwise). PEFT ignores it, so PEFT's files stay loadable by plain PEFT;
    restore with :func:`load_encoder_state` or :func:`load_for_training`. Works on patched and unpatched models (the
    state_dict keys are the same). Returns the paths written (none when ``is_main_process`` is False).
    """
    from safetensors.torch import save_file

    peft_model = _unwrap(model, "ptfast.save_encoder_state")
    names = _encoder_adapters(peft_model, "ptfast.save_encoder_state", selected_adapters)
    if not is_main_process:
        return []
    paths = []
    for name in names:
        encoder = peft_model.prompt_encoder[name]
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in encoder.state_dict().items()}
        metadata = _metadata(encoder, name)
        out_dir = _adapter_dir(os.fspath(save_directory), name)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, ENCODER_STATE_FILE)
        save_file(state, path, metadata=metadata)
        paths.append(path)
    return paths


def _load_encoder_file(encoder: nn.Module, path: str, adapter_name: str) -> None:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {ENCODER_STATE_FILE} for adapter {adapter_name!r} at {path}. PEFT's adapter_model.safetensors holds "
            "only the reparameterized table (prompt_embeddings), not the MLP/LSTM head or the prefix projection, so a "
            "trainable encoder cannot be restored from it exactly; write the full encoder with "
            "ptfast.save_encoder_state(model, directory)."
        )
    state = load_file(path)
    has_head = any(key.startswith(_HEAD_KEY_PREFIXES) for key in state)
    is_prefix = _is_prefix_encoder(encoder)
    if has_head and is_prefix and "transform" not in encoder._modules:
        raise ValueError(
            f"adapter {adapter_name!r} has a prefix encoder without a projection head (an inference-mode one, as "
            "PeftModel.from_pretrained builds without is_trainable, or prefix_projection=False), but the file holds "
            "the projection head too. Build a trainable adapter with prefix_projection=True first, e.g. with "
            "ptfast.load_for_training(base_model, directory)."
        )
    if has_head and not is_prefix and is_inference_encoder(encoder):
        raise ValueError(
            f"adapter {adapter_name!r} has an inference-only encoder (embedding only, as PeftModel.from_pretrained "
            "builds without is_trainable), but the file holds the full encoder. Build a trainable adapter first, "
            "e.g. with ptfast.load_for_training(base_model, directory)."
        )
    expected = set(encoder.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"{path} does not match the encoder of adapter {adapter_name!r}: missing keys "
            f"{sorted(expected - set(state))}, unexpected keys {sorted(set(state) - expected)} (a file of another "
            "adapter type or configuration?)"
        )
    # load_state_dict copies in place (no_grad), keeping the Parameter objects, converting dtype/device, and
    # bumping version counters, so ptfast's cached table is refreshed.
    encoder.load_state_dict(state, strict=True)
    invalidate = getattr(encoder, "invalidate_cache", None)
    if invalidate is not None:
        invalidate()


def load_encoder_state(model, load_directory: str, *, selected_adapters: Iterable[str] | None = None):
    """Load files written by :func:`save_encoder_state` into the P-tuning and prefix-tuning encoders of ``model``;
    return ``model``.

    Uses the same layout as :func:`save_encoder_state` (``load_directory`` for ``"default"``,
    ``load_directory/<name>`` otherwise). The encoders must be trainable ones (built with ``inference_mode=False``,
    e.g. by ``get_peft_model``). Parameters are updated in place, so optimizers holding them keep working.

    Raises:
        FileNotFoundError: an adapter has no ``ptfast_encoder.safetensors``.
        ValueError: no P-tuning or prefix-tuning adapter, an inference-only encoder, or a file whose keys do not
            match the encoder's.
    """
    peft_model = _unwrap(model, "ptfast.load_encoder_state")
    for name in _encoder_adapters(peft_model, "ptfast.load_encoder_state", selected_adapters):
        path = os.path.join(_adapter_dir(os.fspath(load_directory), name), ENCODER_STATE_FILE)
        _load_encoder_file(peft_model.prompt_encoder[name], path, name)
    return model


def load_for_training(
    base_model: nn.Module, model_id: str, *, adapter_name: str = "default", patch: bool = True, **config_kwargs
):
    """Rebuild a *trainable* P-tuning or prefix-tuning ``PeftModel`` from a local directory written by
    ``save_pretrained`` + :func:`save_encoder_state`, with the exact encoder (embedding and head) that was saved.

    ``model_id`` is the folder holding that adapter's ``adapter_config.json`` and ``ptfast_encoder.safetensors``
    (as for ``PeftModel.from_pretrained``; for a non-default adapter saved under ``dir``, that is ``dir/<name>``).
    PEFT 0.21 refuses ``PeftModel.from_pretrained(..., is_trainable=True)`` for prompt learning, so this goes through
    ``get_peft_model`` with ``inference_mode=False`` and then loads the full encoder. ``patch=True`` returns it
    patched. ``config_kwargs`` are passed to ``PeftConfig.from_pretrained``.
    """
    from peft import PeftConfig, get_peft_model

    config = PeftConfig.from_pretrained(model_id, **config_kwargs)
    if not (is_p_tuning(config) or _is_prefix_tuning(config)):
        raise ValueError(
            f"ptfast.load_for_training: {model_id} holds a {peft_type_name(config)} adapter, not P-tuning or "
            "prefix tuning"
        )
    config.inference_mode = False
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    _load_encoder_file(
        model.prompt_encoder[adapter_name], os.path.join(os.fspath(model_id), ENCODER_STATE_FILE), adapter_name
    )
    if patch:
        _patch(model)
    return model
