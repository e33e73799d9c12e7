"""Backup folders kept in an S3-compatible bucket, and the schedule of daily backups."""

from __future__ import annotations

import os
from pathlib import Path

from llmhost.errors import BackupError, ConfigError
from llmhost.files import PRIVATE_FILE, private_dir
from llmhost.store.names import safe_join


class S3Remote:
    """A backup folder kept in an S3-compatible bucket (`s3://bucket/prefix`); a local folder
    caches what is read and stages what is written."""

    def __init__(self, url: str, env: dict[str, str]):
        from llmhost.store.sources import s3_client

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError(f"{url}: s3://BUCKET[/PREFIX]")
        self.bucket, self.prefix = bucket, (prefix.strip("/") + "/") if prefix.strip("/") else ""
        self.s3 = s3_client(env)

    def list_keys(self, under: str = "") -> set[str]:
        out = set()
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + under
        )
        try:
            for page in pages:
                out |= {o["Key"][len(self.prefix) :] for o in page.get("Contents", [])}
        except Exception as exc:  # botocore's errors: no such bucket, denied, unreachable
            raise BackupError(f"s3://{self.bucket}/{self.prefix}: {exc}") from exc
        return out

    def pull(self, local: Path, names: set[str] | list[str]) -> None:
        for name in names:
            target = safe_join(local, name)
            if target.exists():
                continue
            private_dir(target.parent)
            tmp = target.with_name(f".{target.name}.part")
            try:
                self.s3.download_file(self.bucket, self.prefix + name, str(tmp))
                os.chmod(tmp, PRIVATE_FILE)
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                raise BackupError(f"cannot fetch {name} from s3://{self.bucket}: {exc}") from exc
            os.replace(tmp, target)

    def push(self, local: Path, paths: list[Path]) -> None:
        for p in paths:
            name = p.relative_to(local).as_posix()
            try:
                self.s3.upload_file(str(p), self.bucket, self.prefix + name)
            except Exception as exc:
                raise BackupError(f"cannot upload {name} to s3://{self.bucket}: {exc}") from exc

    def delete(self, names: set[str]) -> None:
        for name in sorted(names):
            self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def sync_records(self, local: Path) -> None:
        """Make the local folder's backup records those of the bucket."""
        remote = {k for k in self.list_keys() if k.startswith("llmhost-") and k.endswith(".json")}
        private_dir(local)
        for stale in local.glob("llmhost-*.json"):
            if stale.name not in remote:
                stale.unlink()
        self.pull(local, remote)


def schedule_units(hour: int, keep: int, exe: str, home: Path, dest: Path | str) -> dict[str, str]:
    """A systemd service + timer: a full backup daily at `hour`, then prune."""
    if not 0 <= hour <= 23:
        raise ConfigError("--hour is 0..23")
    env = f"Environment=LLMHOST_HOME={home}\n"
    service = (
        "[Unit]\nDescription=llmhost backup\n\n[Service]\nType=oneshot\n"
        + env
        + f"ExecStart={exe} backup create --full --to {dest}\n"
        + f"ExecStartPost={exe} backup prune --keep {keep} --to {dest}\n"
    )
    timer = (
        "[Unit]\nDescription=Daily llmhost backup\n\n[Timer]\n"
        f"OnCalendar=*-*-* {hour:02d}:00:00\nPersistent=true\nRandomizedDelaySec=300\n\n"
        "[Install]\nWantedBy=timers.target\n"
    )
    cron = (
        f"0 {hour} * * * LLMHOST_HOME={home} {exe} backup create --full --to {dest} && "
        f"{exe} backup prune --keep {keep} --to {dest}"
    )
    return {"llmhost-backup.service": service, "llmhost-backup.timer": timer, "cron": cron}
