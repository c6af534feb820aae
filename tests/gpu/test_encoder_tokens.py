"""The encoder's threaded tokenisation gives exactly the ids of the model's own tokenizer call."""

from __future__ import annotations


def test_threaded_token_ids_match_the_tokenizer(encoder) -> None:
    texts = [f"Maya: I moved to Lisbon in {y}, near the river." for y in range(1990, 2600)]
    texts += ["word " * 400, "", "   ", "émoji 🤖 ünïcode", "Sam: we adopted a beagle named Pepper."]
    tok = encoder.model.tokenizer
    expected = tok(texts, truncation=True, max_length=encoder.model.max_seq_length, padding=False)[
        "input_ids"
    ]
    got = encoder.token_ids(texts)
    assert got == expected
    assert max(map(len, got)) == encoder.model.max_seq_length  # the long text was truncated, not dropped
    assert encoder.token_ids(texts[:3]) == expected[:3]  # fewer texts than threads
