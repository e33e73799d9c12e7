"""Backup drills: full and incremental backups of a live-looking home, delete the home,
restore, and find the same config, working keys, an intact audit chain and byte-identical
models; dedup of model files; prune; damage of every kind caught by verify; encryption;
signed backup records (a forged or unsigned one is refused before anything is restored);
owner-only files whatever the umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llmhost.audit.store import AuditRecord, open_store
from llmhost.errors import BackupError, ConfigError, NotFound
from llmhost.ops.backup import Backups
from llmhost.ops.backup_remote import schedule_units
from llmhost.security.auth import KeyStore
from llmhost.store import crypto
from llmhost.store.registry import ModelStore
from tests.unit.test_store import add


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def audit(home: Path, n: int, user: str = "alice") -> None:
    store = open_store(None, home / "audit.db")
    store.append(
        [
            AuditRecord(
                ts=1.7e9 + i,
                request_id=f"r{i}",
                client_ip="10.0.0.1",
                user_id=user,
                route="/v1/completions",
                status=200,
            )
            for i in range(n)
        ]
    )
    store.close()


@pytest.fixture
def home(tmp_path, tiny_model):
    h = tmp_path / "home"
    h.mkdir()
    (h / "config.toml").write_text('host = "0.0.0.0"\nparallel = 4\n')
    keys = KeyStore(h / "keys.db")
    key, _ = keys.create("alice", rpm=30)
    keys.close()
    audit(h, 50)
    store = ModelStore(h / "models")
    add(store, tiny_model.gguf, "tiny:q", [tiny_model.gguf])
    add(
        store,
        tiny_model.hf_dir,
        "tiny:hf",
        sorted(p for p in tiny_model.hf_dir.iterdir() if p.is_file()),
    )
    store.tag("tiny:q", "tiny:prod")  # same file twice: stored once in the backup
    (h / "key").write_text(key)
    return h


def snapshot(h: Path) -> dict[str, str]:
    return {
        p.relative_to(h).as_posix(): sha(p)
        for p in sorted((h / "models").rglob("*"))
        if p.is_file()
    }


def test_backup_delete_restore_drill(home, tmp_path):
    dest = tmp_path / "backups"
    record_key = tmp_path / "kept-apart" / "backup.key"  # the operator keeps it off the host
    b = Backups(home, dest, record_key_file=record_key)
    models_before = snapshot(home)
    full = b.create("full")
    assert full.included == ["audit.db", "audit.head", "config.toml", "keys.db"]
    assert stat.S_IMODE(record_key.stat().st_mode) == 0o600
    blobs = list((dest / "blobs" / "sha256").iterdir())
    model_shas = {v for k, v in full.models.items() if not k.endswith(".manifest.json")}
    assert len(blobs) == len(model_shas)  # the GGUF shared by two tags is kept once
    # more audit records, then an incremental that holds only what changed
    audit(home, 25, user="bob")
    inc = b.create("incremental")
    assert inc.parent == full.id and inc.included == ["audit.db", "audit.head"]
    assert len(list((dest / "blobs" / "sha256").iterdir())) == len(blobs)  # nothing new
    assert b.verify(full) == [] and b.verify(inc) == []
    key = (home / "key").read_text()
    audit_key = (home / "audit.key").read_bytes()  # kept apart too: not in the backup
    shutil.rmtree(home)

    b2 = Backups(home, dest, record_key_file=record_key)
    b2.restore(b2.get(None), home)
    assert not (home / "audit.key").exists() and not (home / "backup.key").exists()
    (home / "audit.key").write_bytes(audit_key)
    (home / "audit.key").chmod(0o600)
    assert (home / "config.toml").read_text() == 'host = "0.0.0.0"\nparallel = 4\n'
    keys = KeyStore(home / "keys.db")
    principal = keys.authenticate(key)
    keys.close()
    assert principal.user_id == "alice" and principal.rpm == 30
    store = open_store(None, home / "audit.db")
    report = store.verify()
    assert report.ok and store.count() == 75
    assert len(store.search(user="bob")) == 25
    store.close()
    assert snapshot(home) == models_before
    assert ModelStore(home / "models").resolve("tiny:prod").is_dir()

    # restoring the full backup alone gives the state before the incremental
    with pytest.raises(BackupError, match="--force"):
        b2.restore(full, home)
    b2.restore(full, home, force=True)
    store = open_store(None, home / "audit.db")
    assert store.count() == 50 and store.verify().ok
    store.close()


def test_cli_drill_with_prune_and_damage(home, tmp_path):
    dest = tmp_path / "b"
    env = {**os.environ, "LLMHOST_HOME": str(home)}

    def cli(*args, ok=True):
        p = subprocess.run(
            [sys.executable, "-m", "llmhost", "backup", *args, "--to", str(dest)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (p.returncode == 0) == ok, p.stdout + p.stderr
        return p

    ids = [cli("create", "--full").stdout.strip() for _ in range(4)]
    cli("create", "--incremental")
    listed = json.loads(cli("list", "--json").stdout)
    assert [i["id"] for i in listed][:4] == ids and listed[-1]["kind"] == "incremental"
    out = cli("prune", "--keep", "3").stdout
    assert f"removed {ids[0]}" in out
    left = json.loads(cli("list", "--json").stdout)
    assert [i["kind"] for i in left].count("full") == 3 and len(left) == 4
    assert "ok" in cli("verify").stdout
    # damage: one flipped byte in the newest full archive
    newest = dest / left[2]["archive"]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    p = cli("verify", ok=False)
    assert "changed since it was written" in p.stdout
    # a damaged model blob
    blob = next((dest / "blobs" / "sha256").iterdir())
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    p = cli("verify", left[0]["id"], ok=False)
    assert "is damaged" in p.stdout
    # restore refuses a damaged chain and leaves the home untouched
    before = (home / "config.toml").read_text()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmhost",
            "backup",
            "restore",
            left[2]["id"],
            "--to",
            str(dest),
            "--force",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert (home / "config.toml").read_text() == before


def test_damaged_archive_contents_and_missing_parent(home, tmp_path):
    dest = tmp_path / "b"
    b = Backups(home, dest)
    full = b.create("full")
    inc = b.create("incremental")
    # an archive rewritten with a changed member and a matching sidecar sha is still caught
    arch = dest / full.archive
    arch.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 100)
    rec = json.loads((dest / f"{full.id}.json").read_text())
    rec["archive_sha256"] = sha(arch)
    (dest / f"{full.id}.json").write_text(json.dumps(rec))
    assert any("forged or altered" in p for p in b.verify(b.get(full.id)))
    (dest / f"{full.id}.json").unlink()
    (dest / full.archive).unlink()
    assert any("gone" in p for p in b.verify(inc))
    with pytest.raises(BackupError):
        b.restore(inc, tmp_path / "elsewhere")
    with pytest.raises(NotFound):
        b.get("llmhost-nope")
    with pytest.raises(BackupError, match="full backup first"):
        Backups(home, tmp_path / "empty").create("incremental")


def test_encrypted_backups(home, tmp_path):
    keyfile = crypto.generate_key_file(tmp_path / "model.key")
    key = crypto.load_key(keyfile)
    dest = tmp_path / "b"
    b = Backups(home, dest, key)
    info = b.create("full")
    assert info.encrypted and info.archive.endswith(".enc")
    # nothing readable in the folder: no SQLite header, no GGUF magic
    for p in dest.rglob("*"):
        if p.is_file() and not p.name.endswith(".json"):
            head = p.read_bytes()[:64]
            assert b"SQLite format" not in head and not head.startswith(b"GGUF"), p
    with pytest.raises(tarfile.TarError), tarfile.open(dest / info.archive):
        pass
    assert b.verify(info) == []
    assert any("key" in p for p in Backups(home, dest).verify(info))
    wrong = Backups(home, dest, os.urandom(32))
    assert wrong.verify(info)
    # the record key comes from the encryption key: no backup.key needed, none made
    assert not (home / "backup.key").exists()
    assert Backups(home, dest, key, record_key_file=tmp_path / "none.key").verify(info) == []
    with pytest.raises(ConfigError):
        Backups(home, dest).restore(info, tmp_path / "h2")
    before = snapshot(home)
    b.restore(info, tmp_path / "h3")
    assert snapshot(tmp_path / "h3") == before


def test_schedule_units(tmp_path):
    units = schedule_units(3, 5, "/usr/bin/llmhost", Path("/srv/llmhost"), Path("/backup"))
    assert "OnCalendar=*-*-* 03:00:00" in units["llmhost-backup.timer"]
    assert "backup prune --keep 5" in units["llmhost-backup.service"]
    assert units["cron"].startswith("0 3 * * * LLMHOST_HOME=/srv/llmhost")
    with pytest.raises(ConfigError):
        schedule_units(24, 5, "x", Path("/h"), Path("/b"))


def test_backups_in_an_s3_bucket(home, tmp_path, s3_server):
    """The same drill against an S3-compatible server (moto): create, incremental, list,
    verify from an empty cache, prune deleting objects, restore into an empty home."""
    import boto3

    env = {**os.environ, **s3_server, "LLMHOST_HOME": str(home)}
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket="llmhost-backups")
    url = "s3://llmhost-backups/site-a"

    def cli(*args, ok=True, home_dir=home):
        p = subprocess.run(
            [sys.executable, "-m", "llmhost", "backup", *args, "--to", url],
            env={**env, "LLMHOST_HOME": str(home_dir)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (p.returncode == 0) == ok, p.stdout + p.stderr
        return p

    ids = [cli("create", "--full").stdout.strip() for _ in range(2)]
    audit(home, 5, user="carol")
    cli("create", "--incremental")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="llmhost-backups")["Contents"]}
    assert all(k.startswith("site-a/") for k in keys)
    blobs = [k for k in keys if "/blobs/" in k]
    assert len(blobs) == len(
        {sha(p) for p in (home / "models").rglob("*") if p.is_file() and p.name != ".manifest.json"}
    )
    assert f"site-a/{ids[0]}.json" in keys
    # a fresh machine: nothing cached locally
    fresh = tmp_path / "fresh-home"
    fresh.mkdir()
    env["LLMHOST_BACKUP_KEY_FILE"] = str(home / "backup.key")  # brought along by the operator
    assert "ok" in cli("verify", home_dir=fresh).stdout
    assert [i["kind"] for i in json.loads(cli("list", "--json", home_dir=fresh).stdout)] == [
        "full",
        "full",
        "incremental",
    ]
    assert f"removed {ids[0]}" in cli("prune", "--keep", "1", home_dir=fresh).stdout
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="llmhost-backups")["Contents"]}
    assert f"site-a/{ids[0]}.json" not in keys and f"site-a/{ids[1]}.json" in keys
    before = snapshot(home)
    target = tmp_path / "restored"
    cli("restore", "--home", str(target), home_dir=fresh)
    assert snapshot(target) == before
    shutil.copy(home / "audit.key", target / "audit.key")  # kept apart, like the backup key
    store = open_store(None, target / "audit.db")
    assert store.count() == 55 and store.verify().ok
    store.close()
    p = subprocess.run(
        [sys.executable, "-m", "llmhost", "backup", "list", "--to", "s3://missing-bucket/x"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr


def forge(dest: Path, info_id: str, edit) -> None:
    path = dest / f"{info_id}.json"
    rec = json.loads(path.read_text())
    edit(rec)
    path.write_text(json.dumps(rec))


def test_a_forged_backup_is_refused_before_anything_is_restored(home, tmp_path):
    """Rewrite an unencrypted backup's archive with an attacker's keys.db (an admin key) and
    fix up every sha256 in its sidecar: without the backup key the record cannot be re-signed,
    so verify reports it and restore installs nothing."""
    dest = tmp_path / "b"
    b = Backups(home, dest)
    real = b.create("full")
    evil = tmp_path / "evil"
    evil.mkdir()
    keys = KeyStore(evil / "keys.db")
    admin_key, _ = keys.create("mallory", role="admin")
    keys.close()
    forged = Backups(evil, tmp_path / "eb", record_key_file=tmp_path / "evil.key").create("full")
    shutil.copy(tmp_path / "eb" / forged.archive, dest / real.archive)

    def fix_up(rec: dict) -> None:
        rec["archive_sha256"] = forged.archive_sha256
        rec["archive_size"] = forged.archive_size
        rec["state"], rec["included"], rec["models"] = forged.state, forged.included, {}

    forge(dest, real.id, fix_up)
    problems = b.verify(b.get(real.id))
    assert problems and "forged or altered" in problems[0]
    target = tmp_path / "victim"
    with pytest.raises(BackupError, match="forged or altered"):
        b.restore(b.get(real.id), target)
    assert not (target / "keys.db").exists()
    # re-signed with the attacker's own key: still not the backup key
    forge(dest, real.id, lambda rec: rec.update(mac=forged.mac))
    assert "forged or altered" in b.verify(b.get(real.id))[0]
    # no signature at all (a record of an older llmhost, or one stripped of it)
    forge(dest, real.id, lambda rec: rec.pop("mac"))
    assert "not signed" in b.verify(b.get(real.id))[0]
    with pytest.raises(BackupError, match="not signed"):
        b.restore(b.get(real.id), target, force=True)
    assert not (target / "keys.db").exists()
    # the backup key itself is never in a backup; without it nothing verifies
    (home / "backup.key").unlink()
    b2 = b.create("full")
    (home / "backup.key").unlink()
    assert "no backup key" in b.verify(b.get(b2.id))[0]
    assert admin_key  # the attacker's key never reached the victim's home


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_backup_and_restored_files_are_owner_only(home, tmp_path, umask):
    old = os.umask(umask)
    try:
        dest = tmp_path / "b" / "nested"
        b = Backups(home, dest)
        info = b.create("full")
        b.create("incremental")
        target = tmp_path / "restored"
        b.restore(b.get(None), target)
    finally:
        os.umask(old)
    for d in (tmp_path / "b", dest, dest / "blobs", dest / "blobs" / "sha256", target):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert any(p.name == info.archive for p in files) and len(files) > 4
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for name in ("keys.db", "audit.db", "audit.head", "config.toml", "backup.key"):
        where = home if name == "backup.key" else target
        assert stat.S_IMODE((where / name).stat().st_mode) == 0o600, name
