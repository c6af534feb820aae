"""Prefix KV cache for the transformers engine: a radix tree of token spans, evicted LRU-first by bytes.

`PrefixKVCache` keeps the key/value states of prompts already computed, as SGLang's radix cache does:
each node holds the KV of one token span, a path from the root spells a prompt prefix, and prompts
that share a prefix share its nodes (stored once). `match` returns the longest cached prefix of a
token sequence as read-only views into the nodes, with no copy; `PrefixLayer` hands those views to
a transformers `DynamicCache` and copies them exactly once, into the buffer that the new tokens are
written into anyway (the same write a cold prefill does). Nothing stored is ever written in place.

Matching compares real token ids (no hashes), so a hit can never be a collision; reuse is correct
by construction, and the tests check greedy output is token-identical with and without it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

KV = tuple[
    torch.Tensor, torch.Tensor
]  # one layer's (keys, values), each [batch=1, kv_heads, tokens, head_dim]


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]  # the span this node adds after its parent's prefix
    kv: list[KV]  # per layer, covering exactly `tokens`
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)  # keyed by the child's first token
    last_used: int = 0
    nbytes: int = 0


def _kv_bytes(kv: Sequence[KV]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def _common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class CacheStats:
    """Counters since construction (or `reset_stats`); `bytes` and `nodes` are the current size."""

    lookups: int = 0
    hits: int = 0  # lookups that reused at least one token
    misses: int = 0
    lookup_tokens: int = 0  # tokens asked for
    hit_tokens: int = 0  # tokens served from the cache
    inserted_tokens: int = 0  # tokens newly stored
    evictions: int = 0
    evicted_bytes: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    nodes: int = 0

    @property
    def hit_token_share(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**self.__dict__, "hit_token_share": round(self.hit_token_share, 4)}


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a sequence: its length and, per layer, the views that spell it."""

    length: int
    parts: list[list[KV]]  # parts[i] = the per-layer KV of the i-th node span on the path

    @classmethod
    def empty(cls) -> PrefixMatch:
        return cls(0, [])

    def dynamic_cache(self, num_layers: int, reserve: int = 0) -> DynamicCache:
        """A `DynamicCache` that starts from this prefix without copying it until the first forward."""
        cache = DynamicCache()
        cache.layers = [
            PrefixLayer([p[i][0] for p in self.parts], [p[i][1] for p in self.parts], reserve)
            for i in range(num_layers)
        ]
        return cache


class PrefixKVCache:
    """Radix tree of cached KV spans with LRU eviction of leaves under a byte budget. Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.capacity_bytes = int(capacity_bytes)
        self._root = _Node(tokens=(), kv=[], parent=None)
        self._clock = 0  # logical time for LRU: cheaper and steadier than wall-clock
        self._lock = threading.Lock()
        self._stats = CacheStats(capacity_bytes=self.capacity_bytes)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._stats.__dict__)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = CacheStats(
                bytes=self._stats.bytes, capacity_bytes=self.capacity_bytes, nodes=self._stats.nodes
            )

    def clear(self) -> None:
        with self._lock:
            self._root.children.clear()
            self._stats.bytes = 0
            self._stats.nodes = 0

    def match(self, tokens: Sequence[int], limit: int | None = None) -> PrefixMatch:
        """Longest cached prefix of `tokens[:limit]`; the nodes on its path become most recently used."""
        tokens = list(tokens if limit is None else tokens[:limit])
        with self._lock:
            self._clock += 1
            node, pos, parts = self._root, 0, []
            while pos < len(tokens):
                child = node.children.get(tokens[pos])
                if child is None:
                    break
                n = _common_len(child.tokens, tokens[pos:])
                child.last_used = self._clock
                if n < len(child.tokens):
                    # Part of a span: a view of its first n positions (no copy; never written through).
                    parts.append([(k[:, :, :n], v[:, :, :n]) for k, v in child.kv])
                    pos += n
                    break
                parts.append(child.kv)
                pos += n
                node = child
            st = self._stats
            st.lookups += 1
            st.lookup_tokens += len(tokens)
            st.hit_tokens += pos
            if pos:
                st.hits += 1
            else:
                st.misses += 1
            return PrefixMatch(pos, parts)

    def insert(self, tokens: Sequence[int], kv: Sequence[KV]) -> int:
        """Store the KV of `tokens` (per layer [1, heads, >= len(tokens), dim]); returns tokens newly stored.

        Only the span past the longest cached prefix is copied (so the tree owns its memory and the
        caller's buffers stay free to change); then leaves are evicted until the budget holds.
        """
        tokens = tuple(tokens)
        with self._lock:
            self._clock += 1
            node, pos = self._root, 0
            while pos < len(tokens):
                child = node.children.get(tokens[pos])
                if child is None:
                    break
                n = _common_len(child.tokens, tokens[pos:])
                if n < len(child.tokens):
                    child = self._split(child, n)
                child.last_used = self._clock
                node, pos = child, pos + n
            added = len(tokens) - pos
            if added:
                span = [
                    (k[:, :, pos : len(tokens)].clone(), v[:, :, pos : len(tokens)].clone()) for k, v in kv
                ]
                leaf = _Node(tokens=tokens[pos:], kv=span, parent=node, last_used=self._clock)
                leaf.nbytes = _kv_bytes(span)
                node.children[tokens[pos]] = leaf
                self._stats.bytes += leaf.nbytes
                self._stats.nodes += 1
                self._stats.inserted_tokens += added
            self._evict()
            return added

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut `node`'s span after n tokens; returns the new upper node. Both halves get their own memory."""
        parent = node.parent
        assert parent is not None
        upper = _Node(
            tokens=node.tokens[:n],
            kv=[(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in node.kv],
            parent=parent,
            last_used=node.last_used,
        )
        node.kv = [(k[:, :, n:].clone(), v[:, :, n:].clone()) for k, v in node.kv]
        node.tokens = node.tokens[n:]
        node.parent = upper
        upper.children[node.tokens[0]] = node
        parent.children[upper.tokens[0]] = upper
        upper.nbytes = _kv_bytes(upper.kv)
        self._stats.bytes += upper.nbytes - node.nbytes
        node.nbytes = _kv_bytes(node.kv)
        self._stats.bytes += node.nbytes
        self._stats.nodes += 1
        return upper

    def _evict(self) -> None:
        # Only leaves go: an inner node is a prefix some cached leaf still needs. A linear scan for
        # the oldest leaf is fine at the few hundred nodes a prompt stream makes.
        while self._stats.bytes > self.capacity_bytes:
            leaves = [n for n in self._iter_nodes() if not n.children]
            if not leaves:
                return
            victim = min(leaves, key=lambda n: n.last_used)
            assert victim.parent is not None
            del victim.parent.children[victim.tokens[0]]
            self._stats.bytes -= victim.nbytes
            self._stats.nodes -= 1
            self._stats.evictions += 1
            self._stats.evicted_bytes += victim.nbytes

    def _iter_nodes(self):
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


class PrefixLayer(DynamicLayer):
    """A `DynamicLayer` that starts from cached prefix parts and grows in a preallocated buffer.

    Before the first update it only holds views (no copy). The first update writes prefix and new
    states into one buffer sized for `reserve` more tokens, so decoding writes each new token in
    place instead of concatenating the whole cache every step as `DynamicLayer` does.
    """

    def __init__(self, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], reserve: int = 0) -> None:
        super().__init__()
        self._k_parts, self._v_parts = k_parts, v_parts
        self._reserve = reserve
        self._len = sum(k.shape[-2] for k in k_parts)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        if k_parts:
            self.dtype, self.device = k_parts[0].dtype, k_parts[0].device
            self.keys, self.values = k_parts[0], v_parts[0]  # placeholders until the first update
            self.is_initialized = True

    def get_seq_length(self) -> int:
        return self._len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> KV:
        n = key_states.shape[-2]
        if self._kbuf is None or self._len + n > self._kbuf.shape[-2]:
            self._grow(key_states, value_states, self._len + n + self._reserve)
        assert self._kbuf is not None and self._vbuf is not None
        self._kbuf[:, :, self._len : self._len + n] = key_states
        self._vbuf[:, :, self._len : self._len + n] = value_states
        self._len += n
        self.keys, self.values = self._kbuf[:, :, : self._len], self._vbuf[:, :, : self._len]
        self.is_initialized = True
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        b, h, _, d = key_states.shape
        kbuf = key_states.new_empty((b, h, capacity, d))
        vbuf = value_states.new_empty((b, h, capacity, value_states.shape[-1]))
        if self._kbuf is not None:
            kbuf[:, :, : self._len] = self._kbuf[:, :, : self._len]
            vbuf[:, :, : self._len] = self._vbuf[:, :, : self._len]
        else:  # first update: the one copy of the cached prefix
            pos = 0
            for k, v in zip(self._k_parts, self._v_parts, strict=True):
                kbuf[:, :, pos : pos + k.shape[-2]] = k
                vbuf[:, :, pos : pos + v.shape[-2]] = v
                pos += k.shape[-2]
            self._k_parts, self._v_parts = [], []
        self._kbuf, self._vbuf = kbuf, vbuf
        self.dtype, self.device = key_states.dtype, key_states.device

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count")
        if self._kbuf is None:
            raise RuntimeError("crop before the first update is not supported")
        self._len = max(0, self._len + tokens_to_remove)
        self.keys, self.values = self._kbuf[:, :, : self._len], self._vbuf[:, :, : self._len]
