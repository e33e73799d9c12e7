"""Model references (`name:tag`) and paths from users or remote listings, validated so that
nothing can escape the models folder: no `..`, absolute paths, backslashes, NUL or control
characters, and every joined path is checked to resolve inside its root."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llmhost.errors import InvalidRequest

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"^{_PART}(/{_PART})?$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DEFAULT_TAG = "latest"


@dataclass(frozen=True, order=True)
class ModelRef:
    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_ref(text: str) -> ModelRef:
    """`name[:tag]`, where name may carry one namespace (`org/model`)."""
    if not isinstance(text, str) or _CONTROL.search(text):
        raise InvalidRequest(f"invalid model name {text!r}: control characters")
    name, sep, tag = text.partition(":")
    tag = tag if sep else DEFAULT_TAG
    if not _NAME.match(name) or ".." in name:
        raise InvalidRequest(
            f"invalid model name {name!r}: use letters, digits, '.', '_', '-' and at most one "
            "'/' (no '..', no leading '.' or '-')"
        )
    if not _TAG.match(tag) or ".." in tag:
        raise InvalidRequest(f"invalid tag {tag!r}: use letters, digits, '.', '_', '-'")
    return ModelRef(name, tag)


def safe_relpath(text: str) -> PurePosixPath:
    """A relative file path from a remote listing, refused if it could leave its folder."""
    if not text or _CONTROL.search(text) or "\\" in text:
        raise InvalidRequest(f"unsafe file path {text!r}")
    p = PurePosixPath(text)
    if p.is_absolute() or any(part in ("", ".", "..") for part in text.split("/")):
        raise InvalidRequest(f"unsafe file path {text!r}")
    return p


def safe_join(root: Path, *parts: str | PurePosixPath) -> Path:
    """`root/parts…`, guaranteed (after resolving symlinks) to lie inside `root`."""
    rel = PurePosixPath(*[safe_relpath(str(p)) for p in parts]) if parts else PurePosixPath()
    base = root.resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise InvalidRequest(f"path {str(rel)!r} resolves outside {root}")
    return target
