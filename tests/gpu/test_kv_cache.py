"""The prefix KV cache: greedy output with reuse is token-identical to output without; LRU by bytes; counters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memstage.gpu.kv_cache import PrefixKVCache, PrefixLayer

LAYERS, HEADS, DIM = 2, 2, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4  # keys + values, float32


def fake_kv(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, HEADS, n, DIM, generator=g), torch.randn(1, HEADS, n, DIM, generator=g))
        for _ in range(LAYERS)
    ]


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory):
    from memstage.gpu.generator import TransformersGenerator
    from memstage.gpu.tokenizer import ensure_converted

    # One conversion per test session: every test module asks for the same folder.
    models = Path(tmp_path_factory.getbasetemp()) / "models"
    # float32: token identity is the cache's contract there; bfloat16 (the default on CPUs with bf16
    # instructions) rounds a prefill from cached states differently from a full one (test below)
    return TransformersGenerator.load(
        ensure_converted(models), "cpu", cache_bytes=1 << 30, dtype_name="float32"
    )


def test_bfloat16_reuse_gives_the_same_first_token(tmp_path_factory) -> None:
    """In bfloat16 a reused prefix changes the logits by rounding only: the greedy first token stays."""
    from memstage.gpu.generator import TransformersGenerator
    from memstage.gpu.tokenizer import ensure_converted

    models = Path(tmp_path_factory.getbasetemp()) / "models"
    gen = TransformersGenerator.load(
        ensure_converted(models), "cpu", cache_bytes=1 << 28, dtype_name="bfloat16"
    )
    first = gen.prompt_ids([{"role": "system", "content": FACTS}, {"role": "user", "content": "Item 5?"}])
    gen.generate_ids(first, max_new_tokens=1)  # stores the shared prefix
    ids = gen.prompt_ids([{"role": "system", "content": FACTS}, {"role": "user", "content": "Item 6?"}])
    cold, _ = gen.generate_ids(ids, max_new_tokens=1, use_cache=False)
    warm, r_warm = gen.generate_ids(ids, max_new_tokens=1, use_cache=True)
    assert r_warm.cached_tokens > 200 and cold[0] == warm[0]


FACTS = " ".join(f"Fact {i}: item {i} is {['red', 'blue', 'green', 'black'][i % 4]}." for i in range(25))


def test_reuse_is_token_identical_under_greedy_decoding(generator) -> None:
    """Shared system prefix, differing questions: full-span, partial-span and multi-node paths all match cold."""
    generator.kv_cache.clear()
    questions = [
        "What colour is item 5?",
        "What colour is item 6?",
        "What colour is item 5? Answer in one word.",
    ]
    cached = []
    for q in questions:
        ids = generator.prompt_ids([{"role": "system", "content": FACTS}, {"role": "user", "content": q}])
        cold, r_cold = generator.generate_ids(ids, max_new_tokens=12, use_cache=False)
        warm, r_warm = generator.generate_ids(ids, max_new_tokens=12, use_cache=True)
        again, r_again = generator.generate_ids(ids, max_new_tokens=12, use_cache=True)
        assert cold == warm == again, q
        assert r_cold.cached_tokens == 0
        assert r_again.cached_tokens == len(ids) - 1  # everything but the token that yields the first logits
        cached.append(r_warm.cached_tokens)
    assert cached[0] == 0 and cached[1] > 200 and cached[2] > cached[1]  # later questions reuse the prefix


def test_stored_states_are_never_written_through(generator) -> None:
    ids = generator.prompt_ids([{"role": "system", "content": FACTS}, {"role": "user", "content": "Item 7?"}])
    generator.generate_ids(ids, max_new_tokens=4)
    match = generator.kv_cache.match(ids)
    before = [[(k.clone(), v.clone()) for k, v in part] for part in match.parts]
    generator.generate_ids(ids + [28, 29, 30], max_new_tokens=8)  # reuses the stored views, then decodes
    for part, snap in zip(match.parts, before, strict=True):
        for (k, v), (k0, v0) in zip(part, snap, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)


def test_shared_prefix_stored_once_and_views_match() -> None:
    cache = PrefixKVCache(1 << 20)
    a, b = list(range(100)), list(range(60)) + [999] * 40
    kv_a, kv_b = fake_kv(100, 1), fake_kv(100, 2)
    assert cache.insert(a, kv_a) == 100
    assert cache.insert(b, kv_b) == 40  # the first 60 tokens are already there
    assert cache.stats.bytes == 140 * TOKEN_BYTES
    m = cache.match(b + [5])
    assert m.length == 100
    layer0 = torch.cat([p[0][0] for p in m.parts], dim=2)
    assert torch.equal(layer0[:, :, :60], kv_a[0][0][:, :, :60])  # first writer's states for the shared part
    assert torch.equal(layer0[:, :, 60:], kv_b[0][0][:, :, 60:])
    partial = cache.match(a[:30] + [7, 7])
    assert partial.length == 30 and partial.parts[0][0][0].shape[2] == 30  # a view into a longer span


def test_lru_eviction_is_bounded_by_bytes() -> None:
    cache = PrefixKVCache(capacity_bytes=250 * TOKEN_BYTES)
    seqs = {k: [k_ord * 10_000 + t for t in range(100)] for k_ord, k in enumerate("abc")}
    cache.insert(seqs["a"], fake_kv(100))
    cache.insert(seqs["b"], fake_kv(100))
    assert cache.match(seqs["a"]).length == 100  # touch a: b is now least recently used
    cache.insert(seqs["c"], fake_kv(100))
    st = cache.stats
    assert st.bytes <= st.capacity_bytes == 250 * TOKEN_BYTES
    assert st.evictions == 1 and st.evicted_bytes == 100 * TOKEN_BYTES
    assert cache.match(seqs["b"]).length == 0
    assert cache.match(seqs["a"]).length == 100 and cache.match(seqs["c"]).length == 100


def test_inner_nodes_go_only_after_their_leaves() -> None:
    cache = PrefixKVCache(capacity_bytes=130 * TOKEN_BYTES)
    base = list(range(100))
    cache.insert(base + [1000 + i for i in range(20)], fake_kv(120))
    cache.insert(base + [2000 + i for i in range(20)], fake_kv(120))  # over budget: oldest leaf goes
    assert cache.match(base + [2000]).length == 101
    assert cache.match(base + [1000]).length == 100
    assert cache.stats.bytes == 120 * TOKEN_BYTES


def test_counters() -> None:
    cache = PrefixKVCache(1 << 20)
    assert cache.match([1, 2, 3]).length == 0
    cache.insert([1, 2, 3, 4], fake_kv(4))
    assert cache.match([1, 2, 3, 4, 5], limit=4).length == 4
    assert cache.match([1, 2, 9]).length == 2
    st = cache.stats
    assert (st.lookups, st.hits, st.misses) == (3, 2, 1)
    assert (st.lookup_tokens, st.hit_tokens, st.inserted_tokens) == (3 + 4 + 3, 6, 4)
    assert st.nodes == 1 and st.bytes == 4 * TOKEN_BYTES
    assert st.as_dict()["hit_token_share"] == pytest.approx(0.6)
    cache.reset_stats()
    assert cache.stats.lookups == 0 and cache.stats.bytes == 4 * TOKEN_BYTES


def test_prefix_layer_grows_past_its_reserve() -> None:
    ((k, v),) = fake_kv(5)[:1]
    layer = PrefixLayer([k[:, :, :3], k[:, :, 3:]], [v[:, :, :3], v[:, :, 3:]], reserve=1)
    assert layer.get_seq_length() == 5
    new = torch.ones(1, HEADS, 2, DIM)
    keys, _ = layer.update(new, new)
    assert keys.shape[2] == 7 and torch.equal(keys[:, :, :5], k)
    keys, _ = layer.update(new, new)  # beyond the reserve: the buffer grows, contents kept
    assert (
        keys.shape[2] == 9
        and torch.equal(keys[:, :, :5], k)
        and torch.equal(keys[:, :, 5:], torch.ones(1, HEADS, 4, DIM))
    )
