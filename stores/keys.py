"""API keys for `memstage serve`: which namespaces a key may read. Stored hashed in HOME/api_keys.json.

A key is `msk_<id>_<secret>` (the id names it in `memstage keys list/revoke`; the secret is 32 random
bytes). Only the SHA-256 of the whole key is stored (a random 256-bit secret needs no slow hash: there
is nothing to guess), so the file never holds a usable key; it is written atomically with mode 0600.
Each entry names the namespaces the key may read, or `*` for every namespace.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memstage.stores.store import validate_namespace

KEYS_FILE = "api_keys.json"
ALL = "*"


class KeyRingError(ValueError):
    """A key request that cannot be carried out (unknown id, bad namespace)."""


@dataclass
class ApiKey:
    id: str
    sha256: str
    namespaces: list[str]
    name: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    revoked_at: str | None = None

    def may_read(self, namespace: str) -> bool:
        return self.revoked_at is None and (ALL in self.namespaces or namespace in self.namespaces)

    def public(self) -> dict[str, Any]:
        """What `keys list` shows: everything but the hash."""
        return {k: v for k, v in asdict(self).items() if k != "sha256"}


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


class KeyRing:
    """The keys of one data directory; re-read when the file changes, so `keys revoke` acts on a running server."""

    def __init__(self, home: Path | str) -> None:
        self.path = Path(home) / KEYS_FILE
        self._stamp: tuple[int, int] | None = None
        self._keys: list[ApiKey] = []

    def entries(self) -> list[ApiKey]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._keys = None, []
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            rows = json.loads(self.path.read_text(encoding="utf-8"))
            self._keys = [ApiKey(**r) for r in rows.get("keys", [])]
            self._stamp = stamp
        return list(self._keys)

    def lookup(self, key: str | None) -> ApiKey | None:
        """The live key whose hash matches `key`, compared in constant time; None for unknown or revoked."""
        if not key or len(key) > 200:
            return None
        digest = _digest(key)
        found = None
        for k in self.entries():
            if hmac.compare_digest(k.sha256, digest) and k.revoked_at is None:
                found = k
        return found

    def add(self, namespaces: list[str], name: str = "") -> tuple[str, ApiKey]:
        """A new key for `namespaces` (or ['*']); returns (the key, shown once, and its stored entry)."""
        if not namespaces:
            raise KeyRingError("name at least one namespace, or --all-namespaces")
        for ns in namespaces:
            if ns != ALL:
                validate_namespace(ns)
        key_id = secrets.token_hex(4)
        key = f"msk_{key_id}_{secrets.token_urlsafe(32)}"
        entry = ApiKey(id=key_id, sha256=_digest(key), namespaces=sorted(set(namespaces)), name=name[:100])
        self._write([*self.entries(), entry])
        return key, entry

    def revoke(self, key_id: str) -> ApiKey:
        keys = self.entries()
        for k in keys:
            if k.id == key_id:
                if k.revoked_at is None:
                    k.revoked_at = datetime.now(UTC).isoformat(timespec="seconds")
                    self._write(keys)
                return k
        raise KeyRingError(f"no key with id {key_id!r}; `memstage keys list` shows them")

    def _write(self, keys: list[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{KEYS_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"keys": [asdict(k) for k in keys]}, f, indent=1)
        os.replace(tmp, self.path)
        self._stamp = None
