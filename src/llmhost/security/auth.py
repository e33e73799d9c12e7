"""Who is calling: a Bearer token that is either an llmhost API key or a JWT, turned into a
Principal (user id, role, limits) or an AuthenticationError with a clear reason.

API keys look like `llmh_<id>_<secret>`; only the sha256 of the secret is stored (in
`keys.db`), and the key is shown once, at creation or rotation. Rotating a key gives it a new
secret and keeps the one it replaces valid for a grace period, so clients can move over. A
key's secret has 256 bits of entropy, so a plain hash suffices: there is nothing to
brute-force. JWTs are checked by PyJWT with the algorithm pinned by configuration (never taken
from the token's header), signature, `exp` (required), `nbf`, `iat`, `aud` and `iss`, with a
small leeway for clock skew."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmhost.errors import AuthenticationError, ConfigError, NotFound
from llmhost.files import private_sqlite
from llmhost.security.quota import NO_QUOTA, Quota

if TYPE_CHECKING:
    from llmhost.config import Settings

Role = Literal["user", "admin"]
KEY_PREFIX = "llmh_"


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: Role = "user"
    rpm: int | None = None  # requests per minute; None = the server's default
    tpm: int | None = None  # tokens per minute
    via: str = "none"  # api_key, jwt or none
    key_id: str | None = None
    models: tuple[str, ...] | None = None  # the models it may use; None: all
    quota: Quota = NO_QUOTA  # the key's own quotas (tokens/day, tokens/month, requests/day)
    expires: float | None = None  # Unix time the credential stops being valid (a JWT's exp)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def allows(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


ANONYMOUS = Principal("anonymous", "admin", via="none")


# --- API keys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    user_id: str
    role: Role
    created: float
    expires: float | None
    revoked: float | None
    rpm: int | None
    tpm: int | None
    models: tuple[str, ...] | None = None  # the models the key may use; None: all
    quota: Quota = NO_QUOTA
    rotated: float | None = None  # when its secret was last replaced
    old_secret_until: float | None = None  # when the secret replaced last stops working

    def in_grace(self, now: float | None = None) -> bool:
        """Whether the secret replaced by the last rotation still works."""
        now = time.time() if now is None else now
        return self.old_secret_until is not None and self.old_secret_until > now

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked:
            return "revoked"
        if self.expires is not None and self.expires <= now:
            return "expired"
        return "active"


_KEY_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    rpm INTEGER,
    tpm INTEGER,
    models TEXT
);
CREATE INDEX IF NOT EXISTS api_keys_created ON api_keys (created);
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user_id, created);
"""
_KEY_COLS = "key_id, user_id, role, created, expires, revoked, rpm, tpm, models"
# Quota columns, added in place to a keys.db from before quotas (NULL: no quota)
_QUOTA_COLS = ("tokens_per_day", "tokens_per_month", "requests_per_day")
_KEY_COLS += ", " + ", ".join(_QUOTA_COLS)
# Added in place to a keys.db from before rotation: the replaced secret's digest and its end.
_ROTATION_COLUMNS = {"old_sha256": "TEXT", "old_until": "REAL", "rotated": "REAL"}
_KEY_COLS += ", rotated, old_until"
MAX_KEY_MODELS = 256
MAX_GRACE_SECONDS = 30 * 86400.0


def _info(row: Sequence[Any]) -> KeyInfo:
    key_id, user_id, role, created, expires, revoked, rpm, tpm, models = row[:9]
    rotated, until = row[12:14]
    return KeyInfo(
        key_id,
        user_id,
        role,
        created,
        expires,
        revoked,
        rpm,
        tpm,
        models=None if models is None else tuple(json.loads(models)),
        quota=Quota(*row[9:12]),
        rotated=rotated,
        old_secret_until=until,
    )


def check_models(models: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    if models is None:
        return None
    found = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not found or len(found) > MAX_KEY_MODELS or any(len(m) > 256 for m in found):
        raise ConfigError(f"a key's models are 1 to {MAX_KEY_MODELS} model ids")
    return found


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Rotation:
    key: str  # the key with its new secret: the only copy
    info: KeyInfo
    cut_short: bool  # a secret still in the grace of an earlier rotation stopped working


class KeyStore:
    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._clock = clock
        private_sqlite(self.path)  # SQLite gives -wal and -shm the database file's mode
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_KEY_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}
        if "models" not in columns:  # a keys.db from before per-key models
            self._db.execute("ALTER TABLE api_keys ADD COLUMN models TEXT")
        for column in _QUOTA_COLS:
            if column not in columns:  # a keys.db from before quotas
                self._db.execute(f"ALTER TABLE api_keys ADD COLUMN {column} INTEGER")
        for name, kind in _ROTATION_COLUMNS.items():  # a keys.db from before rotation
            if name not in columns:
                self._db.execute(f"ALTER TABLE api_keys ADD COLUMN {name} {kind}")
        # Rows by key id, valid while the database is unchanged: `PRAGMA data_version` moves
        # whenever another connection (`llmhost keys revoke` in another process) commits.
        self._rows: dict[str, tuple[Any, ...] | None] = {}
        self._version = -1

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(
        self,
        user_id: str,
        role: Role = "user",
        *,
        expires_in: float | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        models: list[str] | tuple[str, ...] | None = None,
        quota: Quota = NO_QUOTA,
    ) -> tuple[str, KeyInfo]:
        """A new key; the returned text is the only copy of its secret. With `models`, it
        may use only those models; `quota` is its own budget per day and month."""
        # isprintable() is false for controls, separators other than " " and lone surrogates
        if not user_id or len(user_id) > 128 or not user_id.isprintable() or " " in user_id:
            raise ConfigError("a user id is 1-128 printable characters without spaces")
        if role not in ("user", "admin"):
            raise ConfigError("role is user or admin")
        allowed = check_models(models)
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = self._clock()
        expires = now + expires_in if expires_in else None
        stored = None if allowed is None else json.dumps(list(allowed))
        budgets = (quota.tokens_per_day, quota.tokens_per_month, quota.requests_per_day)
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, secret_sha256, user_id, role, created, expires, "
                f"revoked, rpm, tpm, models, {', '.join(_QUOTA_COLS)}) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?)",
                (key_id, _digest(secret), user_id, role, now, expires, rpm, tpm, stored, *budgets),
            )
            self._rows.pop(key_id, None)
        info = KeyInfo(key_id, user_id, role, now, expires, None, rpm, tpm, allowed, quota)
        return f"{KEY_PREFIX}{key_id}_{secret}", info

    def page(self, search: str = "", *, limit: int, offset: int = 0) -> list[KeyInfo]:
        """Keys newest first, `limit` of them after `offset`; with `search`, those of that
        user or with that key id (or id prefix)."""
        sql = f"SELECT {_KEY_COLS} FROM api_keys"
        args: tuple[Any, ...] = ()
        if search:
            # the id prefix as a range, so the primary key's index serves it
            sql += " WHERE user_id = ? OR (key_id >= ? AND key_id < ?)"
            args = (search, search, search + "\U0010ffff")
        sql += " ORDER BY created DESC, key_id LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, int(limit), int(offset))).fetchall()
        return [_info(row) for row in rows]

    def list(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLS} FROM api_keys ORDER BY created").fetchall()
        return [_info(row) for row in rows]

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key: its secret, and one still in a rotation's grace, stop working."""
        with self._lock:
            n = self._db.execute(
                "UPDATE api_keys SET revoked = ?, old_sha256 = NULL, old_until = NULL "
                "WHERE key_id = ? AND revoked IS NULL",
                (self._clock(), key_id),
            ).rowcount
            self._rows.pop(key_id, None)
            row = self._db.execute(
                f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no API key {key_id!r} (see `llmhost keys list`)")
        if n == 0:
            raise ConfigError(f"API key {key_id} was already revoked")
        return _info(row)

    def rotate(self, key_id: str, grace_seconds: float) -> Rotation:
        """A new secret for the key (same user, role, limits, models and expiry); the one it
        replaces keeps working for `grace_seconds` (0: it stops now). Only the newest replaced
        secret has a grace: one still in the grace of an earlier rotation stops at once."""
        if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:  # also refuses NaN
            raise ConfigError(f"the grace is 0 to {MAX_GRACE_SECONDS / 86400:g} days")
        secret = secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # read and write as one, against other processes
            try:
                rotation = self._rotate(key_id, secret, grace_seconds)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._rows.pop(key_id, None)
        return rotation

    def _rotate(self, key_id: str, secret: str, grace_seconds: float) -> Rotation:
        row = self._db.execute(
            f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no API key {key_id!r} (see `llmhost keys list`)")
        now = self._clock()
        before = _info(row)
        state = before.state(now)
        if state != "active":
            raise ConfigError(f"API key {key_id} is {state}: create a new one instead")
        until = now + grace_seconds if grace_seconds > 0 else None
        # SQLite evaluates every SET against the row as it was: the old digest moves over.
        self._db.execute(
            "UPDATE api_keys SET old_sha256 = CASE WHEN ? IS NULL THEN NULL ELSE secret_sha256 "
            "END, old_until = ?, secret_sha256 = ?, rotated = ? WHERE key_id = ?",
            (until, until, _digest(secret), now, key_id),
        )
        info = replace(before, rotated=now, old_secret_until=until)
        return Rotation(f"{KEY_PREFIX}{key_id}_{secret}", info, before.in_grace(now))

    def _row(self, key_id: str) -> tuple[Any, ...] | None:
        """The key's row (digests first), from the cache while the database is unchanged."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                self._rows.clear()
                self._version = version
            if key_id in self._rows:
                return self._rows[key_id]
            row: tuple[Any, ...] | None = self._db.execute(
                f"SELECT secret_sha256, old_sha256, {_KEY_COLS} FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
            if len(self._rows) < 10_000:  # unknown ids from a scanner must not grow it
                self._rows[key_id] = row
            return row

    def is_active(self, key_id: str) -> bool:
        """Whether key `key_id` exists and is active now (not revoked, not expired): a
        console session made with it lasts only as long."""
        row = self._row(key_id)
        return row is not None and _info(row[2:]).state(self._clock()) == "active"

    def authenticate(self, token: str) -> Principal:
        body = token[len(KEY_PREFIX) :]
        key_id, sep, secret = body.partition("_")
        if not sep or not key_id or not secret:
            raise AuthenticationError("malformed API key")
        row = self._row(key_id)
        # Compare digests even for unknown ids and keys never rotated, so timing reveals
        # neither which ids exist nor which have a replaced secret.
        digest = _digest(secret)
        current = hmac.compare_digest(row[0] if row else "0" * 64, digest)
        replaced = hmac.compare_digest((row[1] if row else None) or "0" * 64, digest)
        if row is None or not (current or (replaced and row[1] is not None)):
            raise AuthenticationError("invalid API key")
        info = _info(row[2:])
        now = self._clock()  # checked on every call: a cached row does not stop the clock
        state = info.state(now)
        if state != "active":
            raise AuthenticationError(f"API key {key_id} is {state}")
        if not current and not info.in_grace(now):
            raise AuthenticationError(
                f"this secret of API key {key_id} was replaced when the key was rotated "
                "and its grace period is over; use the new one"
            )
        return Principal(
            info.user_id, info.role, info.rpm, info.tpm, "api_key", key_id, info.models, info.quota
        )


# --- JWT -----------------------------------------------------------------------------------

JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256")


@dataclass
class JWTConfig:
    algorithm: str = "HS256"
    secret: str | None = None
    public_key: str | None = None  # PEM
    jwks: dict[str, Any] | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 30.0
    user_claim: str = "sub"
    role_claim: str = "role"


class JWTVerifier:
    def __init__(self, cfg: JWTConfig):
        import jwt

        if cfg.algorithm not in JWT_ALGORITHMS:
            raise ConfigError(f"JWT algorithm must be one of {', '.join(JWT_ALGORITHMS)}")
        symmetric = cfg.algorithm.startswith("HS")
        if symmetric and not cfg.secret:
            raise ConfigError(f"{cfg.algorithm} needs a JWT secret")
        if symmetric and len(cfg.secret or "") < 32:
            raise ConfigError("the JWT secret must be at least 32 characters")
        if not symmetric and not (cfg.public_key or cfg.jwks):
            raise ConfigError(f"{cfg.algorithm} needs a public key or a JWKS file")
        self.cfg = cfg
        self._jwt = jwt
        self._keys: dict[str | None, object] = {}
        if cfg.jwks:
            try:
                for k in jwt.PyJWKSet.from_dict(cfg.jwks).keys:
                    self._keys[k.key_id] = k.key
            except jwt.PyJWTError as exc:
                raise ConfigError(f"unusable JWKS: {exc}") from exc
        elif cfg.public_key:
            self._keys[None] = cfg.public_key
        else:
            self._keys[None] = cfg.secret

    def _key_for(self, token: str) -> object:
        if None in self._keys:
            return self._keys[None]
        kid = self._jwt.get_unverified_header(token).get("kid")
        if kid not in self._keys:
            raise AuthenticationError("token signed by an unknown key (kid)")
        return self._keys[kid]

    def authenticate(self, token: str) -> Principal:
        jwt = self._jwt
        cfg = self.cfg
        try:
            claims = jwt.decode(
                token,
                self._key_for(token),
                algorithms=[cfg.algorithm],
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway,
                options={"require": ["exp"], "verify_aud": cfg.audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthenticationError("token not yet valid (nbf/iat in the future)") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError("token audience not accepted") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthenticationError("token issuer not accepted") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise AuthenticationError(
                f"token algorithm not allowed (only {cfg.algorithm})"
            ) from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError("token signature does not verify") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"token lacks the {exc.claim!r} claim") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise AuthenticationError(f"malformed token: {exc}") from exc
        user = claims.get(cfg.user_claim)
        if not isinstance(user, str) or not user:
            raise AuthenticationError(f"token has no {cfg.user_claim!r} claim to name the user")
        role_claim = claims.get(cfg.role_claim)
        roles = role_claim if isinstance(role_claim, list) else [role_claim]
        role: Role = "admin" if "admin" in roles else "user"
        rpm, tpm = claims.get("rpm"), claims.get("tpm")
        models = claims.get("models")
        if models is not None and not (
            isinstance(models, list) and all(isinstance(m, str) for m in models)
        ):
            raise AuthenticationError("the token's models claim must be a list of model ids")
        return Principal(
            user,
            role,
            rpm if isinstance(rpm, int) and rpm > 0 else None,
            tpm if isinstance(tpm, int) and tpm > 0 else None,
            "jwt",
            models=None if models is None else tuple(models[:MAX_KEY_MODELS]),
            expires=float(claims["exp"]),
        )


def load_jwks(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read JWKS file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ConfigError(f"{path} is not a JWKS document ({{'keys': [...]}})")
    return data


# --- the front door ----------------------------------------------------------------------


class Authenticator:
    def __init__(self, keys: KeyStore | None = None, jwt: JWTVerifier | None = None):
        self.keys = keys
        self.jwt = jwt

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError(
                "missing credentials: send 'Authorization: Bearer <API key or JWT>'"
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("use 'Authorization: Bearer <API key or JWT>'")
        if token.startswith(KEY_PREFIX) and self.keys is not None:
            return self.keys.authenticate(token)
        if token.count(".") == 2 and self.jwt is not None:
            return self.jwt.authenticate(token)
        raise AuthenticationError("invalid credentials: not a known API key or an accepted JWT")


def authenticator_from_settings(settings: Settings) -> Authenticator:
    """API keys from `keys.db`, plus JWTs when a secret, public key or JWKS is configured."""
    verifier = None
    if settings.jwt_configured:
        public = None
        if settings.jwt_public_key is not None:
            try:
                public = Path(settings.jwt_public_key).read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read JWT public key: {exc}") from exc
        verifier = JWTVerifier(
            JWTConfig(
                algorithm=settings.jwt_algorithm,
                secret=settings.jwt_secret,
                public_key=public,
                jwks=load_jwks(settings.jwt_jwks) if settings.jwt_jwks else None,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway,
            )
        )
    return Authenticator(KeyStore(settings.keys_db), verifier)
