"""ptfast.bank_io: what a saved bank folder guarantees. Every table is checked against a digest, non-finite tables are
refused, a malformed file is one BankFormatError naming the file and the problem, and a save replaces a folder
atomically (an interrupted one leaves the old bank).

Round trips and the embeddings' fingerprint are tested in tests/test_vllm_inputs.py.
"""

import hashlib
import json
import os
import stat
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import ptfast
from ptfast import BankFormatError, PromptBank, bank_io
from ptfast.bank_io import BANK_MANIFEST, BANK_TABLES, BankMismatchError, read_manifest, save_bank

V, D = 97, 24


def _weight(dtype=torch.float32):
    return torch.randn(V, D, generator=torch.Generator().manual_seed(0)).to(dtype)


def _bank(seed=1, order="abc", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tables = {
        "a": torch.randn(5, D, generator=g),
        "b": torch.randn(5, D, generator=g),
        "c": torch.randn(3, D, generator=g),
    }
    bank = PromptBank(_weight(dtype))
    for name in order:
        bank.add(name, tables[name])
    return bank


@pytest.fixture
def folder(tmp_path):
    return save_bank(_bank(), tmp_path / "bank")


def _path(folder, name):
    return os.path.join(os.fspath(folder), name)


def _read_json(folder):
    with open(_path(folder, BANK_MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def _write_json(folder, manifest):
    with open(_path(folder, BANK_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def _same_tables(loaded, bank):
    return loaded.names == bank.names and all(torch.equal(loaded.table(n), bank.table(n)) for n in bank.names)


def _load_fails(folder, file, *fragments):
    """PromptBank.load(folder) raises BankFormatError, a ValueError, naming ``file`` and holding ``fragments``."""
    with pytest.raises(BankFormatError) as info:
        PromptBank.load(folder, _weight())
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert os.path.join(os.fspath(folder), file) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------------------ table digests
def test_the_manifest_has_each_tables_digest(folder):
    tensors = load_file(_path(folder, BANK_TABLES))
    for entry in _read_json(folder)["adapters"]:
        table = tensors[entry["key"]]
        assert entry["sha256"] == hashlib.sha256(table.numpy().tobytes()).hexdigest()
    assert read_manifest(folder)["format_version"] == 1  # digests need no new version: see _FORMAT_VERSIONS


def _data_offset(path, key):
    """Byte offset in the file of tensor ``key``'s first element."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return 8 + header_len + header[key]["data_offsets"][0]


def test_one_flipped_byte_in_a_table_is_caught(folder):
    path = _path(folder, BANK_TABLES)
    data = bytearray(open(path, "rb").read())
    data[_data_offset(path, "adapter.1") + 6] ^= 0x01  # the low mantissa bits of one element: off by ~1e-7
    open(path, "wb").write(bytes(data))
    assert not torch.equal(load_file(path)["adapter.1"], _bank().table("b"))  # safetensors itself reads it fine
    _load_fails(folder, BANK_TABLES, "adapter 'b' (adapter.1)", "SHA-256", BANK_MANIFEST, "changed or damaged")


def test_a_bank_saved_without_digests_still_loads(folder):
    manifest = _read_json(folder)
    for entry in manifest["adapters"]:
        del entry["sha256"]  # what the previous ptfast wrote
    _write_json(folder, manifest)
    assert _same_tables(PromptBank.load(folder, _weight()), _bank())


@pytest.mark.parametrize("with_digest", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tables_are_refused_at_load(folder, with_digest, bad):
    path = _path(folder, BANK_TABLES)
    tensors = load_file(path)
    tensors["adapter.2"][1, 3] = bad
    save_file(tensors, path, metadata={"format": "ptfast.PromptBank"})
    manifest = _read_json(folder)
    entry = manifest["adapters"][2]
    if with_digest:  # the digest matches the edited table: only the values are wrong
        entry["sha256"] = hashlib.sha256(tensors["adapter.2"].numpy().tobytes()).hexdigest()
    else:
        del entry["sha256"]
    _write_json(folder, manifest)
    _load_fails(folder, BANK_TABLES, "adapter 'c' (adapter.2)", "1 NaN or infinite value")


def test_non_finite_tables_are_refused_at_save(tmp_path):
    bank = _bank()
    table = torch.randn(4, D)
    table[0, 0] = float("nan")
    bank.add("broken", table)
    with pytest.raises(ValueError, match="adapter 'broken' has NaN or infinite values"):
        save_bank(bank, tmp_path / "bank")
    assert os.listdir(tmp_path) == []  # nothing written


# ---------------------------------------------------------------------------------------------- malformed bank.json
def _set(path, value):
    """An edit of the manifest: ``value`` at ``path`` (keys and indices); ``_DELETE`` removes the field."""

    def edit(manifest):
        obj = manifest
        for key in path[:-1]:
            obj = obj[key]
        if value is _DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return manifest

    return edit


_DELETE = object()

MANIFEST_EDITS = [
    # (edit, fragments of the message)
    (
        _set(["adapters", 2, "num_virtual_tokens"], "4"),
        [
            "adapters[2].num_virtual_tokens has the wrong type: it must be a non-negative integer, got '4' "
            "(a JSON string)"
        ],
    ),
    (
        _set(["adapters", 0, "num_virtual_tokens"], True),
        ["adapters[0].num_virtual_tokens has the wrong type", "boolean"],
    ),
    (_set(["adapters", 0, "num_virtual_tokens"], 5.0), ["adapters[0].num_virtual_tokens has the wrong type", "number"]),
    (_set(["adapters", 1, "name"], _DELETE), ["adapters[1].name is missing"]),
    (_set(["adapters", 1, "name"], ""), ["adapters[1].name must be a non-empty string, got ''"]),
    (
        _set(["adapters", 0, "num_virtual_tokens"], -1),
        ["adapters[0].num_virtual_tokens must be a non-negative integer, got -1"],
    ),
    (_set(["adapters", 1, "name"], "a"), ["adapters[1].name 'a' appears twice"]),
    (_set(["adapters", 1, "key"], "adapter.0"), ["adapters[1].key 'adapter.0' appears twice"]),
    (_set(["adapters", 1, "key"], 1), ["adapters[1].key has the wrong type: it must be a non-empty string, got 1"]),
    (_set(["adapters", 0, "sha256"], "not-hex"), ["adapters[0].sha256 must be a SHA-256 digest"]),
    (_set(["adapters", 0], "a"), ["adapters[0] has the wrong type: it must be an object, got 'a' (a JSON string)"]),
    (_set(["adapters"], {"a": 1}), ["adapters has the wrong type: it must be an array", "(a JSON object)"]),
    (_set(["adapters"], []), ["adapters is empty"]),
    (_set(["adapters"], _DELETE), ["adapters is missing"]),
    (_set(["embeddings"], _DELETE), ["embeddings is missing"]),
    (_set(["embeddings"], "float32"), ["embeddings has the wrong type: it must be an object"]),
    (
        _set(["embeddings", "vocab_size"], "97"),
        ["embeddings.vocab_size has the wrong type: it must be a positive integer, got '97'"],
    ),
    (_set(["embeddings", "dtype"], "float33"), ["embeddings.dtype must be a torch dtype name, got 'float33'"]),
    (
        _set(["embeddings", "sha256"], None),
        ["embeddings.sha256 has the wrong type: it must be a SHA-256 digest", "null"],
    ),
    (_set(["embedding_lookup", "kind"], "weird"), ["embedding_lookup.kind must be 'plain', 'scaled' or 'module'"]),
    (
        _set(["embedding_lookup"], {"kind": "scaled", "cast_scale_to_weight_dtype": True}),
        ["embedding_lookup.scale is missing"],
    ),
    (
        _set(["embedding_lookup"], {"kind": "scaled", "scale": "2", "cast_scale_to_weight_dtype": True}),
        ["embedding_lookup.scale has the wrong type: it must be a finite number"],
    ),
    (
        _set(["embedding_lookup"], {"kind": "scaled", "scale": float("inf"), "cast_scale_to_weight_dtype": True}),
        ["embedding_lookup.scale must be a finite number, got inf"],
    ),
    (_set(["embedding_lookup"], {"kind": "module"}), ["embedding_lookup.class is missing"]),
    (_set(["embedding_lookup"], [1]), ["embedding_lookup has the wrong type: it must be an object"]),
    (lambda m: {**_set(["embedding_lookup"], _DELETE)(m), "format_version": 2}, ["embedding_lookup is missing"]),
    (_set(["format_version"], "1"), ["format 'ptfast.PromptBank' version '1'"]),
    (_set(["format_version"], True), ["version True"]),
    (_set(["format_version"], 3), ["version 3", "saved by a newer ptfast: upgrade"]),
    (_set(["format"], _DELETE), ["format None"]),
    (lambda m: [m], ["holds a JSON array, not an object"]),
    (lambda m: "bank", ["holds a JSON string, not an object"]),
]


@pytest.mark.parametrize("edit, fragments", MANIFEST_EDITS, ids=[f[0][:48] for _, f in MANIFEST_EDITS])
def test_hand_edited_manifest(folder, edit, fragments):
    _write_json(folder, edit(_read_json(folder)))
    _load_fails(folder, BANK_MANIFEST, *fragments)
    with pytest.raises(BankFormatError):
        read_manifest(folder)


def test_a_version_1_bank_without_the_lookup_still_loads(folder):
    manifest = _read_json(folder)
    del manifest["embedding_lookup"]  # written before ptfast recorded it
    _write_json(folder, manifest)
    assert _same_tables(PromptBank.load(folder, _weight()), _bank())


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda raw: raw[: len(raw) // 2], "not valid JSON"),
        (lambda raw: b"", "not valid JSON"),
        (lambda raw: b"\xff\xfe\x00garbage" + raw[:40], "not UTF-8 text"),
        (lambda raw: raw.replace(b'"adapters"', b'"adapters" "'), "not valid JSON"),
    ],
)
def test_damaged_manifest(folder, damage, fragment):
    path = _path(folder, BANK_MANIFEST)
    raw = open(path, "rb").read()
    open(path, "wb").write(damage(raw))
    _load_fails(folder, BANK_MANIFEST, fragment)


def test_a_wrong_row_count_in_the_manifest_is_a_shape_error(folder):
    _write_json(folder, _set(["adapters", 2, "num_virtual_tokens"], 4)(_read_json(folder)))
    _load_fails(folder, BANK_TABLES, "adapter 'c' (adapter.2): shape (3, 24); bank.json says (4, 24)")


def test_another_base_model_is_still_a_mismatch_not_a_format_error(folder):
    with pytest.raises(BankMismatchError) as info:
        PromptBank.load(folder, torch.randn(V, D, generator=torch.Generator().manual_seed(7)))
    assert not isinstance(info.value, BankFormatError)


# ------------------------------------------------------------------------------------------- malformed tables
@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # truncated in the data
        lambda raw: raw[:20],  # truncated in the header
        lambda raw: b"",
        lambda raw: bytes(range(256)) * 4,  # garbage
        lambda raw: raw[:8] + b"\xff" * (len(raw) - 8),  # the header overwritten
    ],
)
def test_damaged_tables_file(folder, damage):
    path = _path(folder, BANK_TABLES)
    open(path, "wb").write(damage(open(path, "rb").read()))
    _load_fails(folder, BANK_TABLES, "not a readable safetensors file", "truncated or damaged")


def _rewrite_tables(folder, edit, metadata={"format": "ptfast.PromptBank"}):
    path = _path(folder, BANK_TABLES)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda t: t.update(extra=torch.zeros(2, D)), ["holds tensors that bank.json does not list: ['extra']"]),
        (lambda t: t.pop("adapter.1"), ["adapter 'b' (adapter.1): no such tensor in the file"]),
        (
            lambda t: t.update({"adapter.2": t["adapter.2"][:, :-1].contiguous()}),
            ["adapter 'c' (adapter.2): shape (3, 23); bank.json says (3, 24)"],
        ),
        (lambda t: t.update({"adapter.2": t["adapter.2"][None]}), ["adapter 'c' (adapter.2): shape (1, 3, 24)"]),
        (
            lambda t: t.update({"adapter.0": t["adapter.0"].double()}),
            ["adapter 'a' (adapter.0): dtype float64; bank.json says float32"],
        ),
    ],
)
def test_edited_tables_file(folder, edit, fragments):
    _rewrite_tables(folder, edit)
    _load_fails(folder, BANK_TABLES, *fragments)


def test_a_safetensors_file_that_is_not_a_banks_tables(folder):
    _rewrite_tables(folder, lambda t: None, metadata=None)
    _load_fails(folder, BANK_TABLES, "its metadata says format None")


def test_a_missing_tables_file(folder):
    os.remove(_path(folder, BANK_TABLES))
    _load_fails(folder, BANK_TABLES, "missing")


# ---------------------------------------------------------------------------------------------------- atomic save
def _siblings(folder):
    return sorted(os.listdir(os.path.dirname(os.fspath(folder))))


def _fail_in_manifest_midway(manifest, path):
    with open(path, "w", encoding="utf-8") as f:
        text = json.dumps(manifest)
        f.write(text[: len(text) // 2])
    raise OSError(28, "No space left on device")


def _fail_in_tables_midway(save_file_, tensors, path):
    save_file_(tensors, path, metadata={"format": "ptfast.PromptBank"})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    raise OSError(28, "No space left on device")


def _fail_between_files(manifest, path):
    raise KeyboardInterrupt  # tables written, manifest not: even an interrupt leaves the old bank


@pytest.mark.parametrize(
    "writer, failure",
    [
        ("_write_manifest", _fail_in_manifest_midway),
        ("_write_manifest", _fail_between_files),
        ("_write_tables", _fail_in_tables_midway),
    ],
)
def test_an_interrupted_save_leaves_the_old_bank(folder, monkeypatch, writer, failure):
    old = _bank()
    new = _bank(seed=2, order="bca")  # the same names in another order: its tables under the old manifest's keys
    before = _siblings(folder)  # would serve b's table as a's
    monkeypatch.setattr(bank_io, writer, failure)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_bank(new, folder)
    assert _same_tables(PromptBank.load(folder, _weight()), old)
    assert _siblings(folder) == before  # no partial folder left beside it
    monkeypatch.undo()
    save_bank(new, folder)
    assert _same_tables(PromptBank.load(folder, _weight()), new)
    assert _siblings(folder) == before


def test_an_interrupted_first_save_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(bank_io, "_write_manifest", _fail_in_manifest_midway)
    with pytest.raises(OSError, match="No space left"):
        save_bank(_bank(), tmp_path / "bank")
    assert os.listdir(tmp_path) == []


def _failing_rename(monkeypatch, fails):
    """os.rename, failing on the calls for which ``fails(src, dst)`` is true."""
    real = os.rename

    def rename(src, dst):
        if fails(os.fspath(src), os.fspath(dst)):
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(bank_io.os, "rename", rename)


def test_a_failed_rename_into_place_puts_the_old_bank_back(folder, monkeypatch):
    before = _siblings(folder)
    _failing_rename(monkeypatch, lambda src, dst: ".saving-" in src)
    with pytest.raises(OSError, match="Input/output error"):
        save_bank(_bank(seed=2), folder)
    assert _same_tables(PromptBank.load(folder, _weight()), _bank())
    assert _siblings(folder) == before


def test_when_the_old_bank_cannot_be_put_back_the_error_says_where_it_is(folder, monkeypatch):
    _failing_rename(monkeypatch, lambda src, dst: ".saving-" in src or ".replaced-" in src)
    with pytest.raises(OSError, match=r"nor the old one back .*the old bank is in '(.*)': rename it to") as info:
        save_bank(_bank(seed=2), folder)
    aside = str(info.value).split("the old bank is in ")[1].split("'")[1]
    assert _same_tables(PromptBank.load(aside, _weight()), _bank())
    assert not os.path.exists(folder)  # no folder at all rather than a mixed one


def test_an_old_bank_that_cannot_be_removed_is_a_warning(folder, monkeypatch):
    real = bank_io.shutil.rmtree

    def refuse(path, *args, **kwargs):
        if ".replaced-" not in os.fspath(path):
            return real(path, *args, **kwargs)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(bank_io.shutil, "rmtree", refuse)
    with pytest.warns(RuntimeWarning, match="could not remove the old bank in .*replaced-"):
        save_bank(_bank(seed=2), folder)
    monkeypatch.undo()
    assert _same_tables(PromptBank.load(folder, _weight()), _bank(seed=2))


def test_a_folder_with_other_files_is_not_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files that are not a bank's \(notes.txt\)"):
        save_bank(_bank(), tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        save_bank(_bank(), tmp_path / "file")


def test_saving_into_an_empty_folder_and_the_folders_mode(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    (tmp_path / "empty").mkdir()
    returned = save_bank(_bank(), tmp_path / "empty")
    assert returned == os.fspath(tmp_path / "empty")
    assert sorted(os.listdir(returned)) == [BANK_MANIFEST, BANK_TABLES]
    # the new folder is made like os.mkdir's (tempfile.mkdtemp's would be private to the user)
    assert stat.S_IMODE(os.stat(returned).st_mode) == 0o777 & ~umask
    assert _same_tables(PromptBank.load(returned, _weight()), _bank())


def test_bf16_bank_digests_round_trip(tmp_path):
    bank = _bank(dtype=torch.bfloat16)
    assert _same_tables(PromptBank.load(save_bank(bank, tmp_path / "bank"), _weight(torch.bfloat16)), bank)


def test_bank_format_error_is_exported():
    assert ptfast.BankFormatError is BankFormatError is bank_io.BankFormatError
    assert issubclass(BankFormatError, ValueError) and not issubclass(BankMismatchError, BankFormatError)
