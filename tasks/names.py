"""Names: which speaker of a namespace a personal name refers to, learned from the conversation itself.

A history whose speakers are `user` and `assistant` (or any labels) still says who they are: one
speaker addresses the other by name ("Hey Mel!", "Thanks, Caroline.") and people introduce themselves
("I'm Caroline", "my name is Sam"). So a question that names a person ("What did Caroline
research?") can be read as naming a speaker although no speaker is called that. Generic rules, no
list of names:
- a vocative (a greeting word then a capitalised word ending the clause: "Hey Mel!", "Hi Sam,"; or
  a capitalised word alone after a comma at the end of a sentence: "..., Caroline!") in a turn of
  a session with exactly two speakers is a vote that the name is the OTHER speaker's;
- a self-introduction ("my name is X", "call me X", "I'm X", "I am X") is a vote for the speaker;
- a word that also occurs in lower case anywhere in the namespace is no name ("Thanks, Your...");
- a name goes to the speaker with at least MIN_VOTES votes and at least MIN_SHARE of its votes.
The index stage stores the result in the level-0 manifest (`aliases`: name -> speaker label), and
retrieval's named-speaker cue fires on those names as on the speakers' own (`tasks.scoring`).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable

MIN_VOTES = 2
MIN_SHARE = 0.8
MAX_TEXT = 20_000  # characters of a turn read (a hostile turn cannot make this slow)

_NAME = r"([A-Z][a-z]{1,20})"
_END = r"(?=\s*(?:[,.!?;:]|$))"
_GREETING = (
    r"hey|hi|hello|hiya|howdy|yo|thanks|thank you|thx|dear|morning|good morning|good evening|"
    r"good night|congrats|congratulations|bye|goodbye|welcome back|welcome"
)
_VOCATIVE = re.compile(rf"\b(?i:{_GREETING}),?\s+{_NAME}\b{_END}")
_TRAILING = re.compile(rf",\s+{_NAME}\s*(?:[!?.]+|$)")
_SELF = re.compile(rf"\b(?i:my name is|my name's|call me|i'm|i am)\s+{_NAME}\b{_END}")
_WORD = re.compile(r"[A-Za-z]+")


def learn_names(turns: Iterable[tuple[str | None, str | None, str | None]]) -> dict[str, str]:
    """{name (lower case): speaker} from turns (session, speaker, text), in any order."""
    turns = [(str(s or ""), str(p or ""), str(t or "")[:MAX_TEXT]) for s, p, t in turns if p and t]
    in_session: dict[str, set[str]] = defaultdict(set)
    for session, speaker, _ in turns:
        in_session[session].add(speaker)
    lower: set[str] = set()
    votes: dict[str, Counter] = defaultdict(Counter)
    for session, speaker, text in turns:
        lower.update(w for w in _WORD.findall(text) if w.islower())
        others = in_session[session] - {speaker}
        if len(others) == 1:
            other = next(iter(others))
            for m in (*_VOCATIVE.finditer(text), *_TRAILING.finditer(text)):
                votes[m.group(1)][other] += 1
        for m in _SELF.finditer(text):
            votes[m.group(1)][speaker] += 1
    speakers = {p.lower() for _, p, _ in turns}
    out = {}
    for name, counts in votes.items():
        key = name.lower()
        if key in lower or key in speakers:
            continue
        speaker, n = counts.most_common(1)[0]
        if n >= MIN_VOTES and n >= MIN_SHARE * sum(counts.values()):
            out[key] = speaker
    return dict(sorted(out.items()))
