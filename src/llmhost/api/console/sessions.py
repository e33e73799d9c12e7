"""Console sessions: a random opaque id (the cookie) mapped in memory to the principal who
logged in, its CSRF token and its expiry. Nothing about the principal travels in the cookie;
logging out, an admin ending it on the sessions page, revoking the API key it logged in with,
or a server restart, ends the session."""

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
    started: float = 0.0
    # names the session on the sessions page (the id itself, the cookie, is never shown)
    handle: str = field(default_factory=lambda: secrets.token_urlsafe(12))
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
        now = self._clock()
        # a credential that ends sooner (a JWT's exp) ends the session with it
        ends = now + self.lifetime_s
        if principal.expires is not None:
            ends = min(ends, principal.expires)
        session = Session(principal, ends, now)
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

    def live(self) -> list[Session]:
        """The sessions not yet ended or expired, newest first."""
        self._sweep()
        return list(reversed(self._live.values()))

    def end_handle(self, handle: str) -> Session | None:
        """Ends the session `handle` names (as the sessions page shows it); None if none."""
        for sid, session in self._live.items():
            if secrets.compare_digest(session.handle.encode(), handle.encode()):
                del self._live[sid]
                return session
        return None

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
