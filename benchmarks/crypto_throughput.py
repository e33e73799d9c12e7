"""Model encryption figures, one JSON line: AES-256-GCM encrypt/decrypt throughput on one core
(in memory, so disks do not count), and how long an encrypted GGUF takes to become ready to
serve against the same file in plain text (alternating, best of N).

    .venv/bin/python benchmarks/crypto_throughput.py [MODEL.gguf] [--mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from llmhost.engines.llamacpp import LlamaCppEngine
from llmhost.store import crypto


def throughput(mib: int, folder: Path) -> dict:
    """Encrypt and decrypt a file held in tmpfs, on one core and on all of them. `cold` is the
    first pass, into a fresh file whose pages the kernel must allocate (on some VMs slower than
    the cipher: compare `cp_gb_s`, a plain copy of the same file); `warm` reuses the pages."""
    key = secrets.token_bytes(32)
    size = mib << 20
    out: dict = {"bytes": size}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        plain, sealed, back = (Path(tmp) / n for n in ("plain", "sealed", "back"))
        plain.write_bytes(secrets.token_bytes(size))
        t0 = time.perf_counter()
        shutil.copyfile(plain, Path(tmp) / "copy")
        out["cp_gb_s"] = size / (time.perf_counter() - t0) / 1e9
        (Path(tmp) / "copy").unlink()
        for workers, label in ((1, "one_core"), (None, "all_cores")):
            for name, fn, src, dst in (
                ("encrypt", crypto.encrypt_into_fd, plain, sealed),
                ("decrypt", crypto.decrypt_into_fd, sealed, back),
            ):
                times = []
                for _ in range(3):
                    fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)  # pages kept after pass 1
                    t0 = time.perf_counter()
                    fn(src, fd, key, workers=workers)
                    times.append(time.perf_counter() - t0)
                    os.close(fd)
                out[f"{name}_gb_s_{label}_warm"] = size / min(times[1:]) / 1e9
                if label == "one_core":  # the first pass ever wrote into a new file
                    out[f"{name}_gb_s_{label}_cold"] = size / times[0] / 1e9
        assert back.read_bytes() == plain.read_bytes()
    return out


async def ready_time(path: Path, key: bytes | None) -> float:
    engine = LlamaCppEngine(
        path, threads=2, parallel=1, ctx_size=512, key_loader=(lambda: key) if key else None
    )
    t0 = time.perf_counter()
    await engine.start()
    elapsed = time.perf_counter() - t0
    await engine.close()
    return elapsed


async def load_times(model: Path, runs: int) -> dict:
    key = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        enc = crypto.encrypt_file(model, Path(tmp) / (model.name + ".enc"), key)
        await ready_time(model, None)  # page cache warm for both, as on a serving host
        plain, sealed = [], []
        for _ in range(runs):
            plain.append(await ready_time(model, None))
            sealed.append(await ready_time(enc, key))
    return {
        "model": model.name,
        "model_bytes": model.stat().st_size,
        "plain_ready_s": min(plain),
        "encrypted_ready_s": min(sealed),
        "encrypted_over_plain": min(sealed) / min(plain),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    out = {"cpu_count": os.cpu_count(), "aes_256_gcm": throughput(a.mib, shm)}
    if a.model:
        out["load"] = asyncio.run(load_times(a.model, a.runs))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
