"""The server's namespace check: a known namespace costs no store read for ttl_s; unknown ones are never cached."""

from __future__ import annotations

import pytest

from memstage.server.guard import KnownNamespaces
from memstage.stores.store import NamespaceError


class Counting:
    """The real store, counting its existence checks."""

    def __init__(self, store) -> None:
        self.store, self.home, self.checks = store, store.home, 0

    def require_namespace(self, ns: str) -> str:
        self.checks += 1
        return self.store.require_namespace(ns)


def test_a_known_namespace_is_checked_once_per_ttl_and_an_unknown_one_every_time(indexed_sample):
    store = Counting(indexed_sample)
    known = KnownNamespaces(ttl_s=60)
    for _ in range(5):
        known.require(store, "demo")
    assert store.checks == 1
    for _ in range(2):
        with pytest.raises(NamespaceError):
            known.require(store, "nobody")
    assert store.checks == 3  # misses are asked again: a namespace ingested a moment later is found


def test_the_memory_expires(indexed_sample):
    store = Counting(indexed_sample)
    known = KnownNamespaces(ttl_s=0.0)
    known.require(store, "demo")
    known.require(store, "demo")
    assert store.checks == 2
