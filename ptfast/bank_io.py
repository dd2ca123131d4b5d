"""Save a PromptBank to one folder and load it back, for serving without training code or a PEFT model.

A bank folder holds two files:

* ``tables.safetensors``: one ``(T, D)`` tensor per adapter, stored under ``adapter.<i>`` (adapter names are free
  text, so they live in the manifest, not in tensor keys), in the bank's dtype.
* ``bank.json``: the manifest: format and version, each adapter's name, key and ``num_virtual_tokens``, and the
  fingerprint of the word embeddings the tables were made for (vocab size, hidden size, dtype, SHA-256 of the
  weight's bytes).

Loading checks the fingerprint against the serving model's embeddings and raises ``BankMismatchError`` when they
differ: a P-tuning table is only meaningful next to the embeddings it was trained with. The loaded bank holds frozen
tables (``PromptBank.add`` with tensors). ``embedding_weight_from_checkpoint`` reads just the embedding tensor of a
Hugging Face checkpoint folder (safetensors, sharded or not), so a serving process need not build the model.

The manifest also says how the embedding module turns a token id into a vector (``embedding_lookup``): a row of
the weight, or, as in Gemma and BART, the row times a constant. A bank loaded over a checkpoint's bare weight
applies that scale exactly as the module does; without it, the token embeddings would be silently off by it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Union

import torch
from torch import nn

from .__version__ import __version__

__all__ = [
    "BANK_MANIFEST",
    "BANK_TABLES",
    "BankMismatchError",
    "ScaledEmbedding",
    "embedding_fingerprint",
    "embedding_lookup",
    "embedding_weight_from_checkpoint",
    "load_bank",
    "save_bank",
]

BANK_MANIFEST = "bank.json"
BANK_TABLES = "tables.safetensors"
_FORMAT = "ptfast.PromptBank"
# Version 2: the embeddings are not plain lookups (an older ptfast, which would ignore ``embedding_lookup``, refuses
# the folder); plain banks are still written as version 1.
_FORMAT_VERSIONS = (1, 2)
# Names of the input embedding weight in common Hugging Face checkpoints, most specific first.
_EMBEDDING_KEYS = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "embed_in.weight",
                   "embeddings.weight")


class BankMismatchError(ValueError):
    """A saved bank does not belong to these word embeddings (vocab size, hidden size, dtype or weights differ)."""


def _safetensors():
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:  # pragma: no cover - safetensors comes with transformers, peft and vllm
        raise ImportError("saving or loading a PromptBank needs safetensors: pip install safetensors") from None
    return load_file, save_file


def _weight(embeddings: Union[nn.Module, torch.Tensor]) -> torch.Tensor:
    weight = embeddings.weight if isinstance(embeddings, nn.Module) else embeddings
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("expected word embeddings: an nn.Module with a (V, D) .weight, or a (V, D) tensor")
    return weight


def embedding_fingerprint(embeddings: Union[nn.Module, torch.Tensor]) -> dict:
    """``{"vocab_size", "hidden_size", "dtype", "sha256"}`` of a ``(V, D)`` embedding weight (or its module).

    The hash covers the weight's bytes in its own dtype (row-major, on CPU), so the same checkpoint loaded anywhere
    gives the same hash, and any changed element, a resize or a cast changes it.
    """
    weight = _weight(embeddings).detach()
    data = weight.to("cpu").contiguous()
    digest = hashlib.sha256(data.view(torch.uint8).numpy() if data.numel() else b"").hexdigest()
    return {
        "vocab_size": int(weight.shape[0]),
        "hidden_size": int(weight.shape[1]),
        "dtype": str(weight.dtype).replace("torch.", ""),
        "sha256": digest,
    }


class ScaledEmbedding(nn.Module):
    """A ``(V, D)`` weight's rows times ``scale``: Gemma's and BART's scaled word embeddings, rebuilt from the weight
    alone, with the same arithmetic (the scale cast to the weight's dtype first, or a Python float)."""

    def __init__(self, weight: torch.Tensor, scale: float, cast_scale_to_weight_dtype: bool):
        super().__init__()
        self.weight = weight  # a plain attribute: the caller's tensor, not copied and not registered
        self.scale = float(scale)
        self.cast_scale_to_weight_dtype = bool(cast_scale_to_weight_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.weight)
        if self.cast_scale_to_weight_dtype:  # transformers: `* self.embed_scale.to(self.weight.dtype)`
            return rows * torch.tensor(self.scale, dtype=torch.float32).to(self.weight.dtype)
        return rows * self.scale  # transformers: `* self.embed_scale`, a Python float

    def lookup(self) -> dict:
        return _scaled_lookup(self.scale, self.cast_scale_to_weight_dtype, self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, scale={self.scale}, cast={self.cast_scale_to_weight_dtype}"


def _scaled_lookup(scale: float, cast: bool, dtype: torch.dtype) -> dict:
    # The scale as the multiplication sees it: an fp32 buffer and a bf16 one that round to the same bf16 number
    # compute the same embeddings, so they are recorded alike.
    if cast:
        scale = torch.tensor(float(scale), dtype=torch.float32).to(dtype).item()
    return {"kind": "scaled", "scale": float(scale), "cast_scale_to_weight_dtype": cast}


_PROBE_ROWS = 512
# What a (scaled) row lookup holds. Anything more (T5Gemma2 swaps one token's row for a parameter of its own) makes
# the output depend on more than the weight, which a probe of some ids cannot rule out.
_LOOKUP_STATE = {"weight", "embed_scale"}


@torch.no_grad()
def embedding_lookup(embeddings: Union[nn.Module, torch.Tensor]) -> dict:
    """How ``embeddings`` map token ids to vectors, found by calling it on a spread of ids:

    * ``{"kind": "plain"}``: the rows of its weight (a tensor, an ``nn.Embedding``);
    * ``{"kind": "scaled", "scale": s, "cast_scale_to_weight_dtype": bool}``: the rows times ``s``, bitwise as
      ``ScaledEmbedding`` computes it (Gemma, BART and the other ``*ScaledWordEmbedding`` of transformers);
    * ``{"kind": "module", "class": name}``: anything else; only the module itself can serve the bank. Also any
      module holding more than a weight and an ``embed_scale``, or with ``max_norm`` (it rewrites the weight when
      called), without calling it.
    """
    from .serving import _is_plain_embedding

    if isinstance(embeddings, torch.Tensor) or _is_plain_embedding(embeddings):
        return {"kind": "plain"}
    if isinstance(embeddings, ScaledEmbedding):
        return embeddings.lookup()
    opaque = {"kind": "module", "class": type(embeddings).__qualname__}
    state = {name for name, _ in embeddings.named_parameters()} | {name for name, _ in embeddings.named_buffers()}
    if not state <= _LOOKUP_STATE or getattr(embeddings, "max_norm", None) is not None:
        return opaque
    weight = _weight(embeddings)
    ids = torch.linspace(0, weight.shape[0] - 1, min(weight.shape[0], _PROBE_ROWS), device=weight.device).long()
    out = embeddings(ids)
    if not (isinstance(out, torch.Tensor) and out.shape == (ids.numel(), weight.shape[1])
            and out.dtype == weight.dtype):
        return opaque
    if torch.equal(out, weight[ids]):
        return {"kind": "plain"}
    scale = getattr(embeddings, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        for cast in (True, False):
            lookup = _scaled_lookup(scale, cast, weight.dtype)
            if torch.equal(out, ScaledEmbedding(weight, lookup["scale"], cast)(ids)):
                return lookup
    return opaque


def _describe(lookup: dict) -> str:
    if lookup["kind"] == "scaled":
        how = "cast to the weight's dtype first" if lookup["cast_scale_to_weight_dtype"] else "as a Python float"
        return f"rows scaled by {lookup['scale']!r} ({how})"
    return "plain row lookups" if lookup["kind"] == "plain" else f"the output of a {lookup['class']} module"


def save_bank(bank, folder: Union[str, os.PathLike]) -> str:
    """Write every adapter's table, its name and the embeddings' fingerprint to ``folder`` (created if missing).

    Args:
        bank: a ``ptfast.PromptBank``. Each table is written as served now (its source's current weights).
        folder: the output folder; ``bank.json`` and ``tables.safetensors`` inside it are overwritten.

    Returns the folder path. Example::

        ptfast.PromptBank.from_peft_model(peft_model).save("my_bank")
    """
    _, save_file = _safetensors()
    if len(bank) == 0:
        raise ValueError("save_bank: the bank has no adapter")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors, adapters = {}, []
    for i, name in enumerate(bank.names):
        key = f"adapter.{i}"
        tensors[key] = bank.table(name).detach().to("cpu").contiguous().clone()
        adapters.append({"name": name, "key": key, "num_virtual_tokens": int(tensors[key].shape[0])})
    lookup = embedding_lookup(bank.word_embeddings)
    manifest = {
        "format": _FORMAT,
        "format_version": 1 if lookup["kind"] == "plain" else 2,
        "ptfast_version": __version__,
        "adapters": adapters,
        "embeddings": embedding_fingerprint(bank.weight),
        "embedding_lookup": lookup,
    }
    save_file(tensors, os.path.join(folder, BANK_TABLES), metadata={"format": _FORMAT})
    with open(os.path.join(folder, BANK_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return folder


def read_manifest(folder: Union[str, os.PathLike]) -> dict:
    """The parsed ``bank.json`` of a saved bank (checked for format and version)."""
    path = os.path.join(os.fspath(folder), BANK_MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {BANK_MANIFEST} in {os.fspath(folder)!r}: not a folder written by save_bank")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != _FORMAT or manifest.get("format_version") not in _FORMAT_VERSIONS:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; this ptfast "
            f"reads {_FORMAT!r} versions {_FORMAT_VERSIONS}"
        )
    return manifest


def load_bank(folder: Union[str, os.PathLike], word_embeddings: Union[nn.Module, torch.Tensor], *,
              verify: bool = True):
    """A ``PromptBank`` with the frozen tables saved in ``folder``, over the serving model's ``word_embeddings``.

    Args:
        folder: a folder written by ``save_bank`` / ``PromptBank.save``.
        word_embeddings: the serving model's input embeddings (module or ``(V, D)`` weight), e.g.
            ``embedding_weight_from_checkpoint(model_folder)``.
        verify: compare the weight's SHA-256 with the saved one (vocab size, hidden size and dtype are always
            compared). ``False`` skips only the hash, e.g. for embeddings known to be the same whose bytes differ
            (a lossless re-save).

    A bare weight serves scaled embeddings (the manifest's ``embedding_lookup``) through ``ScaledEmbedding``; a
    module must compute the lookup the saved bank was made with.

    Raises ``BankMismatchError`` when the embeddings are not the ones the bank was saved with.
    """
    from .serving import PromptBank

    load_file, _ = _safetensors()
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    saved = manifest["embeddings"]
    weight = _weight(word_embeddings)
    here = {"vocab_size": int(weight.shape[0]), "hidden_size": int(weight.shape[1]),
            "dtype": str(weight.dtype).replace("torch.", "")}
    for field in ("vocab_size", "hidden_size", "dtype"):
        if saved[field] != here[field]:
            raise BankMismatchError(
                f"load_bank({folder!r}): the bank was saved for embeddings with {field}={saved[field]!r}, these have "
                f"{field}={here[field]!r} (saved {saved}; serving {here}). Load the same base model, in the dtype "
                "the bank was saved with (the bank casts its tables to the engine's dtype when it builds inputs)."
            )
    if verify:
        digest = embedding_fingerprint(weight)["sha256"]
        if digest != saved["sha256"]:
            raise BankMismatchError(
                f"load_bank({folder!r}): the embedding weights differ from the ones the bank was saved with "
                f"(sha256 {digest[:12]}... != saved {saved['sha256'][:12]}...): another base model or checkpoint. "
                "Serve with the base model the adapters were trained on, or pass verify=False if you know better."
            )
    word_embeddings = _serving_embeddings(folder, manifest, word_embeddings)
    tensors = load_file(os.path.join(folder, BANK_TABLES))
    bank = PromptBank(word_embeddings)
    entries = []
    for entry in manifest["adapters"]:
        table = tensors[entry["key"]]
        if table.shape[0] != entry["num_virtual_tokens"]:
            raise ValueError(f"load_bank({folder!r}): {entry['key']} has {table.shape[0]} rows, the manifest says "
                             f"{entry['num_virtual_tokens']}")
        entries.append((entry["name"], table, None))
    bank._add_many(entries, replace=False)  # one stack per length, not one rebuild per adapter
    return bank


def _serving_embeddings(folder: str, manifest: dict, word_embeddings: Union[nn.Module, torch.Tensor]):
    """``word_embeddings``, or a bare weight wrapped so it computes the saved lookup."""
    saved = manifest.get("embedding_lookup")
    if saved is None:  # written before ptfast recorded it: served as those versions did
        return word_embeddings
    if isinstance(word_embeddings, torch.Tensor):
        if saved["kind"] == "scaled":
            return ScaledEmbedding(word_embeddings, saved["scale"], saved["cast_scale_to_weight_dtype"])
        if saved["kind"] == "module":
            raise BankMismatchError(
                f"load_bank({folder!r}): the bank was saved over {_describe(saved)}, which is not a row lookup: "
                "a bare weight would give other input embeddings. Pass the model's input embedding module."
            )
        return word_embeddings
    here = embedding_lookup(word_embeddings)
    if here != saved:
        raise BankMismatchError(
            f"load_bank({folder!r}): the bank was saved over word embeddings that give {_describe(saved)}; these "
            f"give {_describe(here)}: the inputs would not be the ones the adapters were trained with."
        )
    return word_embeddings


def embedding_weight_from_checkpoint(folder: Union[str, os.PathLike], key: Optional[str] = None) -> torch.Tensor:
    """The ``(V, D)`` input embedding weight of a Hugging Face checkpoint folder, read from its safetensors files
    alone (sharded or not), in the dtype it is stored in. The weight only: a model that scales its embeddings
    (Gemma) gets its scale from the bank's manifest in ``load_bank``.

    Args:
        folder: the model folder (``model.safetensors`` or ``model.safetensors.index.json`` + shards).
        key: the tensor's name; default: the one name ending in ``embed_tokens.weight`` (Llama, Mistral, Qwen...),
            ``word_embeddings.weight`` (Bloom), ``wte.weight`` (GPT-2) or ``embed_in.weight`` (GPT-NeoX).
    """
    from safetensors import safe_open

    folder = os.fspath(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            where = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        path = os.path.join(folder, "model.safetensors")
        with safe_open(path, framework="pt") as f:
            where = {k: path for k in f.keys()}
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder!r}")
    if key is None:
        for suffix in _EMBEDDING_KEYS:
            found = [k for k in where if k == suffix or k.endswith("." + suffix)]
            if len(found) == 1:
                key = found[0]
                break
        else:
            raise KeyError(f"no single input-embedding tensor in {folder!r} (looked for names ending in "
                           f"{_EMBEDDING_KEYS}); pass key=")
    if key not in where:
        raise KeyError(f"no tensor {key!r} in {folder!r}")
    with safe_open(where[key], framework="pt") as f:
        return f.get_tensor(key)
