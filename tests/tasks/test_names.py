"""Names a conversation calls its speakers by (`tasks.names`), stored by the index stage and used by
retrieval: a question naming the user of a user/assistant history by name is searched for as `user`
and lifts the user's turns."""

from __future__ import annotations

import pytest
from conftest import indexed_turns

from memstage.tasks import scoring
from memstage.tasks.names import learn_names
from memstage.tasks.retrieve import Retriever, search_text


def test_vocatives_name_the_other_speaker_and_introductions_the_speaker():
    turns = [
        ("s1", "user", "Hi! I'm Dana, nice to meet you."),
        ("s1", "assistant", "Hello Dana! How can I help?"),
        ("s2", "user", "Thanks, Robo. I started the cello."),
        ("s2", "assistant", "That is great, Dana!"),
        ("s2", "user", "Cheers, Robo!"),
    ]
    assert learn_names(turns) == {"dana": "user", "robo": "assistant"}


def test_no_name_from_one_vote_a_lower_case_word_or_a_split_vote():
    turns = [
        ("s1", "user", "Hey Sam! And thanks, Great."),  # Sam once; "Great" also said in lower case
        ("s1", "assistant", "That is great. Hey Lee! Thanks, Lee."),  # Lee for user twice ...
        ("s1", "user", "Hi Lee, hello Lee!"),  # ... and for assistant twice: split, no name
        ("s2", "user", "Hi Kim! Thanks Kim."),  # a session of one speaker: no vote
        ("s3", "user", "x" * 50_000 + ", Zed!"),  # only the first MAX_TEXT characters are read
    ]
    assert learn_names(turns) == {}
    assert learn_names([]) == {}
    assert learn_names([("s", None, "Hi Bob!"), ("s", "a", None)]) == {}


TURNS = {
    "chat": [
        ("s1", "2023-05-08T13:00:00Z", "user", "I started learning the cello in March."),
        ("s1", "2023-05-08T13:01:00Z", "assistant", "Wonderful, Dana! Many adults learn the cello."),
        ("s2", "2023-06-01T10:00:00Z", "user", "Can you suggest a cello teacher?"),
        ("s2", "2023-06-01T10:01:00Z", "assistant", "Hi Dana! Look for a cello teacher who teaches adults."),
    ],
}


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, encoder, token_counter):
    store = indexed_turns(tmp_path_factory.mktemp("names"), TURNS, encoder, token_counter)
    return Retriever(store, encoder, token_counter)


def test_the_index_stores_the_names_and_retrieval_reads_a_name_as_the_speaker(retriever, monkeypatch):
    ns = retriever.load("chat")
    assert ns.aliases == {"dana": ns.speakers["user"]}
    question = "When did Dana start learning the cello?"
    assert search_text(ns, question) == "When did user start learning the cello?"
    assert scoring.named_speakers(ns, question.lower()) == {ns.speakers["user"]}
    ranked = [mid for mid, _ in retriever.rank("chat", question)]
    speaker = dict(
        zip(ns.levels[0].column("id").to_pylist(), ns.levels[0].column("speaker").to_pylist(), strict=True)
    )
    assert speaker[ranked[0]] == "user"
    on = dict(retriever.rank("chat", question))
    monkeypatch.setattr(scoring, "SPEAKER_NAMES", False)
    off = dict(retriever.rank("chat", question))
    assert search_text(ns, question) == question
    lifted = [mid for mid in on if speaker[mid] == "user"]
    assert all(on[mid] > off[mid] for mid in lifted)
