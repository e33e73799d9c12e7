"""The key store caches rows between requests; a revocation by another process (another
connection to keys.db) must still take effect on the very next request."""

from __future__ import annotations

import pytest

from llmhost.errors import AuthenticationError
from llmhost.security.auth import KeyStore


def test_revocation_elsewhere_is_seen_at_once(tmp_path):
    server, cli = KeyStore(tmp_path / "keys.db"), KeyStore(tmp_path / "keys.db")
    key, info = cli.create("alice")
    for _ in range(3):
        assert server.authenticate(key).user_id == "alice"
    cli.revoke(info.key_id)
    with pytest.raises(AuthenticationError, match="revoked"):
        server.authenticate(key)
    # an id probed before it existed is not remembered as unknown once it is created
    key2, info2 = cli.create("bob")
    probe = f"llmh_{info2.key_id}_wrong"
    with pytest.raises(AuthenticationError):
        server.authenticate(probe)
    assert server.authenticate(key2).user_id == "bob"
    # and revocation through the same connection too
    server.revoke(info2.key_id)
    with pytest.raises(AuthenticationError, match="revoked"):
        server.authenticate(key2)
    server.close()
    cli.close()
