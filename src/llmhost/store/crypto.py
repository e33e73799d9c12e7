"""AES-256-GCM encryption of model files at rest, in authenticated chunks.

File layout (integers big-endian):

    header  = MAGIC (8) | version (1) | chunk_size (4) | salt (16) | nonce_prefix (7) | size (8)
    chunk i = ciphertext (chunk_size bytes, the last one shorter) | GCM tag (16)

Every file gets its own key, HKDF-SHA256(master key, salt), so nonces never repeat across files.
Chunk i is sealed with nonce `nonce_prefix | i (4) | last (1)` and associated data
`header | i | last`: a changed header, a flipped byte, chunks swapped, dropped or cut off, or a
wrong key all fail authentication. `size` (the plaintext length) fixes how many chunks there
must be, so truncation is caught even at a chunk boundary.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import mmap
import os
import secrets
import shlex
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llmhost.errors import ConfigError, DecryptionError
from llmhost.files import refuse_shared

MAGIC = b"LLMHENC\x00"
VERSION = 1
_HEADER = struct.Struct(">8sBI16s7sQ")
HEADER_SIZE = _HEADER.size
TAG_SIZE = 16
DEFAULT_CHUNK = 4 << 20  # large enough that per-chunk overhead is noise, small enough to stream
KEY_ENV = "LLMHOST_MODEL_KEY"


# --- keys ------------------------------------------------------------------------------------


def parse_key(text: bytes) -> bytes:
    """A 256-bit key given raw (32 bytes), as 64 hex digits or as base64."""
    raw = text.strip()
    if len(text) == 32 and len(raw) != 64:
        return text
    for decode in (binascii.unhexlify, lambda b: base64.b64decode(b, validate=True)):
        try:
            key = decode(raw)
        except (binascii.Error, ValueError):
            continue
        if len(key) == 32:
            return key
    raise ConfigError("a model key must be 32 bytes: raw, 64 hex digits or base64")


def load_key(key_file: Path | str | None = None, command: str | None = None) -> bytes:
    """The master key, from a file (owner-only permissions), a command that prints it (a KMS
    client, a secret manager), or the LLMHOST_MODEL_KEY environment variable, in that order."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from exc
        refuse_shared(path, mode, "key file")
        return parse_key(path.read_bytes())
    if command is not None:
        try:
            out = subprocess.run(
                shlex.split(command), capture_output=True, timeout=30, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConfigError(f"key command failed: {exc}") from exc
        return parse_key(out)
    env = os.environ.get(KEY_ENV)
    if env:
        return parse_key(env.encode())
    raise ConfigError(f"no model key: give --key-file, --key-command or set {KEY_ENV}")


def generate_key_file(path: Path | str) -> Path:
    """Write a new random key (hex) readable by its owner only; never overwrites."""
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


# --- format ----------------------------------------------------------------------------------


def is_encrypted(path: Path | str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _file_cipher(key: bytes, salt: bytes) -> AESGCM:
    if len(key) != 32:
        raise ConfigError("a model key must be 32 bytes (AES-256)")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"llmhost model file v1")
    return AESGCM(hkdf.derive(key))


def _n_chunks(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


def _seal_params(header: bytes, prefix: bytes, i: int, n: int) -> tuple[bytes, bytes]:
    """Nonce and associated data of chunk i of n."""
    tail = struct.pack(">IB", i, i == n - 1)
    return prefix + tail, header + tail


def _new_header(size: int, chunk_size: int) -> tuple[bytes, bytes, bytes]:
    salt, prefix = secrets.token_bytes(16), secrets.token_bytes(7)
    return _HEADER.pack(MAGIC, VERSION, chunk_size, salt, prefix, size), salt, prefix


def _read_header(header: bytes, name: str) -> tuple[int, bytes, bytes, int]:
    if len(header) != HEADER_SIZE or header[: len(MAGIC)] != MAGIC:
        raise DecryptionError(f"{name} is not an llmhost-encrypted file")
    _, version, chunk_size, salt, prefix, size = _HEADER.unpack(header)
    if version != VERSION or not 0 < chunk_size <= 1 << 30:
        raise DecryptionError(f"{name}: unsupported encryption header (version {version})")
    return chunk_size, salt, prefix, size


def _auth_failed(name: str, i: int) -> DecryptionError:
    return DecryptionError(
        f"{name}: chunk {i} failed authentication: wrong key, or the file was modified"
    )


def encrypt_stream(
    src: io.BufferedIOBase, dst: BinaryIO, key: bytes, size: int, chunk_size: int = DEFAULT_CHUNK
) -> None:
    header, salt, prefix = _new_header(size, chunk_size)
    aead = _file_cipher(key, salt)
    dst.write(header)
    n = _n_chunks(size, chunk_size)
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    for i in range(n):
        want = min(chunk_size, size - i * chunk_size)
        got = src.readinto(view[:want]) if want else 0
        if got != want:
            raise ValueError("the file changed size while it was being encrypted")
        nonce, aad = _seal_params(header, prefix, i, n)
        dst.write(aead.encrypt(nonce, view[:want], aad))


def decrypt_stream(src: BinaryIO, dst: BinaryIO, key: bytes, *, name: str = "file") -> int:
    """Decrypt `src` into `dst`; returns the plaintext size. Raises DecryptionError on any
    mismatch before writing the chunk that failed."""
    header = src.read(HEADER_SIZE)
    chunk_size, salt, prefix, size = _read_header(header, name)
    aead = _file_cipher(key, salt)
    n = _n_chunks(size, chunk_size)
    for i in range(n):
        want = min(chunk_size, size - i * chunk_size) + TAG_SIZE
        sealed = src.read(want)
        if len(sealed) != want:
            raise DecryptionError(f"{name} is truncated (chunk {i} of {n} incomplete)")
        nonce, aad = _seal_params(header, prefix, i, n)
        try:
            dst.write(aead.decrypt(nonce, sealed, aad))
        except InvalidTag as exc:
            raise _auth_failed(name, i) from exc
    if src.read(1):
        raise DecryptionError(f"{name} has data after its last chunk; it was modified")
    return size


def _parallel(fn, n: int, workers: int | None) -> None:
    """Run fn(0..n-1); AES-GCM releases the GIL, so chunks go to every core."""
    workers = min(n, workers or os.cpu_count() or 1)
    if workers <= 1:
        for i in range(n):
            fn(i)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, range(n)):
            pass


def encrypt_into_fd(
    src: Path, out_fd: int, key: bytes, chunk_size: int = DEFAULT_CHUNK, workers: int | None = None
) -> int:
    """Encrypt file `src` into the file behind `out_fd` (resized to fit) through memory maps:
    no intermediate copies, chunks sealed in parallel. Returns the ciphertext size."""
    with src.open("rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        header, salt, prefix = _new_header(size, chunk_size)
        n = _n_chunks(size, chunk_size)
        total = HEADER_SIZE + size + n * TAG_SIZE
        os.ftruncate(out_fd, total)
        aead = _file_cipher(key, salt)
        with contextlib.ExitStack() as stack:
            plain = _map(stack, fin.fileno(), size, mmap.ACCESS_READ)
            view = _map(stack, out_fd, total, mmap.ACCESS_WRITE)
            view[:HEADER_SIZE] = header

            def seal(i: int) -> None:
                start = i * chunk_size
                end = min(start + chunk_size, size)
                at = HEADER_SIZE + start + i * TAG_SIZE
                nonce, aad = _seal_params(header, prefix, i, n)
                aead.encrypt_into(
                    nonce, plain[start:end], aad, view[at : at + end - start + TAG_SIZE]
                )

            _parallel(seal, n, workers)
    return total


def decrypt_into_fd(src: Path, out_fd: int, key: bytes, workers: int | None = None) -> int:
    """Decrypt file `src` into the file behind `out_fd` through memory maps, chunks in
    parallel. The whole layout is checked before any work; a failed chunk raises."""
    with src.open("rb") as fin:
        chunk_size, salt, prefix, size = _read_header(fin.read(HEADER_SIZE), src.name)
        header = _HEADER.pack(MAGIC, VERSION, chunk_size, salt, prefix, size)
        n = _n_chunks(size, chunk_size)
        expected = HEADER_SIZE + size + n * TAG_SIZE
        actual = os.fstat(fin.fileno()).st_size
        if actual < expected:
            raise DecryptionError(f"{src.name} is truncated ({actual} of {expected} bytes)")
        if actual > expected:
            raise DecryptionError(f"{src.name} has data after its last chunk; it was modified")
        os.ftruncate(out_fd, size)
        aead = _file_cipher(key, salt)
        with contextlib.ExitStack() as stack:
            sealed = _map(stack, fin.fileno(), expected, mmap.ACCESS_READ)
            plain = _map(stack, out_fd, size, mmap.ACCESS_WRITE)

            def open_chunk(i: int) -> None:
                start = i * chunk_size
                end = min(start + chunk_size, size)
                at = HEADER_SIZE + start + i * TAG_SIZE
                nonce, aad = _seal_params(header, prefix, i, n)
                try:
                    aead.decrypt_into(
                        nonce, sealed[at : at + end - start + TAG_SIZE], aad, plain[start:end]
                    )
                except InvalidTag as exc:
                    raise _auth_failed(src.name, i) from exc

            _parallel(open_chunk, n, workers)
    return size


def _map(stack: contextlib.ExitStack, fd: int, size: int, access: int) -> memoryview:
    """A memoryview over `size` bytes of fd (an empty one for an empty file)."""
    if size == 0:
        return memoryview(bytearray())
    # Map every page up front (and allocate it, for output): one call instead of a page
    # fault per 4 KiB, which otherwise costs more than the cipher itself.
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if access == mmap.ACCESS_WRITE:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, size)
        mm = mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    else:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
    stack.enter_context(mm)
    return stack.enter_context(memoryview(mm))


def _atomic_target(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.{os.getpid()}.tmp")


def encrypt_file(
    src: Path | str, dst: Path | str, key: bytes, chunk_size: int = DEFAULT_CHUNK
) -> Path:
    src, dst = Path(src), Path(dst)
    tmp = _atomic_target(dst)
    try:
        with tmp.open("wb+") as fout:
            encrypt_into_fd(src, fout.fileno(), key, chunk_size)
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def decrypt_file(src: Path | str, dst: Path | str, key: bytes) -> Path:
    src, dst = Path(src), Path(dst)
    tmp = _atomic_target(dst)
    try:
        with tmp.open("wb+") as fout:
            decrypt_into_fd(src, fout.fileno(), key)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def plaintext_size(path: Path) -> int:
    """The decrypted size an encrypted file announces (0 for a plain file)."""
    with path.open("rb") as f:
        header = f.read(HEADER_SIZE)
    if len(header) == HEADER_SIZE and header[: len(MAGIC)] == MAGIC:
        return _HEADER.unpack(header)[-1]
    return 0
