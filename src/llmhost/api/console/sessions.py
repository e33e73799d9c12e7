"""Console sessions: a random opaque id (the cookie) mapped in memory to the principal who
logged in, its CSRF token and its expiry. Nothing about the principal travels in the cookie;
logging out, or a server restart, ends the session."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from llmhost.security.auth import Principal

SESSION_COOKIE = "llmhost_console"
LOGIN_COOKIE = "llmhost_console_login"  # the login form's CSRF token, before any session
COOKIE_PATH = "/console"  # the browser never sends either cookie to /v1
MAX_SESSIONS = 1024  # past this the oldest session is ended to make room
MAX_ID_CHARS = 64  # a cookie longer than any id we hand out is not looked up


@dataclass
class Session:
    principal: Principal
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    flash: str | None = None  # one message shown on the next page (a refused unload, say)
    secret: str | None = None  # a new key's secret: shown once, on the next keys page

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class Sessions:
    """The live sessions of one app, oldest first, at most `MAX_SESSIONS`."""

    def __init__(self, lifetime_s: float, clock: Callable[[], float] = time.time) -> None:
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._live: OrderedDict[str, Session] = OrderedDict()

    def start(self, principal: Principal) -> tuple[str, Session]:
        """A new session for `principal`: its id (the cookie's value) and the session."""
        self._sweep()
        while len(self._live) >= MAX_SESSIONS:
            self._live.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        session = Session(principal, self._clock() + self.lifetime_s)
        self._live[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session `sid` names, or None (unknown, ended or expired)."""
        if not sid or len(sid) > MAX_ID_CHARS:
            return None
        session = self._live.get(sid)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._live[sid]
            return None
        return session

    def end(self, sid: str | None) -> None:
        if sid:
            self._live.pop(sid, None)

    def _sweep(self) -> None:
        """Ends expired sessions, oldest first (the order is the order of expiry)."""
        now = self._clock()
        while self._live:
            sid, session = next(iter(self._live.items()))
            if session.expires > now:
                break
            del self._live[sid]

    def __len__(self) -> int:
        return len(self._live)
