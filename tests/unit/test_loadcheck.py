"""The checks a stored model passes before it is served: sizes always, sha256 unless a stamp
from `verify` shows the files unchanged, refusal of files the manifest does not list."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from llmhost.errors import IntegrityError
from llmhost.store.loadcheck import check_before_load, read_stamp, write_stamp
from llmhost.store.manifest import STAMP_NAME
from llmhost.store.registry import ModelStore
from llmhost.store.verify import verify_folder
from tests.unit.test_store import KEY, add

HOUR_NS = 3600 * 10**9


@pytest.fixture()
def stored(tmp_path, tiny_model) -> tuple[Path, Path]:
    store = ModelStore(tmp_path / "models")
    add(store, tiny_model.gguf, "tiny:v1", [tiny_model.gguf])
    folder = store.resolve("tiny:v1")
    return folder, folder / tiny_model.gguf.name


def flip(path: Path, at: int | None = None) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2 if at is None else at)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))


def age(path: Path) -> None:
    """As if written an hour ago: past the window in which a stamp does not vouch for a file."""
    t = time.time_ns() - HOUR_NS
    os.utime(path, ns=(t, t))


def test_a_flipped_byte_is_refused_and_a_path_outside_the_store_is_not_checked(stored, tmp_path):
    folder, gguf = stored
    checked = check_before_load(folder)
    assert checked is not None and checked.hashed == [gguf.name] and not checked.unhashed
    assert check_before_load(gguf) is not None  # a file of a stored folder counts too
    flip(gguf)
    for path in (folder, gguf):
        with pytest.raises(IntegrityError, match=r"(?s)tiny:v1 .* does not match.*sha256"):
            check_before_load(path)
    loose = tmp_path / "loose.gguf"
    loose.write_bytes(gguf.read_bytes())
    assert check_before_load(loose) is None  # no manifest: served as it is


def test_a_size_change_is_refused_even_when_only_sizes_are_checked(stored):
    folder, gguf = stored
    with gguf.open("ab") as f:
        f.write(b"\0")
    for mode in ("size", "auto", "full"):
        with pytest.raises(IntegrityError, match="bytes, the manifest says"):
            check_before_load(folder, mode=mode)
    gguf.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        check_before_load(folder, mode="size")


def test_a_stamp_spares_the_hash_until_the_file_changes(stored):
    folder, gguf = stored
    age(gguf)
    manifest = check_before_load(folder).manifest
    write_stamp(folder, manifest, time.time_ns())
    assert read_stamp(folder, manifest) is not None
    # nothing may be hashed at start: only the stamp can vouch for the sha256
    checked = check_before_load(folder, hash_max_bytes=0)
    assert checked.stamped == [gguf.name] and checked.hashed == [] and checked.unhashed == []
    assert check_before_load(folder, mode="full", hash_max_bytes=0).hashed == [gguf.name]
    flip(gguf)  # a write moves the mtime: the stamp no longer covers the file
    with pytest.raises(IntegrityError, match="sha256"):
        check_before_load(folder)
    checked = check_before_load(folder, hash_max_bytes=0)  # too large to hash: sizes only
    assert checked.unhashed == [gguf.name] and checked.stamped == []
    with pytest.raises(IntegrityError, match="sha256"):
        check_before_load(folder, mode="full")


def test_a_stamp_does_not_vouch_for_files_written_while_it_was_hashing(stored):
    folder, gguf = stored
    manifest = check_before_load(folder).manifest
    stamp = write_stamp(folder, manifest, time.time_ns())  # the file is seconds old
    assert stamp.files == {}
    assert check_before_load(folder, hash_max_bytes=0).unhashed == [gguf.name]


def test_a_stamp_of_another_manifest_or_garbage_is_ignored(stored):
    folder, gguf = stored
    age(gguf)
    manifest = check_before_load(folder).manifest
    write_stamp(folder, manifest, time.time_ns())
    other = manifest.model_copy(deep=True)
    other.files[0].sha256 = "0" * 64
    assert read_stamp(folder, other) is None
    (folder / STAMP_NAME).write_text("{not json")
    assert read_stamp(folder, manifest) is None
    assert check_before_load(folder, hash_max_bytes=0).unhashed == [gguf.name]
    assert verify_folder(folder, manifest).notes == []  # the stamp is not a stray file


def test_weight_files_the_manifest_does_not_list_are_refused(stored, tiny_model):
    folder, gguf = stored
    stray = folder / "other.gguf"
    stray.write_bytes(gguf.read_bytes())
    with pytest.raises(IntegrityError, match=r"does not list.*other\.gguf"):
        check_before_load(folder)
    with pytest.raises(IntegrityError, match="not listed in the manifest"):
        check_before_load(stray)
    stray.unlink()
    (folder / "notes.txt").write_text("fine")  # not weights: verify notes it, load ignores it
    assert check_before_load(folder) is not None


def test_an_encrypted_stored_model_is_checked_by_its_ciphertext(tmp_path, tiny_model):
    store = ModelStore(tmp_path / "models")
    add(store, tiny_model.gguf, "tiny:v1", [tiny_model.gguf])
    store.encrypt("tiny:v1", KEY)
    folder = store.resolve("tiny:v1")
    enc = folder / f"{tiny_model.gguf.name}.enc"
    assert check_before_load(folder).hashed == [enc.name]
    flip(enc, at=enc.stat().st_size - 10)
    with pytest.raises(IntegrityError, match=f"{enc.name}: sha256"):
        check_before_load(folder)
