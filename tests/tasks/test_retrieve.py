"""Retrieval: the right turn first, the budget kept exactly, never another namespace's memories."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import indexed_turns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstage.gpu.lexical_index import analyse
from memstage.stores.store import NamespaceError
from memstage.tasks.retrieve import Retriever, in_periods, question_periods

TURNS = {
    "alpha": [
        ("s1", "2023-05-08T13:00:00Z", "Ann", "I adopted a cat named Miso last week."),
        ("s1", "2023-05-08T13:01:00Z", "Bob", "Lovely! What colour is she?"),
        ("s1", "2023-05-08T13:02:00Z", "Ann", "Orange with a white tail."),
        ("s2", "2023-10-20T09:00:00Z", "Bob", "I ran a half marathon in Lisbon on Sunday."),
        ("s2", "2023-10-20T09:01:00Z", "Ann", "Congratulations! My sister moved to Porto."),
        ("s2", "2023-10-20T09:02:00Z", "Bob", "Porto is great, the bridges are beautiful."),
    ],
    "beta": [
        ("s1", "2024-01-02T10:00:00Z", "Cy", "My cat Miso is sick, we went to the vet."),
        ("s1", "2024-01-02T10:01:00Z", "Di", "I bought a red bicycle yesterday."),
    ],
}


@pytest.fixture(scope="module")
def two_namespaces(tmp_path_factory, encoder, token_counter):
    store = indexed_turns(tmp_path_factory.mktemp("retrieve"), TURNS, encoder, token_counter)
    return Retriever(store, encoder, token_counter)


def test_the_right_turn_comes_first(two_namespaces):
    result = two_namespaces.retrieve("alpha", "Where did Bob run a half marathon?", 1000)
    assert "half marathon" in result["memories"][0]["text"]
    assert result["tokens"] == sum(m["tokens"] for m in result["memories"])
    first = result["memories"][0]
    assert first["level"] == 0 and first["session"] == "s2" and first["event_time"].startswith("2023-10-20")


def test_a_reply_is_lifted_by_its_question(two_namespaces):
    # "Orange with a white tail." shares no word with the question; its neighbour does.
    ranked = [mid for mid, _ in two_namespaces.rank("alpha", "What colour is Ann's cat?")]
    texts = {r["id"]: r["text"] for r in two_namespaces.load("alpha").levels[0].rows.to_pylist()}
    assert "Orange" in " ".join(texts[m] for m in ranked[:3])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    budget=st.integers(min_value=1, max_value=200),
    namespace=st.sampled_from(sorted(TURNS)),
    question=st.sampled_from(
        ["Miso the cat", "Who went to Porto?", "bicycle", "What happened in October 2023?", "?? !!"]
    ),
)
def test_budget_is_kept_and_namespaces_never_cross(two_namespaces, budget, namespace, question):
    result = two_namespaces.retrieve(namespace, question, budget)
    assert result["tokens"] == sum(m["tokens"] for m in result["memories"]) <= budget
    own_events = set(two_namespaces.store.events(namespace).column("id").to_pylist())
    own_memories = set(two_namespaces.store.memories(namespace).column("id").to_pylist())
    for m in result["memories"]:
        assert m["memory_id"] in own_memories
        assert set(m["event_ids"]) <= own_events
    assert len({m["memory_id"] for m in result["memories"]}) == len(result["memories"])
    # Everything that fits is packed: nothing left out would still have fitted.
    rows = two_namespaces.load(namespace).levels[0].rows.to_pylist()
    left = [r["tokens"] for r in rows if r["id"] not in {m["memory_id"] for m in result["memories"]}]
    assert not left or min(left) > budget - result["tokens"] or budget - result["tokens"] < 5


def test_bad_requests_are_errors(two_namespaces):
    with pytest.raises(ValueError):
        two_namespaces.retrieve("alpha", "  ", 100)
    with pytest.raises(ValueError):
        two_namespaces.retrieve("alpha", "cat", 0)
    with pytest.raises(NamespaceError):
        two_namespaces.retrieve("gamma", "cat", 100)


def test_a_named_period_prefers_its_sessions(two_namespaces):
    ranked = two_namespaces.rank("alpha", "What did they talk about in October 2023?")
    rows = {r["id"]: r for r in two_namespaces.load("alpha").levels[0].rows.to_pylist()}
    assert {rows[mid]["session"] for mid, _ in ranked[:3]} == {"s2"}


def test_question_periods_and_matching():
    assert question_periods("What did Ann do on 3 June, 2023?") == [(2023, 6, 3)]
    assert question_periods("When did Bob go camping in July?") == [(None, 7, None)]
    assert question_periods("What happened in 2022?") == [(2022, None, None)]
    assert question_periods("What may Ann like?") == []
    days = np.array(["2023-06-01", "2023-07-20", "2023-09-30", "NaT"], dtype="datetime64[D]")
    assert in_periods(days, [(2023, 6, None)]).tolist() == [True, True, False, False]  # 40 days' slack after
    assert in_periods(days, [(None, 9, None)]).tolist() == [False, False, True, False]


def test_lexical_analysis_stems_texts_and_questions_alike():
    """Snowball (PyStemmer) folds inflections, the same way for memories and for questions."""
    words = analyse(["camping", "camped", "camps", "running", "stories", "story", "glass"])
    assert {w[0] for w in words[:3]} == {"camp"} and words[3] == ["run"] and words[4] == words[5]
    assert words[6] == ["glass"]


def _greedy(sizes: list[int], budget: int, keys: list[str]) -> tuple[list[int], int]:
    """The packing rule written as the plain loop it is: skip what does not fit or repeats a packed
    key, stop once fewer than MIN_LEFT tokens are left."""
    from memstage.tasks.retrieve import MIN_LEFT

    packed, used, seen = [], 0, set()
    for j, n in enumerate(sizes):
        if used + n > budget or keys[j] in seen:
            continue
        packed.append(j)
        used += n
        seen.add(keys[j])
        if budget - used < MIN_LEFT:
            break
    return packed, used


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=400), max_size=700),
    budget=st.integers(min_value=1, max_value=3000),
    distinct=st.integers(min_value=1, max_value=50),
)
def test_pack_sizes_packs_as_the_greedy_rule_says(sizes, budget, distinct):
    """`pack_sizes` (numpy finds the next row that fits, PACK_WINDOW at a time) packs exactly what the
    greedy loop packs, over windows' edges, with duplicate keys and zero-token rows."""
    from memstage.tasks.retrieve import pack_sizes, pack_within_budget

    keys = [f"k{(j * 7) % distinct}" for j in range(len(sizes))]
    want = _greedy(sizes, budget, keys)
    assert pack_sizes(np.asarray(sizes, np.int64), budget, keys.__getitem__) == want
    items = [(k, n) for k, n in zip(keys, sizes, strict=True)]
    packed, used = pack_within_budget(items, lambda item: item[1], budget, key=lambda item: item[0])
    assert (packed, used) == ([items[j] for j in want[0]], want[1])
