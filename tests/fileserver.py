"""A real HTTP file server on loopback for download tests: single Range requests with If-Range,
strong ETags, per-connection throttling, injected faults (dropped connections, 5xx), counters
of bytes sent, and the two Hugging Face Hub endpoints a pull uses (listing and resolve)."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Behaviour:
    ranges: bool = True
    throttle: float | None = None  # bytes per second per connection
    drop_after: int | None = None  # close the connection after this many body bytes...
    drops: int = 0  # ...on this many responses
    fail_statuses: list[int] = field(default_factory=list)  # answered first, one per request
    chunk: int = 64 << 10


class FileServer:
    def __init__(self, root: Path, behaviour: Behaviour | None = None):
        self.root = Path(root)
        self.behaviour = behaviour or Behaviour()
        self.sent: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.authorization: list[str | None] = []  # each request's Authorization header
        self.hub: dict[str, dict] = {}  # repo id -> {"sha": ..., "files": [rel paths]}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients hang up on purpose
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_repo(self, repo: str, sha: str, folder: str, lfs: set[str]) -> None:
        self.hub[repo] = {"sha": sha, "folder": folder, "lfs": lfs}

    def _repo_listing(self, repo: str) -> dict:
        info = self.hub[repo]
        base = self.root / info["folder"]
        siblings = []
        for p in sorted(base.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(base).as_posix()
            data = p.read_bytes()
            entry = {
                "rfilename": rel,
                "size": len(data),
                "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            }
            if rel in info["lfs"]:
                entry["lfs"] = {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "pointerSize": 134,
                }
            siblings.append(entry)
        return {"id": repo, "modelId": repo, "sha": info["sha"], "siblings": siblings}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET(head=True)

            def do_GET(self, head: bool = False) -> None:
                path = unquote(urlsplit(self.path).path)
                with server.lock:
                    server.requests.append((path, self.headers.get("Range")))
                    server.authorization.append(self.headers.get("Authorization"))
                    fail = server.behaviour.fail_statuses
                    status = fail.pop(0) if fail else None
                if status:
                    self._reply(status, b"injected failure\n")
                    return
                m = re.match(r"^/api/models/(.+?)(?:/revision/([^/]+))?$", path)
                if m and m.group(1) in server.hub:
                    body = json.dumps(server._repo_listing(m.group(1))).encode()
                    self._reply(200, body, "application/json")
                    return
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m and m.group(1) in server.hub:
                    info = server.hub[m.group(1)]
                    path = f"/{info['folder']}/{m.group(3)}"
                file = (server.root / path.lstrip("/")).resolve()
                if not file.is_file() or server.root.resolve() not in file.parents:
                    self._reply(404, b"not found\n")
                    return
                self._send_file(file, path, head)

            def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _send_file(self, file: Path, key: str, head: bool) -> None:
                b = server.behaviour
                st = file.stat()
                size = st.st_size
                etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
                start, end, status = 0, size - 1, 200
                want = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if want and b.ranges and (if_range is None or if_range == etag):
                    m = _RANGE.match(want.strip())
                    if m and (m.group(1) or m.group(2)):
                        if m.group(1):
                            start = int(m.group(1))
                            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                        else:
                            start, end = max(0, size - int(m.group(2))), size - 1
                        if start >= size:
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{size}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        status = 206
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
                if b.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if head:
                    return
                with server.lock:
                    drop = None
                    if b.drops > 0 and b.drop_after is not None and end - start + 1 > b.drop_after:
                        b.drops -= 1
                        drop = b.drop_after
                self._stream(file, key, start, end, drop)

            def _stream(self, file: Path, key: str, start: int, end: int, drop: int | None):
                b = server.behaviour
                t0 = time.monotonic()
                sent = 0
                with file.open("rb") as f:
                    f.seek(start)
                    left = end - start + 1
                    while left > 0:
                        n = min(b.chunk, left)
                        if drop is not None:
                            n = min(n, drop - sent)
                            if n <= 0:
                                self.wfile.flush()
                                self.connection.shutdown(socket.SHUT_RDWR)
                                self.close_connection = True
                                return
                        data = f.read(n)
                        try:
                            self.wfile.write(data)
                        except OSError:
                            return
                        finally:
                            with server.lock:
                                server.sent[key] = server.sent.get(key, 0) + len(data)
                        sent += len(data)
                        left -= len(data)
                        if b.throttle:
                            ahead = sent / b.throttle - (time.monotonic() - t0)
                            if ahead > 0:
                                time.sleep(ahead)

        return Handler


def serve(root: Path, **kw) -> FileServer:
    return FileServer(root, Behaviour(**kw))
