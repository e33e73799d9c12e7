"""Where an encrypted model may be decrypted: only tmpfs or ramfs, told from the mount table
(device number first, so bind mounts and subfolders are judged right), unless disk is allowed."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from llmhost.errors import ConfigError
from llmhost.store import crypto as cr
from llmhost.store import in_memory
from llmhost.store.in_memory import MEMORY_FS, Mount, filesystem_type, read_mountinfo

KEY = bytes(range(32))

MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
25 24 0:23 / /dev/shm rw,relatime shared:5 - tmpfs tmpfs rw,size=24684084k
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw
40 27 254:0 /srv/keys /run/decrypt rw,relatime - ext4 /dev/vda rw
41 27 0:40 / /mnt/my\040ram rw - ramfs none rw
42 27 0:41 / /mnt/ram2 rw - tmpfs none rw
43 42 254:1 / /mnt/ram2/disk rw - xfs /dev/vdb rw
garbage line
"""


@pytest.fixture()
def mounts(tmp_path) -> list[Mount]:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return read_mountinfo(path)


def test_mountinfo_parsing(mounts):
    assert [m.point for m in mounts] == [
        "/proc",
        "/",
        "/dev/shm",
        "/dev/shm",
        "/run/decrypt",
        "/mnt/my ram",
        "/mnt/ram2",
        "/mnt/ram2/disk",
    ]
    assert mounts[5].fstype == "ramfs" and mounts[2].dev == (0, 23)
    assert read_mountinfo(Path("/nonexistent/mountinfo")) == []


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/dev/shm/sub/deeper", "tmpfs"),  # a subfolder, not created: longest prefix
        ("/run/decrypt/x", "ext4"),  # a disk folder bind-mounted under /run
        ("/mnt/my ram/x", "ramfs"),
        ("/mnt/ram2/diskette", "tmpfs"),  # a prefix of the name is not a parent
        ("/mnt/ram2/disk/x", "xfs"),  # a disk mounted inside a tmpfs
        ("/home/user", "ext4"),
    ],
)
def test_filesystem_type_by_mount_point(mounts, path, fstype):
    assert filesystem_type(path, mounts) == fstype


def test_filesystem_type_by_device_beats_the_path(tmp_path, mounts):
    """A tmpfs bind-mounted somewhere (or reached through a symlink) is found by its device
    number whatever the path says; the later of stacked mounts wins."""
    st = os.stat(tmp_path)
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    assert filesystem_type(tmp_path, [*mounts, Mount("/elsewhere", "tmpfs", dev)]) == "tmpfs"
    stacked = [Mount("/elsewhere", "ext4", dev), Mount("/elsewhere", "ramfs", dev)]
    assert filesystem_type(tmp_path, stacked) == "ramfs"
    link = tmp_path / "link"
    link.symlink_to("/dev/shm")
    assert filesystem_type(link, mounts) == filesystem_type("/dev/shm", mounts)


def test_this_machine(tmp_path):
    assert filesystem_type(tmp_path) is not None
    if Path("/dev/shm").is_dir():
        assert filesystem_type("/dev/shm") in MEMORY_FS


def test_a_disk_decrypt_folder_is_refused_unless_allowed(tmp_path):
    if filesystem_type(tmp_path) in MEMORY_FS:
        pytest.skip("the temporary folder is in memory here")
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + secrets.token_bytes(5000))
    e = cr.encrypt_file(src, tmp_path / "m.gguf.enc", KEY, chunk_size=1024)
    disk = tmp_path / "plain"
    disk.mkdir()
    fstype = filesystem_type(disk)
    with (
        pytest.raises(ConfigError, match=rf"{disk} is on {fstype}, not tmpfs"),
        in_memory.decrypted_in_memory(e, KEY, disk),
    ):
        pass
    with (
        pytest.raises(ConfigError, match="LLMHOST_DECRYPT_ALLOW_DISK"),
        in_memory.decrypted_folder_in_memory(tmp_path, KEY, disk),
    ):
        pass
    assert list(disk.iterdir()) == []  # nothing was written before the refusal
    with in_memory.decrypted_in_memory(e, KEY, disk, allow_disk=True) as plain:
        assert plain.read_bytes() == src.read_bytes()
    assert list(disk.iterdir()) == []


def test_is_sealed(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + secrets.token_bytes(100))
    assert not in_memory.is_sealed(src) and not in_memory.is_sealed(tmp_path)
    e = cr.encrypt_file(src, tmp_path / "m.gguf.enc", KEY)
    assert in_memory.is_sealed(e) and in_memory.is_sealed(tmp_path)
    assert not in_memory.is_sealed(tmp_path / "missing")
