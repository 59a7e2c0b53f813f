"""API keys: `bsk_<prefix>_<secret>`; the database keeps the public prefix and the sha256 of the whole key.

The secret is 256 random bits, so a plain sha256 is enough (no password-style stretching is needed); the
prefix finds the row in one indexed lookup and `hmac.compare_digest` compares the hashes in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from db import repo

KEY_RE = re.compile(r"^bsk_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new key and its public prefix."""
    prefix = secrets.token_hex(6)
    return f"bsk_{prefix}_{secrets.token_urlsafe(32)}", prefix


def create_key(sf: sessionmaker[Session], tenant_name: str, name: str = "") -> tuple[str, str]:
    """Create (if needed) the tenant and a new key for it; returns (key, tenant_id). The key is shown once."""
    tenant = repo.ensure_tenant(sf, tenant_name)
    key, prefix = generate_key()
    repo.add_api_key(sf, tenant.id, prefix, hash_key(key), name)
    return key, tenant.id


class KeyCache:
    """Keys verified in the last `ttl` seconds (sha256 -> tenant id), so a busy client costs no database
    lookup per request. A revoked key keeps working for at most `ttl` seconds; `ttl` 0 turns the cache off."""

    def __init__(self, ttl: float, size: int = 10_000):
        self.ttl, self.size = ttl, size
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> str | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            hit = self._entries.get(key_hash)
            if hit is None or hit[1] < time.monotonic():
                return None
            return hit[0]

    def put(self, key_hash: str, tenant_id: str) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.size:
                self._entries.clear()
            self._entries[key_hash] = (tenant_id, time.monotonic() + self.ttl)


def cached_tenant(key: str | None, cache: KeyCache) -> str | None:
    """The tenant of a key verified within the cache's ttl, without touching the database; else None."""
    if not key or cache.ttl <= 0:
        return None
    return cache.get(hash_key(key.strip()))


def authenticate(sf: sessionmaker[Session], key: str | None, cache: KeyCache | None = None) -> str | None:
    """The tenant id of a valid key, else None."""
    if not key:
        return None
    key = key.strip()
    m = KEY_RE.match(key)
    if not m:
        return None
    digest = hash_key(key)
    if cache is not None:
        hit = cache.get(digest)
        if hit is not None:
            return hit
    row = repo.find_api_key(sf, m.group(1))
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    if cache is not None:
        cache.put(digest, row.tenant_id)
    return row.tenant_id
