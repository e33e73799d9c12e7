import io
import os
import secrets
import subprocess
import sys

import pytest

from llmhost.errors import ConfigError, DecryptionError
from llmhost.store import crypto as cr
from llmhost.store import in_memory

KEY = bytes(range(32))
CHUNK = 1024


def enc(data: bytes, key: bytes = KEY, chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    cr.encrypt_stream(io.BytesIO(data), out, key, len(data), chunk)
    return out.getvalue()


def dec(blob: bytes, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    cr.decrypt_stream(io.BytesIO(blob), out, key)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 7])
def test_round_trip(size):
    data = secrets.token_bytes(size)
    blob = enc(data)
    assert blob.startswith(cr.MAGIC)
    assert size < 16 or data not in blob
    assert dec(blob) == data


def test_same_plaintext_encrypts_differently():
    assert enc(b"x" * 100) != enc(b"x" * 100)


def test_wrong_key():
    with pytest.raises(DecryptionError, match="wrong key"):
        dec(enc(b"secret weights" * 100), key=bytes(32))


@pytest.mark.parametrize(
    "where",
    [8, 9, 20, 40, cr.HEADER_SIZE, cr.HEADER_SIZE + 500, cr.HEADER_SIZE + CHUNK + 3, -1, -20],
)
def test_any_flipped_byte_is_caught(where):
    blob = bytearray(enc(secrets.token_bytes(3 * CHUNK + 10)))
    blob[where] ^= 0x01
    with pytest.raises(DecryptionError):
        dec(bytes(blob))


def test_truncation_is_caught_even_at_a_chunk_boundary():
    blob = enc(secrets.token_bytes(3 * CHUNK))
    whole_chunk = CHUNK + cr.TAG_SIZE
    for cut in (1, 7, whole_chunk, 2 * whole_chunk):
        with pytest.raises(DecryptionError, match="truncated"):
            dec(blob[:-cut])
    with pytest.raises(DecryptionError, match="after its last chunk"):
        dec(blob + b"\0")


def test_swapped_chunks_are_caught():
    blob = enc(secrets.token_bytes(3 * CHUNK))
    h, w = cr.HEADER_SIZE, CHUNK + cr.TAG_SIZE
    c0, c1 = blob[h : h + w], blob[h + w : h + 2 * w]
    with pytest.raises(DecryptionError, match="chunk 0"):
        dec(blob[:h] + c1 + c0 + blob[h + 2 * w :])


def test_not_encrypted():
    with pytest.raises(DecryptionError, match="not an llmhost-encrypted"):
        dec(b"GGUF" + b"\0" * 100)


def test_files_round_trip_atomically(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(secrets.token_bytes(10_000))
    e = cr.encrypt_file(src, tmp_path / "m.gguf.enc", KEY, chunk_size=4096)
    assert cr.is_encrypted(e) and not cr.is_encrypted(src)
    d = cr.decrypt_file(e, tmp_path / "back.gguf", KEY)
    assert d.read_bytes() == src.read_bytes()
    with pytest.raises(DecryptionError):
        cr.decrypt_file(e, tmp_path / "bad.gguf", bytes(32))
    assert not (tmp_path / "bad.gguf").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_key_forms():
    assert cr.parse_key(KEY) == KEY
    assert cr.parse_key(KEY.hex().encode() + b"\n") == KEY
    import base64

    assert cr.parse_key(base64.b64encode(KEY) + b"\n") == KEY
    for bad in (b"short", b"00" * 31, b"zz" * 32):
        with pytest.raises(ConfigError):
            cr.parse_key(bad)


def test_key_file_must_be_private(tmp_path):
    p = cr.generate_key_file(tmp_path / "model.key")
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    key = cr.load_key(p)
    assert len(key) == 32
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        cr.generate_key_file(p)
    os.chmod(p, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        cr.load_key(p)
    with pytest.raises(ConfigError, match="cannot read"):
        cr.load_key(tmp_path / "missing.key")


def test_key_from_command_and_env(monkeypatch):
    cmd = f"{sys.executable} -c \"print('{KEY.hex()}')\""
    assert cr.load_key(command=cmd) == KEY
    with pytest.raises(ConfigError, match="key command failed"):
        cr.load_key(command=f'{sys.executable} -c "import sys; sys.exit(3)"')
    monkeypatch.setenv(cr.KEY_ENV, KEY.hex())
    assert cr.load_key() == KEY
    monkeypatch.delenv(cr.KEY_ENV)
    with pytest.raises(ConfigError, match="no model key"):
        cr.load_key()


def test_decrypted_copy_lives_only_inside_the_block(tmp_path, shm):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + secrets.token_bytes(5000))
    e = cr.encrypt_file(src, tmp_path / "m.enc.gguf", KEY, chunk_size=1024)
    with in_memory.decrypted_in_memory(e, KEY, shm) as plain:
        assert plain.read_bytes() == src.read_bytes()
        assert oct(plain.stat().st_mode & 0o777) == "0o600"
    assert list(shm.iterdir()) == []
    with pytest.raises(RuntimeError), in_memory.decrypted_in_memory(e, KEY, shm):
        raise RuntimeError("load failed")
    assert list(shm.iterdir()) == []
    with pytest.raises(DecryptionError), in_memory.decrypted_in_memory(e, bytes(32), shm):
        pass
    assert list(shm.iterdir()) == []
    with (
        pytest.raises(ConfigError, match="never to disk"),
        in_memory.decrypted_in_memory(e, KEY, tmp_path / "nope"),
    ):
        pass


def test_stale_copies_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{in_memory.DECRYPT_PREFIX}{dead.pid}-abcd.gguf"
    mine = tmp_path / f"{in_memory.DECRYPT_PREFIX}{os.getpid()}-abcd.gguf"
    other = tmp_path / "unrelated.gguf"
    for p in (stale, mine, other):
        p.write_bytes(b"x")
    assert in_memory.clean_stale(tmp_path) == [stale]
    assert mine.exists() and other.exists() and not stale.exists()


@pytest.mark.parametrize("size", [0, 1, 4096, 4096 * 7 + 5])
def test_file_paths_match_the_stream_format(tmp_path, size):
    src = tmp_path / "p"
    src.write_bytes(secrets.token_bytes(size))
    e = cr.encrypt_file(src, tmp_path / "e", KEY, chunk_size=4096)
    assert dec(e.read_bytes()) == src.read_bytes()  # parallel writer, streaming reader
    (tmp_path / "s").write_bytes(enc(src.read_bytes(), chunk=4096))
    back = cr.decrypt_file(tmp_path / "s", tmp_path / "b", KEY)  # streaming writer, parallel reader
    assert back.read_bytes() == src.read_bytes()


def test_file_path_refuses_truncated_padded_and_tampered(tmp_path):
    src = tmp_path / "p"
    src.write_bytes(secrets.token_bytes(20_000))
    e = cr.encrypt_file(src, tmp_path / "e", KEY, chunk_size=4096)
    blob = e.read_bytes()
    cases = {"truncated": blob[:-4112], "after its last chunk": blob + b"x"}
    flipped = bytearray(blob)
    flipped[-5000] ^= 1
    cases["chunk 3 failed authentication"] = bytes(flipped)
    for message, data in cases.items():
        bad = tmp_path / "bad"
        bad.write_bytes(data)
        with pytest.raises(DecryptionError, match=message):
            cr.decrypt_file(bad, tmp_path / "out", KEY)
        assert not (tmp_path / "out").exists()


def test_stale_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{in_memory.DECRYPT_PREFIX}{dead.pid}-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x")
    assert in_memory.clean_stale(tmp_path) == [stale]
    assert not stale.exists()
