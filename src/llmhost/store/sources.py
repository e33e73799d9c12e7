"""What `llmhost pull SOURCE` can fetch from, each turned into a list of files to download with
the sizes and checksums the source publishes:

- `https://host/path/model.gguf` — one file (`--sha256` to pin it);
- a local list file in aria2's input-file format (a URL per line, indented `out=`,
  `checksum=sha-256=…|md5=…`, `header=` and `size=` options below it);
- `s3://bucket/prefix` — every object under the prefix of an S3-compatible store (boto3),
  fetched through presigned URLs; MD5 from the ETag where it is one, SHA-256 where stored;
- `org/repo` — a Hugging Face repository at a revision (huggingface_hub lists the files with
  their LFS sha256 and git blob ids; the bytes come through our own downloader).
"""

from __future__ import annotations

import base64
import fnmatch
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from llmhost.errors import (
    ConfigError,
    DownloadError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from llmhost.store.download import RemoteFile
from llmhost.store.manifest import MANIFEST_NAME
from llmhost.store.names import safe_relpath

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass
class Resolved:
    source: str
    default_name: str
    files: list[RemoteFile]
    revision: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class SourceOptions:
    revision: str | None = None
    include: Sequence[str] = ()
    sha256: str | None = None
    allow_pickle: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


def default_name(text: str) -> str:
    """A model name from a file name or repo id: lower case, safe characters only."""
    stem = PurePosixPath(text.rstrip("/")).name if "/" not in text or "://" in text else text
    for ext in (".gguf", ".safetensors", ".bin", ".txt", ".list"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    parts = [re.sub(r"[^a-z0-9._-]+", "-", p.lower()).strip(".-_")[:128] for p in stem.split("/")]
    name = "/".join(p for p in parts[:2] if p)
    return name or "model"


def _checked_path(path: str) -> str:
    rel = str(safe_relpath(path))
    if PurePosixPath(rel).name == MANIFEST_NAME or rel.endswith((".part", ".part.json")):
        raise InvalidRequest(f"unsafe file path {path!r}: the name is reserved")
    return rel


def _sha256_arg(value: str | None) -> str | None:
    if value is not None and not _HEX64.match(value):
        raise ConfigError("--sha256 takes 64 hex digits")
    return value.lower() if value else None


# --- plain URLs ----------------------------------------------------------------------------


def _from_url(source: str, opts: SourceOptions) -> Resolved:
    path = unquote(urlsplit(source).path).rstrip("/").rsplit("/", 1)[-1]
    if not path:
        raise ConfigError(f"{source} names no file; give the URL of a file")
    rf = RemoteFile(source, _checked_path(path), sha256=_sha256_arg(opts.sha256))
    return Resolved(source.split("?", 1)[0], default_name(path), [rf])


def parse_url_list(text: str, origin: str = "list") -> list[RemoteFile]:
    """aria2's input-file format: URL lines, each followed by indented `key=value` options."""
    files: list[RemoteFile] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            url = line.split()[0]
            if urlsplit(url).scheme not in ("http", "https"):
                raise ConfigError(f"{origin}:{n}: not an http(s) URL: {url}")
            path = unquote(urlsplit(url).path).rstrip("/").rsplit("/", 1)[-1]
            files.append(RemoteFile(url, path))
            continue
        if not files:
            raise ConfigError(f"{origin}:{n}: an option line before any URL")
        key, sep, value = line.strip().partition("=")
        rf = files[-1]
        if not sep:
            raise ConfigError(f"{origin}:{n}: expected key=value, got {line.strip()!r}")
        if key == "out":
            rf.path = value
        elif key == "checksum":
            algo, _, digest = value.partition("=")
            algo = algo.lower().replace("-", "")
            if algo == "sha256" and _HEX64.match(digest):
                rf.sha256 = digest.lower()
            elif algo == "md5" and _HEX32.match(digest):
                rf.md5 = digest.lower()
            else:
                raise ConfigError(
                    f"{origin}:{n}: checksum must be sha-256=<64 hex> or md5=<32 hex>"
                )
        elif key == "header":
            name, _, hval = value.partition(":")
            rf.headers[name.strip()] = hval.strip()
        elif key == "size":
            if not value.isdigit():
                raise ConfigError(f"{origin}:{n}: size must be a whole number of bytes")
            rf.size = int(value)
        else:
            raise ConfigError(f"{origin}:{n}: unknown option {key!r} (out, checksum, header, size)")
    if not files:
        raise ConfigError(f"{origin} lists no URL")
    for rf in files:
        if not rf.path:
            raise ConfigError(f"{origin}: {rf.url} names no file; add an out= line")
        rf.path = _checked_path(rf.path)
    seen: set[str] = set()
    for rf in files:
        if rf.path in seen:
            raise ConfigError(f"{origin}: two URLs write {rf.path}; set out= on one of them")
        seen.add(rf.path)
    return files


def _from_list(source: str, opts: SourceOptions) -> Resolved:
    path = Path(source)
    files = parse_url_list(path.read_text(), path.name)
    return Resolved(str(path.resolve()), default_name(path.name), files)


# --- S3-compatible stores ------------------------------------------------------------------


def s3_client(env: Mapping[str, str]):
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise ConfigError("s3:// sources need boto3: pip install 'llmhost[s3]'") from exc
    endpoint = env.get("LLMHOST_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
        config=Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"}),
    )


def _from_s3(source: str, opts: SourceOptions) -> Resolved:
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(source)
    bucket, prefix = parts.netloc, parts.path.lstrip("/")
    if not bucket:
        raise ConfigError(f"{source}: expected s3://bucket/prefix")
    client = s3_client(opts.env)
    try:
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects.extend(page.get("Contents", []))
        files = []
        for obj in objects:
            key = obj["Key"]
            if key.endswith("/"):
                continue
            if key == prefix:
                rel = key.rsplit("/", 1)[-1]
            else:
                base = prefix if prefix.endswith("/") or not prefix else prefix + "/"
                if not key.startswith(base):
                    continue  # `models/a` must not pick up `models/ab/...`
                rel = key[len(base) :]
            if not _matches(rel, opts):
                continue
            head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            etag = head.get("ETag", "").strip('"')
            kms = head.get("ServerSideEncryption") == "aws:kms"
            sha = head.get("ChecksumSHA256")
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=12 * 3600
            )
            files.append(
                RemoteFile(
                    url,
                    _checked_path(rel),
                    size=int(obj["Size"]),
                    # A single-part upload's ETag is its MD5 (not under SSE-KMS).
                    md5=etag.lower() if _HEX32.match(etag) and not kms else None,
                    sha256=base64.b64decode(sha).hex() if sha and "-" not in sha else None,
                )
            )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404", "NoSuchKey"):
            raise NotFound(f"{source}: no such bucket or key") from exc
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionDenied(f"{source}: access denied ({code}); check the keys") from exc
        raise DownloadError(f"{source}: {exc}") from exc
    except BotoCoreError as exc:
        raise DownloadError(f"{source}: {exc}") from exc
    if not files:
        raise NotFound(f"{source}: no objects under this prefix")
    name = default_name(prefix.rstrip("/").rsplit("/", 1)[-1] or bucket)
    return Resolved(f"s3://{bucket}/{prefix}", name, files)


# --- Hugging Face Hub ---------------------------------------------------------------------


_LOG_IN = "log in with `hf auth login` or set HF_TOKEN"


def _from_hf(source: str, opts: SourceOptions) -> Resolved:
    try:
        from huggingface_hub import HfApi, hf_hub_url
        from huggingface_hub import errors as hf_errors
        from huggingface_hub.utils import build_hf_headers
    except ImportError as exc:
        raise ConfigError("Hugging Face sources need huggingface_hub") from exc
    env = opts.env
    endpoint = (env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    # A token in the given environment is used as is; without one, None lets huggingface_hub
    # find one as its own CLI does (HF_TOKEN, then the token `hf auth login` saved).
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(source, revision=opts.revision, files_metadata=True)
    except hf_errors.GatedRepoError as exc:
        raise PermissionDenied(f"{source} is gated: accept its licence, then {_LOG_IN}") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise NotFound(f"{source}: no such repository (or it is private: {_LOG_IN})") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise NotFound(f"{source}: no revision {opts.revision!r}") from exc
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 404:
            raise NotFound(f"{source}: no such repository (HTTP 404)") from exc
        if status in (401, 403):
            raise PermissionDenied(f"{source}: access denied (HTTP {status}); {_LOG_IN}") from exc
        raise DownloadError(f"{source}: cannot list the repository: {exc}") from exc
    except Exception as exc:  # network errors come from whichever HTTP library it uses
        raise DownloadError(f"{source}: cannot list the repository: {exc}") from exc
    siblings = [s for s in info.siblings or [] if s.rfilename != ".gitattributes"]
    names = [s.rfilename for s in siblings]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    notes = []
    chosen = []
    for s in siblings:
        name = s.rfilename
        if not _matches(name, opts):
            continue
        if name.endswith(PICKLE_SUFFIXES) and has_safetensors and not opts.include:
            notes.append(f"skipped {name}: pickle weights, the safetensors files hold the same")
            continue
        chosen.append(s)
    ggufs = [s.rfilename for s in chosen if s.rfilename.endswith(".gguf")]
    if len(ggufs) > 1 and not opts.include:
        listing = "\n  ".join(ggufs)
        raise ConfigError(
            f"{source} holds {len(ggufs)} GGUF files; choose one with --include, e.g. "
            f"--include '*Q4_K_M.gguf':\n  {listing}"
        )
    if not chosen:
        raise NotFound(f"{source}: no files match --include {' '.join(opts.include)}")
    headers = build_hf_headers(token=token, library_name="llmhost")
    files = []
    for s in chosen:
        lfs = s.lfs
        files.append(
            RemoteFile(
                hf_hub_url(source, s.rfilename, revision=info.sha, endpoint=endpoint),
                _checked_path(s.rfilename),
                size=s.size,
                sha256=getattr(lfs, "sha256", None) if lfs else None,
                git_sha1=None if lfs else s.blob_id,
                headers=dict(headers),
            )
        )
    return Resolved(f"hf://{source}", default_name(source), files, info.sha, notes)


def _matches(path: str, opts: SourceOptions) -> bool:
    return not opts.include or any(fnmatch.fnmatch(path, pat) for pat in opts.include)


def _kind(source: str) -> str:
    scheme = urlsplit(source).scheme
    if scheme in ("http", "https", "s3"):
        return scheme.replace("https", "http")
    if Path(source).is_file():
        return "list"
    if _HF_REPO.match(source):
        return "hf"
    raise ConfigError(
        f"cannot tell what {source!r} is: give an http(s) URL, s3://bucket/prefix, a Hugging "
        "Face repo id (org/name) or a file listing URLs"
    )


RESOLVERS: dict[str, Callable[[str, SourceOptions], Resolved]] = {
    "http": _from_url,
    "list": _from_list,
    "s3": _from_s3,
    "hf": _from_hf,
}


def resolve(source: str, opts: SourceOptions | None = None) -> Resolved:
    opts = opts or SourceOptions()
    kind = _kind(source)
    if opts.sha256 and kind != "http":
        raise ConfigError("--sha256 applies to a single URL; a list file has checksum= lines")
    return RESOLVERS[kind](source, opts)
