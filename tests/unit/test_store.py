"""The registry (commit, list, tag, promote, rm, encrypt by name) and verify's checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from llmhost.errors import ConfigError, DecryptionError, ModelNotFound
from llmhost.store.manifest import FileEntry, Manifest, detect_format
from llmhost.store.registry import ModelStore
from llmhost.store.sources import default_name, parse_url_list
from llmhost.store.verify import (
    check_gguf,
    check_safetensors,
    read_checksum_file,
    verify_file,
    verify_folder,
)

KEY = bytes(range(32))


def add(store: ModelStore, src: Path, ref: str, files: list[Path]) -> Manifest:
    staging = store.staging_dir(f"t-{ref.replace(':', '-').replace('/', '-')}")
    staging.mkdir(parents=True)
    entries = []
    for f in files:
        shutil.copy(f, staging / f.name)
        data = f.read_bytes()
        entries.append(
            FileEntry(path=f.name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        )
    name, _, tag = ref.partition(":")
    m = Manifest(
        name=name,
        tag=tag or "latest",
        source=str(src),
        format=detect_format([e.path for e in entries]),
        files=entries,
    )
    store.commit(staging, m)
    return m


@pytest.fixture()
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_commit_list_tag_promote_rm(store, tiny_model):
    add(store, tiny_model.gguf, "acme/tiny:v1", [tiny_model.gguf])
    assert [m.ref for m in store.list()] == ["acme/tiny:v1"]
    store.tag("acme/tiny:v1", "acme/tiny:v2")
    v1 = store.version_dir(_ref("acme/tiny:v1"))
    v2 = store.version_dir(_ref("acme/tiny:v2"))
    gguf = tiny_model.gguf.name
    assert (v1 / gguf).stat().st_ino == (v2 / gguf).stat().st_ino  # hard link, no copy
    store.promote("acme/tiny:v1", "stable")
    assert store.resolve("acme/tiny@stable") == v1
    store.promote("acme/tiny:v2", "stable")  # moves the channel
    assert store.resolve("acme/tiny@stable") == v2
    assert store.get("acme/tiny:v1").channel is None
    with pytest.raises(ConfigError, match="exists"):
        store.tag("acme/tiny:v1", "acme/tiny:v2")
    store.remove("acme/tiny:v2")
    assert [m.ref for m in store.list()] == ["acme/tiny:v1"]
    assert (v1 / gguf).read_bytes() == tiny_model.gguf.read_bytes()
    with pytest.raises(ModelNotFound):
        store.get("acme/tiny:v2")
    with pytest.raises(ModelNotFound):
        store.resolve("acme/tiny@stable")
    store.remove("acme/tiny:v1")
    assert store.list() == [] and not (store.root / "acme").exists()


def _ref(text):
    from llmhost.store.names import parse_ref

    return parse_ref(text)


def test_verify_detects_flipped_byte_missing_and_extra_files(store, tiny_model):
    m = add(store, tiny_model.gguf, "tiny", [tiny_model.gguf])
    folder = store.resolve("tiny")
    assert verify_folder(folder, m).ok
    path = folder / tiny_model.gguf.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    report = verify_folder(folder, m)
    assert not report.ok and "sha256" in report.problems[0]
    (folder / "stray.txt").write_text("x")
    path.unlink()
    report = verify_folder(folder, m)
    assert any("missing" in p for p in report.problems)
    assert any("stray.txt" in n for n in report.notes)


def test_encrypt_and_decrypt_by_name(store, tiny_model):
    add(store, tiny_model.hf_dir, "hf", sorted(tiny_model.hf_dir.iterdir()))
    m = store.encrypt("hf", KEY)
    folder = store.resolve("hf")
    assert m.encrypted and (folder / "model.safetensors.enc").is_file()
    assert not (folder / "model.safetensors").exists()
    assert (folder / "config.json").is_file()  # only weights are sealed
    report = verify_folder(folder, store.get("hf"))
    assert report.ok and any("encrypted" in n for n in report.notes)
    with pytest.raises(ConfigError, match="already"):
        store.encrypt("hf", KEY)
    with pytest.raises(DecryptionError):
        store.decrypt("hf", bytes(32))
    assert store.get("hf").encrypted  # a failed decrypt changes nothing
    back = store.decrypt("hf", KEY)
    plain = (tiny_model.hf_dir / "model.safetensors").read_bytes()
    assert not back.encrypted and (folder / "model.safetensors").read_bytes() == plain


def test_gguf_layout_checks(tiny_model, tmp_path):
    assert check_gguf(tiny_model.gguf) == []
    data = tiny_model.gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    assert "outside the file" in check_gguf(cut)[0]
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:40])
    assert "truncated" in check_gguf(head)[0]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUL" + data[4:])
    assert "magic" in check_gguf(bad)[0]
    ver = tmp_path / "ver.gguf"
    ver.write_bytes(b"GGUF" + struct.pack("<I", 7) + data[8:])
    assert "version 7" in check_gguf(ver)[0]
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 1) + data[24:])
    assert "exceed" in check_gguf(huge)[0]


def test_hf_layout_checks(tiny_model, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_model.hf_dir, hf)
    assert verify_folder(hf).ok
    assert check_safetensors(hf / "model.safetensors") == []
    (hf / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002.safetensors"}})
    )
    report = verify_folder(hf)
    assert any("model-00002.safetensors" in p for p in report.problems)
    (hf / "model.safetensors.index.json").unlink()
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:-10])
    assert "outside the file" in check_safetensors(hf / "model.safetensors")[0]
    for tok in hf.glob("tokenizer*"):
        tok.unlink()
    assert any("tokenizer" in p for p in verify_folder(hf).problems)
    (hf / "pytorch_model.bin").write_bytes(b"pickle")
    assert any("pickle" in p for p in verify_folder(hf).problems)


def test_checksum_files(tiny_model, tmp_path):
    gguf = tmp_path / "m.gguf"
    shutil.copy(tiny_model.gguf, gguf)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    md5 = hashlib.md5(gguf.read_bytes()).hexdigest()
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{sha}  m.gguf\n")
    assert verify_file(gguf, read_checksum_file(sums)).ok
    sums.write_text(f"{md5} *m.gguf\n")
    assert verify_file(gguf, read_checksum_file(sums)).ok
    sums.write_text(f"{'0' * 64}  m.gguf\n")
    assert "does not match" in verify_file(gguf, read_checksum_file(sums)).problems[0]
    sums.write_text(f"{sha}  other.gguf\n")
    assert "not listed" in verify_file(gguf, read_checksum_file(sums)).problems[0]
    sums.write_text("garbage\n")
    with pytest.raises(ValueError):
        read_checksum_file(sums)


@pytest.mark.parametrize(
    "text, name",
    [
        ("Qwen2.5-7B-Instruct-Q4_K_M.gguf", "qwen2.5-7b-instruct-q4_k_m"),
        ("TinyLlama/TinyLlama-1.1B-Chat", "tinyllama/tinyllama-1.1b-chat"),
        ("weird name!.safetensors", "weird-name"),
        ("...", "model"),
    ],
)
def test_default_names(text, name):
    assert default_name(text) == name


def test_url_list_parsing_errors():
    files = parse_url_list(
        "https://h/a.gguf\n  out=x/a.gguf\n  checksum=md5=" + "a" * 32 + "\n  size=10\n"
        "  header=Authorization: Bearer t\nhttps://h/b.json\n"
    )
    assert [(f.path, f.md5, f.size) for f in files] == [
        ("x/a.gguf", "a" * 32, 10),
        ("b.json", None, None),
    ]
    assert files[0].headers == {"Authorization": "Bearer t"}
    for bad, msg in [
        ("  out=x\n", "before any URL"),
        ("ftp://h/a\n", "http"),
        ("https://h/a\n  checksum=sha-1=abc\n", "checksum"),
        ("https://h/a\n  bogus=1\n", "unknown option"),
        ("https://h/a\nhttps://g/a\n", "two URLs"),
        ("# nothing\n", "no URL"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_url_list(bad)
