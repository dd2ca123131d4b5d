"""Save a PromptBank to one folder and load it back, for serving without training code or a PEFT model.

A bank folder holds two files:

* ``tables.safetensors``: one ``(T, D)`` tensor per adapter, stored under ``adapter.<i>`` (adapter names are free
  text, so they live in the manifest, not in tensor keys), in the bank's dtype.
* ``bank.json``: the manifest: format and version, each adapter's name, key, ``num_virtual_tokens`` and the SHA-256
  of its table's bytes, and the fingerprint of the word embeddings the tables were made for (vocab size, hidden
  size, dtype, SHA-256 of the weight's bytes).

Saving is atomic: both files are written to a new folder beside the target, flushed to disk, and the folder is
renamed into place (an existing bank is renamed aside first, and removed once the new one is in). An interrupted
save leaves the old bank (or no folder) and, at worst, a ``.<name>.saving-*`` or ``.<name>.replaced-*`` folder
beside it; never a folder that mixes two saves.

Loading checks every file before anything is served: a damaged, truncated or hand-edited file, a table whose bytes
do not match its digest, or a table with NaN or infinite values raises ``BankFormatError`` naming the file and the
problem.

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
import math
import os
import re
import shutil
import uuid
import warnings

import torch
from torch import nn

from .__version__ import __version__
from .errors import BankFormatError, BankMismatchError  # noqa: F401 (BankMismatchError: ptfast.bank_io.BankMismatchError)

__all__ = [
    "BANK_MANIFEST",
    "BANK_TABLES",
    "BankFormatError",
    "BankMismatchError",
    "ScaledEmbedding",
    "embedding_fingerprint",
    "embedding_lookup",
    "embedding_weight_from_checkpoint",
    "is_plain_embedding",
    "read_bank",
    "save_bank",
]

BANK_MANIFEST = "bank.json"
BANK_TABLES = "tables.safetensors"
_FORMAT = "ptfast.PromptBank"
# Version 2: the embeddings are not plain lookups (an older ptfast, which would ignore ``embedding_lookup``, refuses
# the folder); plain banks are still written as version 1. A version is bumped only for what an older reader would
# misread. The tables' digests (``adapters[i].sha256``) are not: a reader that ignores them loads the same tables it
# always did, so they are optional, checked when present (banks saved before them still load).
_FORMAT_VERSIONS = (1, 2)
# Names of the input embedding weight in common Hugging Face checkpoints, most specific first.
_EMBEDDING_KEYS = (
    "embed_tokens.weight",
    "word_embeddings.weight",
    "wte.weight",
    "embed_in.weight",
    "embeddings.weight",
)


def is_plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` that is a bare row lookup: its own forward, no ``max_norm``, no hooks."""
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and module.max_norm is None
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _safetensors():
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:  # pragma: no cover - safetensors comes with transformers, peft and vllm
        raise ImportError("saving or loading a PromptBank needs safetensors: pip install safetensors") from None
    return load_file, save_file


def _weight(embeddings: nn.Module | torch.Tensor) -> torch.Tensor:
    weight = embeddings.weight if isinstance(embeddings, nn.Module) else embeddings
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("expected word embeddings: an nn.Module with a (V, D) .weight, or a (V, D) tensor")
    return weight


def embedding_fingerprint(embeddings: nn.Module | torch.Tensor) -> dict:
    """``{"vocab_size", "hidden_size", "dtype", "sha256"}`` of a ``(V, D)`` embedding weight (or its module).

    The hash covers the weight's bytes in its own dtype (row-major, on CPU), so the same checkpoint loaded anywhere
    gives the same hash, and any changed element, a resize or a cast changes it.
    """
    weight = _weight(embeddings).detach()
    return {
        "vocab_size": int(weight.shape[0]),
        "hidden_size": int(weight.shape[1]),
        "dtype": _dtype_name(weight.dtype),
        "sha256": _sha256(weight),
    }


def _sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in its own dtype, row-major, on CPU."""
    data = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy() if data.numel() else b"").hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
def embedding_lookup(embeddings: nn.Module | torch.Tensor) -> dict:
    """How ``embeddings`` map token ids to vectors, found by calling it on a spread of ids:

    * ``{"kind": "plain"}``: the rows of its weight (a tensor, an ``nn.Embedding``);
    * ``{"kind": "scaled", "scale": s, "cast_scale_to_weight_dtype": bool}``: the rows times ``s``, bitwise as
      ``ScaledEmbedding`` computes it (Gemma, BART and the other ``*ScaledWordEmbedding`` of transformers);
    * ``{"kind": "module", "class": name}``: anything else; only the module itself can serve the bank. Also any
      module holding more than a weight and an ``embed_scale``, or with ``max_norm`` (it rewrites the weight when
      called), without calling it.
    """
    if isinstance(embeddings, torch.Tensor) or is_plain_embedding(embeddings):
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
    if not (
        isinstance(out, torch.Tensor) and out.shape == (ids.numel(), weight.shape[1]) and out.dtype == weight.dtype
    ):
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


def save_bank(bank, folder: str | os.PathLike) -> str:
    """Write every adapter's table, its name and digest, and the embeddings' fingerprint to ``folder``, atomically.

    Args:
        bank: a ``ptfast.PromptBank``. Each table is written as served now (its source's current weights).
        folder: the output folder. It must not exist, be empty, or hold a saved bank (only ``bank.json`` and
            ``tables.safetensors``): saving replaces the whole folder, so a folder with other files is refused
            rather than emptied.

    The files are written to a new folder beside ``folder``, flushed to disk, and renamed into place: an interrupted
    save leaves the old bank as it was (or no folder, if there was none), never a mix of two saves. Until the rename,
    another process loading ``folder`` reads the old bank; during the replacement of an existing bank, it may find
    no folder (``FileNotFoundError``), never a partial one.

    Raises ``ValueError`` for an empty bank or a table with NaN or infinite values (a bank ``PromptBank.load`` refuses),
    before anything is written.

    Returns the folder path. Example::

        ptfast.PromptBank.from_peft_model(peft_model).save("my_bank")
    """
    _, save_file = _safetensors()
    if len(bank) == 0:
        raise ValueError("save_bank: the bank has no adapter")
    tensors, adapters = {}, []
    for i, name in enumerate(bank.names):
        key = f"adapter.{i}"
        table = bank.table(name).detach().to("cpu").contiguous().clone()
        if not bool(torch.isfinite(table).all()):
            raise ValueError(
                f"save_bank: adapter {name!r} has NaN or infinite values in its table; a bank with it "
                "could not be loaded (PromptBank.load refuses non-finite tables)"
            )
        tensors[key] = table
        adapters.append({"name": name, "key": key, "num_virtual_tokens": int(table.shape[0]), "sha256": _sha256(table)})
    lookup = embedding_lookup(bank.word_embeddings)
    manifest = {
        "format": _FORMAT,
        "format_version": 1 if lookup["kind"] == "plain" else 2,
        "ptfast_version": __version__,
        "adapters": adapters,
        "embeddings": embedding_fingerprint(bank.weight),
        "embedding_lookup": lookup,
    }
    # Renames are atomic only within one filesystem: the new folder is made beside the real target.
    target = os.path.realpath(os.fspath(folder))
    _check_replaceable(target)
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = _new_folder(parent, f".{base}.saving-")
    try:
        _write_tables(save_file, tensors, os.path.join(staging, BANK_TABLES))
        _write_manifest(manifest, os.path.join(staging, BANK_MANIFEST))
        _fsync_dir(staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into place
    return os.fspath(folder)


def _check_replaceable(target: str) -> None:
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise NotADirectoryError(f"save_bank: {target!r} exists and is not a folder")
    others = sorted(set(os.listdir(target)) - {BANK_MANIFEST, BANK_TABLES})
    if others:
        raise FileExistsError(
            f"save_bank: {target!r} holds files that are not a bank's ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}); saving replaces the whole folder, so save the bank to a folder "
            "of its own (new, empty, or an earlier bank)"
        )


def _write_tables(save_file, tensors: dict, path: str) -> None:
    save_file(tensors, path, metadata={"format": _FORMAT})
    _fsync_file(path)


def _write_manifest(manifest: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make a folder's entries (new files, renames) durable; POSIX only (Windows cannot open a folder)."""
    if os.name != "posix":  # pragma: no cover
        return
    _fsync_file(path)


def _new_folder(parent: str, prefix: str) -> str:
    # Not tempfile.mkdtemp: its folders are private (0o700), and this one becomes the bank, with the umask's mode.
    for _ in range(100):
        path = os.path.join(parent, prefix + uuid.uuid4().hex[:12])
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"save_bank: no free name for a new folder in {parent!r}")


def _unused_name(parent: str, prefix: str) -> str:
    # Only a name: a rename cannot replace an existing folder on every system.
    while True:
        path = os.path.join(parent, prefix + uuid.uuid4().hex[:12])
        if not os.path.lexists(path):
            return path


def _move_into_place(staging: str, target: str) -> None:
    """Rename the complete ``staging`` folder to ``target``; an existing ``target`` is renamed aside first and
    removed after. On failure, the old folder is renamed back, or the error says where it is."""
    parent, base = os.path.split(target)
    if not os.path.lexists(target):
        os.rename(staging, target)
        _fsync_dir(parent)
        return
    aside = _unused_name(parent, f".{base}.replaced-")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException as error:
        try:
            os.rename(aside, target)
        except BaseException as restore_error:
            raise OSError(
                f"save_bank: could not move the new bank into {target!r} ({error}) nor the old one back "
                f"({restore_error}); the old bank is in {aside!r}: rename it to {target!r}"
            ) from error
        raise
    _fsync_dir(parent)
    try:
        shutil.rmtree(aside)
    except OSError as error:  # the new bank is in place; only the old copy is left over
        warnings.warn(
            f"save_bank: saved {target!r}, but could not remove the old bank in {aside!r}: {error}",
            RuntimeWarning,
            stacklevel=3,
        )


def read_manifest(folder: str | os.PathLike) -> dict:
    """The parsed ``bank.json`` of a saved bank, checked for format, version and the type of every field.

    Raises ``FileNotFoundError`` when there is no ``bank.json``, ``BankFormatError`` when it is malformed.
    """
    path = os.path.join(os.fspath(folder), BANK_MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {BANK_MANIFEST} in {os.fspath(folder)!r}: not a folder written by save_bank")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise BankFormatError(f"{path}: not UTF-8 text ({error}): damaged, or not written by save_bank") from None
    except json.JSONDecodeError as error:
        raise BankFormatError(f"{path}: not valid JSON ({error}): truncated or damaged") from None
    if not isinstance(manifest, dict):
        raise BankFormatError(f"{path}: holds a JSON {_json_type(manifest)}, not an object: not a bank manifest")
    fmt, version = manifest.get("format"), manifest.get("format_version")
    if fmt != _FORMAT or not _is_int(version) or version not in _FORMAT_VERSIONS:
        newer = fmt == _FORMAT and _is_int(version) and version > max(_FORMAT_VERSIONS)
        raise BankFormatError(
            f"{path}: format {fmt!r} version {version!r}; this ptfast reads {_FORMAT!r} versions {_FORMAT_VERSIONS}"
            + ("; the bank was saved by a newer ptfast: upgrade to load it" if newer else "")
        )
    _check_manifest(path, manifest)
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value) -> str:
    for kind, name in (
        (dict, "object"),
        (list, "array"),
        (str, "string"),
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
    ):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


# What each manifest field must hold: the JSON types it may have, a check of its value, and how errors say it.
_KINDS = {
    "object": (("object",), lambda v: True, "an object"),
    "array": (("array",), lambda v: True, "an array"),
    "string": (("string",), lambda v: v != "", "a non-empty string"),
    "count": (("integer",), lambda v: v >= 0, "a non-negative integer"),
    "positive": (("integer",), lambda v: v > 0, "a positive integer"),
    "boolean": (("boolean",), lambda v: True, "true or false"),
    "number": (("integer", "number"), math.isfinite, "a finite number"),
    "sha256": (("string",), lambda v: _SHA256.fullmatch(v) is not None, "a SHA-256 digest (64 lowercase hex digits)"),
    "dtype": (("string",), lambda v: isinstance(getattr(torch, v, None), torch.dtype), "a torch dtype name"),
}


def _field(path: str, obj: dict, where: str, key: str, kind: str, *, required: bool = True):
    """``obj[key]``, checked to be of ``kind`` (``where`` names ``obj`` in the error: ``"adapters[2]."``)."""
    if key not in obj:
        if required:
            raise BankFormatError(f"{path}: {where}{key} is missing")
        return None
    value = obj[key]
    types, check, expected = _KINDS[kind]
    if _json_type(value) not in types:
        raise BankFormatError(
            f"{path}: {where}{key} has the wrong type: it must be {expected}, got {value!r} (a JSON "
            f"{_json_type(value)})"
        )
    if not check(value):
        raise BankFormatError(f"{path}: {where}{key} must be {expected}, got {value!r}")
    return value


def _check_manifest(path: str, manifest: dict) -> None:
    adapters = _field(path, manifest, "", "adapters", "array")
    if not adapters:
        raise BankFormatError(f"{path}: adapters is empty (save_bank never writes a bank without adapters)")
    names, keys = set(), set()
    for i, entry in enumerate(adapters):
        where = f"adapters[{i}]."
        if not isinstance(entry, dict):
            raise BankFormatError(
                f"{path}: adapters[{i}] has the wrong type: it must be an object, got {entry!r} "
                f"(a JSON {_json_type(entry)})"
            )
        name = _field(path, entry, where, "name", "string")
        key = _field(path, entry, where, "key", "string")
        _field(path, entry, where, "num_virtual_tokens", "count")
        _field(path, entry, where, "sha256", "sha256", required=False)  # absent in banks saved before digests
        for value, seen, what in ((name, names, "name"), (key, keys, "key")):
            if value in seen:
                raise BankFormatError(f"{path}: adapters[{i}].{what} {value!r} appears twice")
            seen.add(value)
    embeddings = _field(path, manifest, "", "embeddings", "object")
    _field(path, embeddings, "embeddings.", "vocab_size", "positive")
    _field(path, embeddings, "embeddings.", "hidden_size", "positive")
    _field(path, embeddings, "embeddings.", "dtype", "dtype")
    _field(path, embeddings, "embeddings.", "sha256", "sha256")
    # Absent in version-1 banks saved before it was recorded; version 2 exists because of it.
    lookup = _field(path, manifest, "", "embedding_lookup", "object", required=manifest["format_version"] >= 2)
    if lookup is not None:
        kind = lookup.get("kind")
        if kind == "scaled":
            _field(path, lookup, "embedding_lookup.", "scale", "number")
            _field(path, lookup, "embedding_lookup.", "cast_scale_to_weight_dtype", "boolean")
        elif kind == "module":
            _field(path, lookup, "embedding_lookup.", "class", "string")
        elif kind != "plain":
            raise BankFormatError(f"{path}: embedding_lookup.kind must be 'plain', 'scaled' or 'module', got {kind!r}")


def _read_tables(folder: str, manifest: dict) -> list:
    """``[(name, table)]`` in the manifest's order, every table checked against the manifest: its key, shape,
    dtype, digest (when the manifest has one) and finite values, and no tensor left over."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(folder, BANK_TABLES)
    if not os.path.isfile(path):
        raise BankFormatError(f"{path}: missing; {BANK_MANIFEST} is there: an incomplete copy of a bank folder?")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, ValueError, RuntimeError, TypeError) as error:
        raise BankFormatError(f"{path}: not a readable safetensors file ({error}): truncated or damaged") from None
    if metadata.get("format") != _FORMAT:
        raise BankFormatError(
            f"{path}: its metadata says format {metadata.get('format')!r}, not {_FORMAT!r}: not "
            "the tables of a saved PromptBank"
        )
    saved = manifest["embeddings"]
    listed = {entry["key"] for entry in manifest["adapters"]}
    extra = sorted(set(tensors) - listed)
    if extra:
        raise BankFormatError(f"{path}: holds tensors that {BANK_MANIFEST} does not list: {extra}")
    tables = []
    for entry in manifest["adapters"]:
        name, key = entry["name"], entry["key"]
        what = f"{path}: adapter {name!r} ({key})"
        if key not in tensors:
            raise BankFormatError(f"{what}: no such tensor in the file, which holds {sorted(tensors)}")
        table = tensors[key]
        expected = (entry["num_virtual_tokens"], saved["hidden_size"])
        if tuple(table.shape) != expected:
            raise BankFormatError(
                f"{what}: shape {tuple(table.shape)}; {BANK_MANIFEST} says {expected} "
                "(num_virtual_tokens, embeddings.hidden_size)"
            )
        if _dtype_name(table.dtype) != saved["dtype"]:
            raise BankFormatError(
                f"{what}: dtype {_dtype_name(table.dtype)}; {BANK_MANIFEST} says {saved['dtype']} "
                "(the tables are saved in the embeddings' dtype)"
            )
        if "sha256" in entry:  # banks saved before the digests have none
            digest = _sha256(table)
            if digest != entry["sha256"]:
                raise BankFormatError(
                    f"{what}: SHA-256 {digest[:12]}... is not the {entry['sha256'][:12]}... recorded in "
                    f"{BANK_MANIFEST}: the table was changed or damaged after it was saved"
                )
        bad = int((~torch.isfinite(table)).sum())
        if bad:
            raise BankFormatError(f"{what}: {bad} NaN or infinite value(s); a served prompt would carry them")
        tables.append((name, table))
    return tables


def read_bank(folder: str | os.PathLike, word_embeddings: nn.Module | torch.Tensor, *, verify: bool = True):
    """``(embeddings, [(name, table), ...])``: the frozen tables saved in ``folder`` and the embeddings to serve
    them over, checked against the manifest (``PromptBank.load`` builds the bank from them).

    Args:
        folder: a folder written by ``save_bank`` / ``PromptBank.save``.
        word_embeddings: the serving model's input embeddings (module or ``(V, D)`` weight), e.g.
            ``embedding_weight_from_checkpoint(model_folder)``.
        verify: compare the weight's SHA-256 with the saved one (vocab size, hidden size and dtype are always
            compared). ``False`` skips only the hash, e.g. for embeddings known to be the same whose bytes differ
            (a lossless re-save). The tables' own digests are always checked.

    A bare weight serves scaled embeddings (the manifest's ``embedding_lookup``) through ``ScaledEmbedding``; a
    module must compute the lookup the saved bank was made with.

    Raises ``BankMismatchError`` when the embeddings are not the ones the bank was saved with, ``BankFormatError``
    when a file is malformed, damaged or edited (the table digests, checked when the manifest has them: banks saved
    before them load without), or a table has NaN or infinite values.
    """
    _safetensors()
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    saved = manifest["embeddings"]
    weight = _weight(word_embeddings)
    here = {"vocab_size": int(weight.shape[0]), "hidden_size": int(weight.shape[1]), "dtype": _dtype_name(weight.dtype)}
    for field in ("vocab_size", "hidden_size", "dtype"):
        if saved[field] != here[field]:
            raise BankMismatchError(
                f"PromptBank.load({folder!r}): the bank was saved for embeddings with {field}={saved[field]!r}, "
                f"these have "
                f"{field}={here[field]!r} (saved {saved}; serving {here}). Load the same base model, in the dtype "
                "the bank was saved with (the bank casts its tables to the engine's dtype when it builds inputs)."
            )
    if verify:
        digest = embedding_fingerprint(weight)["sha256"]
        if digest != saved["sha256"]:
            raise BankMismatchError(
                f"PromptBank.load({folder!r}): the embedding weights differ from the ones the bank was saved with "
                f"(sha256 {digest[:12]}... != saved {saved['sha256'][:12]}...): another base model or checkpoint. "
                "Serve with the base model the adapters were trained on, or pass verify=False if you know better."
            )
    return _serving_embeddings(folder, manifest, word_embeddings), _read_tables(folder, manifest)


def _serving_embeddings(folder: str, manifest: dict, word_embeddings: nn.Module | torch.Tensor):
    """``word_embeddings``, or a bare weight wrapped so it computes the saved lookup."""
    saved = manifest.get("embedding_lookup")
    if saved is None:  # written before ptfast recorded it: served as those versions did
        return word_embeddings
    if isinstance(word_embeddings, torch.Tensor):
        if saved["kind"] == "scaled":
            return ScaledEmbedding(word_embeddings, saved["scale"], saved["cast_scale_to_weight_dtype"])
        if saved["kind"] == "module":
            raise BankMismatchError(
                f"PromptBank.load({folder!r}): the bank was saved over {_describe(saved)}, which is not a row lookup: "
                "a bare weight would give other input embeddings. Pass the model's input embedding module."
            )
        return word_embeddings
    here = embedding_lookup(word_embeddings)
    if here != saved:
        raise BankMismatchError(
            f"PromptBank.load({folder!r}): the bank was saved over word embeddings that give {_describe(saved)}; these "
            f"give {_describe(here)}: the inputs would not be the ones the adapters were trained with."
        )
    return word_embeddings


def embedding_weight_from_checkpoint(folder: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """The ``(V, D)`` input embedding weight of a Hugging Face checkpoint folder, read from its safetensors files
    alone (sharded or not), in the dtype it is stored in. The weight only: a model that scales its embeddings
    (Gemma) gets its scale from the bank's manifest in ``PromptBank.load``.

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
            raise KeyError(
                f"no single input-embedding tensor in {folder!r} (looked for names ending in "
                f"{_EMBEDDING_KEYS}); pass key="
            )
    if key not in where:
        raise KeyError(f"no tensor {key!r} in {folder!r}")
    with safe_open(where[key], framework="pt") as f:
        return f.get_tensor(key)
