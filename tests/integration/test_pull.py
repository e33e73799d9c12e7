"""Downloads and pulls against a real HTTP server on loopback: parallel ranges, resume after
dropped connections and after an interrupt, servers without Range, 404/5xx, checksums, disk
space, unsafe paths; Hugging Face (a local stand-in for the Hub API) and S3 (moto's server)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from llmhost.errors import (
    ConfigError,
    DownloadError,
    InsufficientStorage,
    IntegrityError,
    InvalidRequest,
    NotFound,
)
from llmhost.store.download import Downloader, RemoteFile
from llmhost.store.pull import pull
from llmhost.store.registry import ModelStore
from llmhost.store.sources import SourceOptions
from llmhost.store.verify import verify_folder
from tests.fileserver import serve

MB = 1 << 20


@pytest.fixture()
def blob(tmp_path) -> tuple[Path, bytes, str]:
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(6 * MB + 12345)
    (root / "weights.bin").write_bytes(data)
    return root, data, hashlib.sha256(data).hexdigest()


def fetch(url: str, out: Path, **kw) -> tuple:
    sha = kw.pop("sha", None)
    opts = {"connections": 4, "min_segment": 256 << 10, "backoff": 0.01, **kw}
    with Downloader(**opts) as dl:
        return dl.fetch(RemoteFile(url, out.name, sha256=sha), out)


def test_parallel_ranges_checked_and_complete(blob, tmp_path):
    root, data, sha = blob
    with serve(root) as srv:
        r = fetch(srv.url + "/weights.bin", tmp_path / "out" / "w.bin")
        ranges = [rng for path, rng in srv.requests if rng and rng != "bytes=0-0"]
    assert r.sha256 == sha and r.size == len(data)
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
    assert len(ranges) >= 4, ranges
    assert not list((tmp_path / "out").glob("*.part*"))


def test_resume_after_dropped_connections_fetches_each_byte_once(blob, tmp_path):
    root, data, sha = blob
    with serve(root, drop_after=200_000, drops=6, throttle=16 * MB) as srv:
        r = fetch(srv.url + "/weights.bin", tmp_path / "w.bin")
        sent = srv.sent["/weights.bin"]
    assert r.sha256 == sha
    # every byte the server wrote before a drop was kept: only the 1-byte probe is extra,
    # plus at most a chunk or two in flight on each stream whose range was split for another
    assert sent <= len(data) + 1 + 8 * (64 << 10), sent


def test_server_without_range_support_uses_one_stream(blob, tmp_path):
    root, _, sha = blob
    with serve(root, ranges=False) as srv:
        r = fetch(srv.url + "/weights.bin", tmp_path / "w.bin")
        full = [rng for _, rng in srv.requests if rng is None]
    assert r.sha256 == sha and len(full) == 1


def test_transient_5xx_is_retried_and_persistent_5xx_fails(blob, tmp_path):
    root, _, sha = blob
    with serve(root, fail_statuses=[503, 502, 500]) as srv:
        assert fetch(srv.url + "/weights.bin", tmp_path / "a.bin").sha256 == sha
    with serve(root, fail_statuses=[500] * 50) as srv, pytest.raises(DownloadError, match="500"):
        fetch(srv.url + "/weights.bin", tmp_path / "b.bin", retries=2)


def test_404_is_not_found(blob, tmp_path):
    root, _, _ = blob
    with serve(root) as srv, pytest.raises(NotFound, match="404"):
        fetch(srv.url + "/nope.bin", tmp_path / "x.bin")


def test_interrupted_download_resumes_where_it_stopped(blob, tmp_path):
    root, data, sha = blob
    out = tmp_path / "w.bin"

    class StopHalfway:
        seen = 0

        def file_started(self, path, total, done):
            pass

        def advance(self, path, n):
            self.seen += n
            if self.seen > len(data) // 2:
                stop.set()

        def file_done(self, path):
            pass

    stop = threading.Event()
    with serve(root, throttle=8 * MB) as srv:
        with pytest.raises(KeyboardInterrupt):
            fetch(srv.url + "/weights.bin", out, progress=StopHalfway(), stop=stop)
        assert out.with_name("w.bin.part").exists() and not out.exists()
        state = json.loads(out.with_name("w.bin.part.json").read_text())
        kept = sum(done for _, _, done in state["segments"])
        first = srv.sent["/weights.bin"]
        r = fetch(srv.url + "/weights.bin", out)
        second = srv.sent["/weights.bin"] - first
    assert r.sha256 == sha and out.read_bytes() == data
    assert kept >= len(data) // 3, kept  # the interrupt saved what had arrived
    assert second <= len(data) - kept + 1 + 8 * (64 << 10), (kept, second)


def test_changed_remote_file_restarts_instead_of_mixing(blob, tmp_path):
    root, data, _ = blob
    out = tmp_path / "w.bin"
    stop = threading.Event()

    class StopSoon:
        def file_started(self, *a):
            pass

        def advance(self, path, n):
            stop.set()

        def file_done(self, path):
            pass

    with serve(root, throttle=4 * MB) as srv:
        with pytest.raises(KeyboardInterrupt):
            fetch(srv.url + "/weights.bin", out, progress=StopSoon(), stop=stop)
        new = os.urandom(len(data))
        (root / "weights.bin").write_bytes(new)
        os.utime(root / "weights.bin", ns=(1, 10**18))
        r = fetch(srv.url + "/weights.bin", out)
    assert r.sha256 == hashlib.sha256(new).hexdigest() and out.read_bytes() == new


# --- pull into the store -----------------------------------------------------------------


def test_pull_url_registers_verified_model(tiny_model, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(tiny_model.gguf, root / "tiny.gguf")
    sha = hashlib.sha256(tiny_model.gguf.read_bytes()).hexdigest()
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv:
        m = pull(store, srv.url + "/tiny.gguf", opts=SourceOptions(sha256=sha))
    assert (m.ref, m.format) == ("tiny:latest", "gguf")
    assert m.files[0].sha256 == sha
    assert [x.ref for x in store.list()] == ["tiny:latest"]
    folder = store.resolve("tiny:latest")
    assert verify_folder(folder, store.get("tiny")).ok
    assert not list(store.partials())


def test_wrong_checksum_registers_nothing(tiny_model, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(tiny_model.gguf, root / "tiny.gguf")
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv, pytest.raises(IntegrityError, match="sha256"):
        pull(store, srv.url + "/tiny.gguf", opts=SourceOptions(sha256="0" * 64))
    assert store.list() == [] and not (tmp_path / "models" / "tiny").exists()


def test_disk_space_shortfall_stops_before_downloading(blob, tmp_path):
    root, _, _ = blob
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv:
        with pytest.raises(InsufficientStorage, match="GB"):
            pull(store, srv.url + "/weights.bin", free_space=lambda p: 1 * MB)
        assert srv.sent.get("/weights.bin", 0) <= 1  # only the probe's byte
    assert store.list() == []


def test_url_list_with_checksums_and_unsafe_names(blob, tmp_path):
    root, _, sha = blob
    (root / "notes.json").write_text("{}")
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv:
        good = tmp_path / "good.txt"
        good.write_text(
            f"# aria2 input file\n{srv.url}/weights.bin\n  out=sub/w.gguf.enc\n"
            f"  checksum=sha-256={sha}\n{srv.url}/notes.json\n"
        )
        m = pull(store, str(good), name="listed:v1", min_segment=256 << 10)
        assert {f.path for f in m.files} == {"sub/w.gguf.enc", "notes.json"}
        for evil in ("../evil", "/etc/passwd", "a/../../b", "x\x1by", ".manifest.json"):
            bad = tmp_path / "bad.txt"
            bad.write_text(f"{srv.url}/weights.bin\n  out={evil}\n")
            with pytest.raises(InvalidRequest):
                pull(store, str(bad), name="evil")
        with pytest.raises(InvalidRequest):
            pull(store, srv.url + "/weights.bin", name="../../escape")
    assert [x.ref for x in store.list()] == ["listed:v1"]


def test_existing_name_needs_force(tiny_model, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(tiny_model.gguf, root / "tiny.gguf")
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv:
        pull(store, srv.url + "/tiny.gguf")
        with pytest.raises(ConfigError, match="--force"):
            pull(store, srv.url + "/tiny.gguf")
        assert pull(store, srv.url + "/tiny.gguf", force=True).ref == "tiny:latest"


def test_pickle_weights_refused_unless_allowed(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv:
        with pytest.raises(IntegrityError, match="pickle"):
            pull(store, srv.url + "/pytorch_model.bin")
        assert store.list() == []
        m = pull(store, srv.url + "/pytorch_model.bin", opts=SourceOptions(allow_pickle=True))
    assert m.ref == "pytorch_model:latest"


# --- Hugging Face ----------------------------------------------------------------------------


def test_pull_hugging_face_repo_checks_lfs_sha256_and_blob_ids(tiny_model, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(tiny_model.hf_dir, root / "repo")
    (root / "repo" / "pytorch_model.bin").write_bytes(b"pickle, skipped")
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv:
        srv.add_repo("acme/tiny", "c0ffee" * 6 + "abcd", "repo", lfs={"model.safetensors"})
        opts = SourceOptions(env={"HF_ENDPOINT": srv.url}, revision="main")
        m = pull(store, "acme/tiny", opts=opts, min_segment=64 << 10)
    assert (m.ref, m.format, m.revision) == ("acme/tiny:latest", "hf", "c0ffee" * 6 + "abcd")
    paths = {f.path for f in m.files}
    assert {"config.json", "model.safetensors"} <= paths and "pytorch_model.bin" not in paths
    assert verify_folder(store.resolve("acme/tiny"), m).ok


def test_hugging_face_token_saved_by_hf_auth_login_is_sent(tiny_model, tmp_path, monkeypatch):
    """No HF_TOKEN: the token `hf auth login` saved goes with the listing and the downloads;
    an HF_TOKEN given wins over it."""
    import huggingface_hub.constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    saved = tmp_path / "hf-home" / "token"
    saved.parent.mkdir()
    saved.write_text("hf_saved_by_login\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(saved))
    root = tmp_path / "www"
    shutil.copytree(tiny_model.hf_dir, root / "repo")
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv:
        srv.add_repo("acme/tiny", "1" * 40, "repo", lfs={"model.safetensors"})
        pull(store, "acme/tiny", opts=SourceOptions(env={"HF_ENDPOINT": srv.url}))
        assert len(srv.authorization) > 1
        assert set(srv.authorization) == {"Bearer hf_saved_by_login"}
        srv.authorization.clear()
        env = {"HF_ENDPOINT": srv.url, "HF_TOKEN": "hf_from_env"}
        pull(store, "acme/tiny", name="again", opts=SourceOptions(env=env))
        assert set(srv.authorization) == {"Bearer hf_from_env"}


def test_hugging_face_listing_with_unsafe_path_is_refused(tmp_path):
    root = tmp_path / "www"
    (root / "repo").mkdir(parents=True)
    (root / "repo" / "config.json").write_text("{}")
    store = ModelStore(tmp_path / "models")
    with serve(root) as srv:
        srv.add_repo("acme/evil", "1" * 40, "repo", lfs=set())
        real = srv._repo_listing

        def listing(repo):
            data = real(repo)
            data["siblings"][0]["rfilename"] = "../../outside.json"
            return data

        srv._repo_listing = listing
        with pytest.raises(InvalidRequest):
            pull(store, "acme/evil", opts=SourceOptions(env={"HF_ENDPOINT": srv.url}))
        with pytest.raises(NotFound):
            pull(store, "acme/missing", opts=SourceOptions(env={"HF_ENDPOINT": srv.url}))
    assert not (tmp_path / "outside.json").exists()


# --- S3 ----------------------------------------------------------------------------------------


def test_pull_from_s3_compatible_store(s3_server, tiny_model, tmp_path):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server["AWS_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="models")
    for p in tiny_model.hf_dir.iterdir():
        s3.upload_file(str(p), "models", f"tiny-hf/{p.name}")
    s3.put_object(Bucket="models", Key="tiny-hf-other/x", Body=b"not under the prefix")
    store = ModelStore(tmp_path / "models")
    m = pull(store, "s3://models/tiny-hf", opts=SourceOptions(env=s3_server))
    assert m.ref == "tiny-hf:latest" and m.format == "hf"
    assert {f.path for f in m.files} == {p.name for p in tiny_model.hf_dir.iterdir()}
    assert all(f.md5 for f in m.files)  # single-part uploads: the ETag is the MD5
    assert verify_folder(store.resolve("tiny-hf"), m).ok
    with pytest.raises(NotFound):
        pull(store, "s3://models/absent/", opts=SourceOptions(env=s3_server))
