"""`tasks.name_lookup` finds exactly the speakers the regex over every name finds (the rule it replaces),
on generated names and questions with the awkward cases: multi-word names, double spaces, names
inside longer words, apostrophes, hyphens, digits, accents and non-word names."""

from __future__ import annotations

import random
import re
import types

from memstage.tasks import name_lookup, scoring


def by_regex(codes: dict[str, int], lowered: str) -> set[int]:
    return {
        c for name, c in codes.items() if name in lowered and re.search(rf"\b{re.escape(name)}\b", lowered)
    }


def namespace(rng: random.Random) -> types.SimpleNamespace:
    words = ["mel", "melanie", "sam", "jo", "anne", "marie", "van", "der", "zoë", "o'brien", "x2", "dr."]
    speakers, aliases = {}, {}
    for code in range(30):
        name = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        (speakers if code % 2 else aliases)[name] = code
    speakers.update({"anne-marie": 31, "user": 32, "mel smith": 33})
    aliases.update({"mel smith": 34, "": 35})  # the speaker's own name wins over an alias
    return types.SimpleNamespace(speakers=speakers, aliases=aliases)


def test_table_lookup_finds_what_the_regex_over_every_name_finds():
    rng = random.Random(0)
    fillers = [
        "what",
        "did",
        "say",
        "to",
        "mel's",
        "melanie?",
        "samuel",
        "jo-jo",
        "anne-marie",
        "  ",
        ",",
        "zoë!",
    ]
    for trial in range(300):
        ns = namespace(random.Random(trial % 7))
        names = list(ns.speakers) + list(ns.aliases)
        parts = [rng.choice(names + fillers) for _ in range(rng.randint(1, 9))]
        lowered = rng.choice([" ", "  ", ", "]).join(parts).lower()
        codes = {**ns.aliases, **ns.speakers}
        assert name_lookup.named(name_lookup.table(ns, True), lowered) == by_regex(codes, lowered), lowered
        assert scoring.named_speakers(ns, lowered) == by_regex(codes, lowered)


def test_table_is_made_once_and_again_when_the_names_change():
    ns = types.SimpleNamespace(speakers={"caroline": 0, "melanie": 1}, aliases={"mel": 1})
    first = name_lookup.table(ns, True)
    assert name_lookup.table(ns, True) is first and first.words == 1
    assert name_lookup.named(first, "did mel smith go?") == {1}
    assert name_lookup.named(name_lookup.table(ns, False), "did mel go?") == set()
    ns.aliases = {"mel": 1, "caro": 0}
    assert name_lookup.named(name_lookup.table(ns, True), "what did caro say?") == {0}
    assert name_lookup.table(ns, True).names_of[1] == ("mel", "melanie")
