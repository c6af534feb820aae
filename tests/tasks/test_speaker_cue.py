"""The speaker cue fires only on a speaker of the namespace: a name that is nobody's does nothing, and
a first-person question ("what did I ...") names the `user` of a user/assistant history."""

from __future__ import annotations

import pytest
from conftest import indexed_turns

from memstage.gpu.lexical_index import analyse
from memstage.tasks import scoring
from memstage.tasks.retrieve import Retriever

TURNS = {
    "chat": [
        ("s1", "2023-05-08T13:00:00Z", "user", "I started learning the cello in March."),
        ("s1", "2023-05-08T13:01:00Z", "assistant", "Many people start learning the cello as adults."),
        ("s2", "2023-06-01T10:00:00Z", "user", "Can you suggest a cello teacher?"),
        ("s2", "2023-06-01T10:01:00Z", "assistant", "Look for a cello teacher who has taught adults."),
    ],
    "friends": [
        ("s1", "2023-05-08T13:00:00Z", "Ann", "I started learning the cello in March."),
        ("s1", "2023-05-08T13:01:00Z", "Bob", "Many people start learning the cello as adults."),
    ],
    # many people's conversations in one namespace: Ann and Cid each take part in one session only
    "team": [
        ("s1", "2023-05-08T13:00:00Z", "Ann", "I started learning the cello in March, Bob."),
        ("s1", "2023-05-08T13:01:00Z", "Bob", "Ann, many people start learning the cello as adults."),
        ("s2", "2023-05-09T13:00:00Z", "Cid", "My cello teacher moved to Ann Arbor."),
        ("s2", "2023-05-09T13:01:00Z", "Dee", "Then find a new cello teacher, Cid."),
        ("s3", "2023-05-10T13:00:00Z", "Eve", "Ann said the cello is hard to learn."),
        ("s3", "2023-05-10T13:01:00Z", "Fay", "The cello takes years."),
    ],
}


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, encoder, token_counter):
    store = indexed_turns(tmp_path_factory.mktemp("cue"), TURNS, encoder, token_counter)
    return Retriever(store, encoder, token_counter)


def scores(retriever: Retriever, namespace: str, question: str) -> dict[str, float]:
    ns = retriever.load(namespace)
    ids = ns.levels[0].column("id").to_pylist()
    speakers = ns.levels[0].column("speaker").to_pylist()
    return {f"{speakers[ids.index(i)]}:{i}": s for i, s in retriever.rank(namespace, question)}


def test_a_first_person_question_lifts_the_users_turns(retriever, monkeypatch):
    question = "When did I start learning the cello?"
    on = scores(retriever, "chat", question)
    monkeypatch.setattr(scoring, "FIRST_PERSON", "nobody")
    off = scores(retriever, "chat", question)
    for key in on:
        lift = on[key] - off[key]
        assert lift == pytest.approx(
            scoring.SPEAKER + scoring.SPEAKER_SESSION if key.startswith("user:") else scoring.SPEAKER_SESSION
        )
    best = max(on, key=on.get)
    assert best.startswith("user:")


def test_no_cue_without_a_user_speaker_or_a_first_person_question(retriever, monkeypatch):
    with_cue = scores(retriever, "friends", "When did I start learning the cello?")
    third = scores(retriever, "chat", "When did someone start learning the cello?")
    monkeypatch.setattr(scoring, "FIRST_PERSON", "nobody")
    assert scores(retriever, "friends", "When did I start learning the cello?") == with_cue
    assert scores(retriever, "chat", "When did someone start learning the cello?") == third


def test_a_name_is_a_cue_only_where_it_names_a_speaker(retriever, monkeypatch):
    question = "When did Ann start learning the cello?"
    chat, friends = scores(retriever, "chat", question), scores(retriever, "friends", question)
    monkeypatch.setattr(scoring, "SPEAKER", 0.0)
    monkeypatch.setattr(scoring, "SPEAKER_SESSION", 0.0)
    assert scores(retriever, "chat", question) == chat  # Ann is nobody in "chat": nothing fired
    assert scores(retriever, "friends", question) != friends  # and Ann's turns in "friends" were lifted


def test_the_names_of_the_speakers_a_question_names_are_not_scored_lexically(retriever):
    # a name's BM25 weight is the namespace population's (issue 16): the speaker cue stands for it
    ns = retriever.load("team")
    question = "When did Ann start learning the cello?"
    words = analyse([question])[0]
    assert "ann" in words
    assert scoring.scored_words(ns, words, question) == [w for w in words if w != "ann"]
    third = "When did someone start learning the cello?"
    assert scoring.scored_words(ns, analyse([third])[0], third) == analyse([third])[0]


def test_the_sessions_any_named_speaker_took_part_in_are_lifted(retriever, monkeypatch):
    ns = retriever.load("team")
    level = ns.levels[0]
    session = dict(zip(level.column("id").to_pylist(), level.column("session").to_pylist(), strict=True))
    question = "What did Ann and Cid say about the cello?"
    on, cue = dict(retriever.rank("team", question)), scoring.SPEAKER_SESSION
    monkeypatch.setattr(scoring, "SPEAKER_SESSION", 0.0)
    off = dict(retriever.rank("team", question))
    for memory, score in on.items():
        lift = score - off[memory]
        # two speakers named: their sessions are lifted, no turn by its speaker
        assert lift == pytest.approx(0.0 if session[memory] == "s3" else cue)
    assert session[max(on, key=on.get)] != "s3"
