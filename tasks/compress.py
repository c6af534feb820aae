"""Compress: a shorter text for each level-0 memory that keeps its facts, with tokens before and after.

The default is rule-based and needs no model: drop filler sentences and pleasantries, drop
interjections and intensifiers, resolve "I"/"my"/"you" to the speaker's / the other speaker's name,
and pin relative times ("yesterday") to the date of the event. A memory is never made longer;
the original stays in `events` and in the `before` of the ops row; compressed memories are marked
in their metadata so a rerun leaves them alone. A long turn (`tasks.passages`: more than
SPLIT_WORDS words) becomes passages of whole sentences, each compressed: its memory keeps the
first, the others are new level-0 memories of the same turn.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

from memstage.stores import queries
from memstage.stores.store import MemoryStore, now_utc
from memstage.tasks.contract import CountTokens, Embed, StageResult, memories_table, ops_table, timed
from memstage.tasks.injection import flag_text
from memstage.tasks.passages import choose, passage_op, units_of

COMPRESS_VERSION = 1

_PREFIX = re.compile(r"^(?P<speaker>[^:\n]{1,80}): (?P<body>.*)$", re.S)
_IMAGE = re.compile(r"\s*\[shared an image: (?P<caption>[^\]]*)\]\s*$")
_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+|$)")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'&-]*")

# Words that carry no fact on their own: a sentence made only of these (plus stopwords and names of
# the two speakers) is a pleasantry and is dropped.
_FILLER_WORDS = """
hey hi hello hiya yo wow whoa oh ooh ah aw aww awww haha hahaha lol omg yeah yes yep yup no nope ok
okay sure thanks thank congrats congratulations cool awesome great amazing nice good glad happy
fantastic wonderful incredible lovely sweet fun funny interesting exciting excited love loved
totally really so very super just actually literally definitely absolutely pretty quite bye goodbye
care soon see talk chat catch later hear heard hearing sounds sound seems seem like stuff things
thing new up much anything something everything well kind guess mean know think feel feeling doing
going been lot lots tell bet sorry true right dear buddy man girl friend inspiring inspired powerful
proud appreciate appreciated means meant keep hope hoping wish luck
"""
FILLER = set(_FILLER_WORDS.split())
_STOPWORDS_WORDS = """
a an the and or but if then than that this these those it its it's is are was were be being been am
i i'm i've i'd i'll me my mine myself you you're you've you'd you'll your yours yourself we we're
our us they them their he she him her his to of in on at for with about from by as into over after
before what what's whats how how's who whom which when where why there here do does did don't
doesn't didn't can can't could would should will won't have has had having not all any some more
most too also again still even ever every way that's there's here's let's gonna wanna got get gets
getting
"""
STOPWORDS = set(_STOPWORDS_WORDS.split())
INTENSIFIERS = re.compile(
    r"\b(?:really|so|very|totally|super|just|actually|literally|definitely|absolutely|truly)\s+(?=[a-z])",
    re.I,
)
INTERJECTION = re.compile(
    r"^(?:(?:hey|hi|hello|wow|whoa|oh|ooh|ah|aw+|haha+|lol|omg|yeah|yes|yep|ok|okay|well|so|"
    r"(?:thanks|thank you)(?: so much| a bunch| a lot| for asking)?|congrats)\b[\s,!.]*)+",
    re.I,
)

_NUM_WORDS = {
    "a": 1,
    "an": 1,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "a couple of": 2,
    "a few": 3,
    "few": 3,
    "couple of": 2,
}
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_REL_TIME = re.compile(
    r"\b(?P<phrase>yesterday|today|tonight|tomorrow|last night|this morning|this afternoon|this evening|"
    r"(?:last|next|this) (?:week|weekend|month|year|" + "|".join(_WEEKDAYS) + r")|"
    r"(?P<n>\d+|a couple of|couple of|a few|few|an|a|one|two|three|four|five|six|seven|eight|nine|ten) "
    r"(?P<unit>day|week|month|year)s? ago)\b(?! ?\()",
    re.I,
)


def fmt_date(d: datetime) -> str:
    return f"{d.day} {d:%B %Y}"


def _month_shift(d: datetime, months: int) -> datetime:
    idx = d.year * 12 + d.month - 1 + months
    return d.replace(year=idx // 12, month=idx % 12 + 1, day=1)


def absolute_time(phrase: str, when: datetime) -> str | None:
    """The absolute date a relative time phrase means at `when` ('yesterday' on 8 May 2023 -> '7 May 2023')."""
    p = phrase.lower()
    day = timedelta(days=1)
    fixed = {
        "yesterday": when - day,
        "last night": when - day,
        "today": when,
        "tonight": when,
        "this morning": when,
        "this afternoon": when,
        "this evening": when,
        "tomorrow": when + day,
    }
    if p in fixed:
        return fmt_date(fixed[p])
    m = re.fullmatch(r"(last|next|this) (\w+)", p)
    if m:
        rel, unit = m.groups()
        step = {"last": -1, "next": 1, "this": 0}[rel]
        if unit == "week":
            return {"last": "week before ", "next": "week after ", "this": "week of "}[rel] + fmt_date(when)
        if unit == "weekend":
            return {"last": "weekend before ", "next": "weekend after ", "this": "weekend of "}[
                rel
            ] + fmt_date(when)
        if unit == "month":
            return f"{_month_shift(when, step):%B %Y}"
        if unit == "year":
            return str(when.year + step)
        if unit in _WEEKDAYS:
            delta = (when.weekday() - _WEEKDAYS.index(unit)) % 7
            if rel == "last":
                return fmt_date(when - timedelta(days=delta or 7))
            if rel == "next":
                return fmt_date(when + timedelta(days=((_WEEKDAYS.index(unit) - when.weekday()) % 7) or 7))
            return None
    m = re.fullmatch(r"(.+) (day|week|month|year)s? ago", p)
    if m:
        n = int(m.group(1)) if m.group(1).isdigit() else _NUM_WORDS.get(m.group(1))
        if n is None:
            return None
        unit = m.group(2)
        vague = m.group(1) in ("a few", "few", "a couple of", "couple of")
        if unit == "day":
            return ("~" if vague else "") + fmt_date(when - timedelta(days=n))
        if unit == "week":
            return "~" + fmt_date(when - timedelta(weeks=n))
        if unit == "month":
            return f"{_month_shift(when, -n):%B %Y}"
        return str(when.year - n)
    return None


def pin_dates(text: str, when: datetime | None) -> str:
    if when is None:
        return text

    def sub(m: re.Match[str]) -> str:
        date = absolute_time(m.group("phrase"), when)
        return f"{m.group(0)} ({date})" if date else m.group(0)

    return _REL_TIME.sub(sub, text)


_FIRST_PERSON = [  # (pattern, first mention with the name, later mentions)
    (r"I'm|I am", "{s} is", "they're"),
    (r"I've|I have", "{s} has", "they've"),
    (r"I'd", "{s} would", "they'd"),
    (r"I'll", "{s} will", "they'll"),
    (r"I was", "{s} was", "they were"),
    (r"I don't", "{s} doesn't", "they don't"),
    (r"I", "{s}", "they"),
    (r"[Mm]y", "{s}'s", "their"),
    (r"[Mm]ine", "{s}'s", "theirs"),
    (r"[Mm]yself", "{s}", "themselves"),
    (r"me(?!-)", "{s}", "them"),
]
_THIRD = {"go": "goes", "do": "does", "try": "tries", "watch": "watches", "miss": "misses", "wish": "wishes"}
_VERBS = "live|work|love|like|want|need|think|feel|know|agree|hope|go|do|enjoy|play|paint|run|read|make|plan|try|watch|miss|wish|believe|remember|get|take"
_FP_RE = re.compile("|".join(rf"(?P<g{i}>\b(?:{p})\b)" for i, (p, _, _) in enumerate(_FIRST_PERSON)))


def resolve_pronouns(text: str, speaker: str, other: str | None, *, named: bool = True) -> str:
    """First person: the speaker's name at the first mention, 'they' forms after (short, and unambiguous
    enough once the name is there); second person: the other speaker's name when there is exactly one."""
    seen = not named

    def first(m: re.Match[str]) -> str:
        nonlocal seen
        i = int(m.lastgroup[1:])
        _, named, later = _FIRST_PERSON[i]
        out = later if seen else named.format(s=speaker)
        seen = True
        return out

    text = _FP_RE.sub(first, text)
    # "I live" became "Alice live": third person for the common verbs right after the name
    text = re.sub(
        rf"\b({re.escape(speaker)}) ({_VERBS})\b",
        lambda m: f"{m.group(1)} {_THIRD.get(m.group(2), m.group(2) + 's')}",
        text,
    )
    if other:
        o = other
        for pattern, repl in [
            (r"\b[Yy]ou're\b", f"{o} is"),
            (r"\b[Yy]ou've\b", f"{o} has"),
            (r"\b[Yy]ou'll\b", f"{o} will"),
            (r"\b[Yy]ou'd\b", f"{o} would"),
            (r"\b[Yy]our\b", f"{o}'s"),
            (r"\b[Yy]ourself\b", o),
            # generic "you" ("it lets you move") stays: only a you that is not an object of these verbs
            (
                r"(?<!\blet )(?<!\blets )(?<!\bmake )(?<!\bmakes )(?<!\bhelps )(?<!\bkeeps )(?<!\bwhen )(?<!\bif )\b[Yy]ou\b",
                o,
            ),
        ]:
            text = re.sub(pattern, repl, text)
    return re.sub(r"(^|[.?!] )they\b", lambda m: m.group(1) + "They", text)


def _is_name(word: str, names: set[str]) -> bool:
    """A speaker's name or a short form of it ("Mel" for Melanie)."""
    w = word.lower()
    return w in names or (len(w) >= 3 and word[:1].isupper() and any(n.startswith(w) for n in names))


def content_words(sentence: str, names: set[str]) -> list[str]:
    return [
        w
        for w in _WORD.findall(sentence)
        if w.lower() not in STOPWORDS and w.lower() not in FILLER and not _is_name(w, names)
    ]


def is_informative(sentence: str, names: set[str]) -> bool:
    """A sentence worth keeping: a number, a name, or at least one content word; questions need more."""
    words = content_words(sentence, names)
    if any(ch.isdigit() for ch in sentence):
        return True
    proper = [
        w
        for i, w in enumerate(_WORD.findall(sentence))
        if i > 0 and w[0].isupper() and not _is_name(w, names)
    ]
    if sentence.rstrip().endswith("?"):
        # A question states little: keep it only when it names something specific.
        return bool(proper) or len(words) >= 3
    return bool(words)


def clean_sentence(sentence: str, names: set[str]) -> str:
    s = INTERJECTION.sub("", sentence.strip())
    for name in names:  # vocatives: "Thanks, Caroline!" / "Hey Mel,"
        short = re.escape(name[:3].capitalize())
        s = re.sub(rf",\s*{short}\w*\s*(?=[!.?,])", "", s)
        s = re.sub(rf"^{short}\w*[,!]\s*", "", s)
    s = INTENSIFIERS.sub("", s)
    s = re.sub(r"\s{2,}", " ", s).strip(" ,")
    s = re.sub(r"\?*!+\??", lambda m: "?" if "?" in m.group(0) else ".", s)
    return s[:1].upper() + s[1:] if s else s


def compress_text(
    text: str,
    *,
    speaker: str | None,
    other: str | None,
    when: datetime | None,
    resolve: bool = True,
    pin: bool = True,
) -> str:
    """The rule-based compression of one level-0 memory text (see the module docstring)."""
    m = _PREFIX.match(text)
    spk, body = (m.group("speaker"), m.group("body")) if m else (speaker, text)
    caption = None
    im = _IMAGE.search(body)
    if im:
        caption = re.sub(
            r"^(?:a |an )?(?:photo|picture|image) of (?:a |an )?", "", im.group("caption").strip()
        )
        body = body[: im.start()]
    names = {n.lower() for n in (spk, other) if n}
    names |= {n.split()[0].lower() for n in (spk, other) if n and n.split()}
    sentences = [s.strip() for s in _SENTENCE.findall(body) if s.strip()]
    kept = [clean_sentence(s, names) for s in sentences if is_informative(s, names)]
    kept = [s for s in kept if s]
    if not kept:  # all pleasantry: keep the shortest sentence of two words or more, so the turn still exists
        cleaned = [c for c in (clean_sentence(s, names) for s in sentences) if len(c.split()) >= 2]
        kept = [min(cleaned, key=len)] if cleaned else [body.strip()]
    out = " ".join(k if k[-1:] in ".?" else k + "." for k in kept)
    out = pin_dates(out, when if pin else None)
    if caption:
        out += f" [image: {caption}]"
    if resolve and spk:
        # Starting with "I ...": the name replaces it; otherwise the "Speaker:" prefix names them first.
        starts_first_person = bool(_FP_RE.match(out))
        out = resolve_pronouns(out, spk, other, named=starts_first_person)
        if not starts_first_person:
            out = f"{spk}: {out}"
    elif spk:
        out = f"{spk}: {out}"
    return out


def candidate_texts(mem: list[dict[str, Any]], speakers: dict[str, list[str]]) -> list[list[str]]:
    """Per memory, its compressed candidates, preferred first: a pinned date costs tokens, so the
    variants without it (or without pronoun resolution) stand by when they are what keeps it shorter."""
    out = []
    for m in mem:
        others = [s for s in speakers.get(m["session"], []) if s != m["speaker"]]
        other = others[0] if len(others) == 1 else None
        out.append(
            [
                compress_text(
                    m["text"], speaker=m["speaker"], other=other, when=m["event_time"], resolve=r, pin=p
                )
                for r, p in ((True, True), (False, True), (True, False), (False, False))
            ]
        )
    return out


def _compressed_row(
    m: dict[str, Any], text: str, n_tok: int, before_tokens: int, at: datetime
) -> dict[str, Any]:
    meta = json.loads(m["metadata"] or "{}")
    meta["compressed"] = {"v": COMPRESS_VERSION, "tokens_before": before_tokens}
    return {
        **m,
        "text": text,
        "tokens": n_tok,
        # A level-0 memory is found by its source turns' text (tasks.index.index_text), which compress
        # leaves alone: its embedding stays valid (re-embedding gave the same vector: the whole
        # encoder cost of maintaining many small namespaces). Without source events it is found
        # by its own text, which changed: the index stage embeds it again.
        "embedding": m["embedding"] if m.get("event_ids") else None,
        "metadata": json.dumps(meta, sort_keys=True),
        "updated_at": at,
        "flag": flag_text(text),  # a shorter text is scanned again
    }


def run_compress(
    store: MemoryStore,
    namespace: str,
    *,
    count_tokens: CountTokens,
    flow_run_id: str | None = None,
    embed: Embed | None = None,
) -> StageResult:
    """Compress every active level-0 memory not compressed yet (a long turn's as passages, each
    compressed; `embed` cuts them by topic when `passages.SPLIT_MODE` says so); one transaction for
    all rows and ops."""
    result = StageResult("compress", namespace)
    with timed(result):
        mem = store.memories(namespace, level=0, status="active", current=False).to_pylist()
        todo = [m for m in mem if "compressed" not in json.loads(m["metadata"] or "{}")]
        units = units_of(todo, embed)
        candidates = [[*c, u["text"]] for c, u in zip(candidate_texts(units, queries.session_speakers(store, namespace)), units, strict=True)]  # fmt: skip
        counts = iter(count_tokens([c for cands in candidates for c in cands]))
        at = now_utc()
        rows, ops = [], []
        tokens_before = tokens_after = 0
        for unit, cands in zip(units, candidates, strict=True):
            sized = [(c, next(counts)) for c in cands]
            turn = unit.get("_turn", unit)
            whole = turn["tokens"] if turn["tokens"] is not None else count_tokens([turn["text"]])[0]
            chosen = choose(unit, sized, whole)
            if chosen is None:  # nothing shorter: leave it as it is (a rerun recomputes the same answer)
                continue
            base = {k: v for k, v in unit.items() if not k.startswith("_")}
            if unit["_split"] > 1:  # a passage is found by its own words: the turn's vector is not its own
                base["embedding"] = None
            new = _compressed_row(base, chosen[0], chosen[1], chosen[2], at)
            rows.append(new)
            ops.append(passage_op(namespace, turn, new, unit, chosen, whole, flow_run_id, at))
            tokens_before += chosen[2]
            tokens_after += chosen[1]
        if rows:
            with store.writer() as w:
                w.insert("memories", memories_table(rows), replace=True)
                w.insert("ops", ops_table(ops))
        result.changed = len(rows)
        result.figures = {
            "memories_seen": len(mem),
            "turns_split": len({u["_turn"]["id"] for u in units if u["_split"] > 1}),
            "tokens_before": tokens_before,
            "tokens_after": tokens_after,
            "ratio": round(tokens_after / tokens_before, 4) if tokens_before else 1.0,
            **level0_ratio(store, namespace),
        }
    return result


def level0_ratio(store: MemoryStore, namespace: str) -> dict[str, Any]:
    """Tokens of all active level-0 memories now, against what they had before compression."""
    mem = queries.level0_token_rows(store, namespace)
    after = sum(m["tokens"] or 0 for m in mem)
    before = sum(
        json.loads(m["metadata"] or "{}").get("compressed", {}).get("tokens_before", m["tokens"] or 0)
        for m in mem
    )
    return {
        "level0_tokens_before": before,
        "level0_tokens_after": after,
        "level0_ratio": round(after / before, 4) if before else 1.0,
    }
