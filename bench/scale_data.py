"""Synthetic namespaces for bench/scale.py: real LoCoMo dev turns, their real embeddings, recombined.

How a namespace of N level-0 memories is made:
- the planted conversation (default conv-26) goes in as events and through the real index stage
  (level-0 memories, the real encoder, the index build), with its questions asked afterwards;
- the rest are synthetic conversations, each a copy of one of the other dev conversations: its
  speakers renamed to a person drawn from a pool of 60 x 40 names (names in the texts too), its
  sessions moved by a random shift of -2000..+800 days, each turn's text recombined (its own
  sentences, then with probability 1/2 one sentence of another turn of the same session) and its
  embedding the source turn's real embedding plus Gaussian noise (sigma 0.02 per dimension: cosine
  ~0.93 to the source), re-normalised. These rows are written straight into `events` and
  `memories` (with embeddings and an injection flag), as the ingest and index stages would leave
  them. Bench shortcuts, each measuring nothing the question needs: no per-row ops rows for them;
  a row's token count (the generator's tokenizer) and flag come from its parts, each distinct part
  counted and scanned once (`tokens_and_flags`: counts may be off by a token or two where names
  were renamed). The consolidate stage embeds the level-1 nodes of synthetic sessions as their
  turns' mean embedding (`node_embedder`); every other text, the planted conversation's nodes and
  all topic nodes included, goes through the real encoder.
The dev turns' real embeddings and token counts are computed once and cached under --cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FIRST = [
    "Ava",
    "Ben",
    "Cleo",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jade",
    "Kai",
    "Lena",
    "Milo",
    "Nia",
    "Omar",
    "Pia",
    "Quin",
    "Rosa",
    "Sami",
    "Tara",
    "Umar",
    "Vera",
    "Wes",
    "Xena",
    "Yuri",
    "Zoe",
    "Abel",
    "Bea",
    "Cyrus",
    "Dora",
    "Emil",
    "Flor",
    "Gael",
    "Hugo",
    "Iris",
    "Joel",
    "Kira",
    "Luca",
    "Mara",
    "Nico",
    "Opal",
    "Pavel",
    "Rhea",
    "Saul",
    "Tess",
    "Uma",
    "Vik",
    "Wren",
    "Yara",
    "Zeke",
    "Ada",
    "Boris",
    "Cora",
    "Dario",
    "Edda",
    "Felix",
    "Gita",
    "Hector",
    "Ines",
    "Jonas",
]
LAST = [
    "Lopez",
    "Kim",
    "Novak",
    "Silva",
    "Berg",
    "Okafor",
    "Rossi",
    "Tanaka",
    "Weber",
    "Dubois",
    "Haddad",
    "Ivanova",
    "Costa",
    "Larsen",
    "Moreau",
    "Patel",
    "Quinn",
    "Sato",
    "Varga",
    "Walsh",
    "Young",
    "Zeller",
    "Abbas",
    "Brandt",
    "Cruz",
    "Dahl",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Horvat",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lindqvist",
    "Mendes",
    "Nakamura",
    "Olsen",
    "Petrov",
    "Ramos",
    "Schmidt",
]
_SENT = re.compile(r"(?<=[.!?])\s+")


def dev_turns(path: Path) -> list[dict[str, Any]]:
    """Every dev turn with its conversation, session, position, speaker, text, caption and time."""
    from memstage.tasks.ingest import parse_locomo_time

    out = []
    for sample in json.loads(Path(path).read_text()):
        conv = sample["conversation"]
        sessions = sorted((int(k.split("_")[1]), k) for k in conv if re.fullmatch(r"session_\d+", k))
        for _, key in sessions:
            when = parse_locomo_time(conv[f"{key}_date_time"])
            for seq, turn in enumerate(conv[key], start=1):
                out.append(
                    {
                        "conv": sample["sample_id"],
                        "session": key,
                        "seq": seq,
                        "speaker": turn["speaker"],
                        "text": turn["text"],
                        "caption": turn.get("blip_caption"),
                        "time": when,
                    }
                )
    return out


def cached_embeddings(turns: list[dict[str, Any]], cache: Path, encoder: Any, counter: Any) -> np.ndarray:
    """Real embeddings of each turn's level-0 text (`speaker: text [shared an image: ...]`), cached."""
    from memstage.tasks.index import level0_text

    texts = [level0_text(t["speaker"], t["text"], {"blip_caption": t["caption"]}) for t in turns]
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = Path(cache) / f"dev-embeddings-{key}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(encoder.encode(texts), dtype=np.float32))
    return np.load(path)


def _recombine(text: str, other: str, rng: np.random.Generator) -> tuple[str, str | None]:
    """The text with, half the time, one sentence of `other` inserted; and that sentence (or None)."""
    own = _SENT.split(text)
    extra = None
    if rng.random() < 0.5:
        parts = _SENT.split(other)
        at = int(rng.integers(0, len(own) + 1))
        extra = parts[int(rng.integers(0, len(parts)))]
        own.insert(at, extra)
    return " ".join(own), extra


def tokens_and_flags(
    turns: list[dict[str, Any]], src_rows: list[int], extras: list[str | None], counter: Any
) -> tuple[np.ndarray, list[str]]:
    """Bench shortcut: token count and injection flag of each synthetic row from its parts, each
    distinct part counted and scanned once (tokenizing and scanning 1M texts one by one cost ~260 s
    of the 2-core machine's CPU at 1M): tokens = the source turn's level-0 text's + the inserted
    sentence's (renamed names shift a count by a token or two); flag = the union of both parts'."""
    from memstage.tasks.index import level0_text
    from memstage.tasks.injection import flag_text

    sources = sorted(set(src_rows))
    texts = [
        level0_text(turns[i]["speaker"], turns[i]["text"], {"blip_caption": turns[i]["caption"]})
        for i in sources
    ]
    sentences = sorted({e for e in extras if e is not None})
    counts = counter.count_many(texts + sentences)
    tok = dict(zip(sources, counts[: len(sources)], strict=True))
    stok = dict(zip(sentences, counts[len(sources) :], strict=True))
    flag = {i: flag_text(t) for i, t in zip(sources, texts, strict=True)}
    sflag = {e: flag_text(e) for e in sentences}
    tokens = np.asarray(
        [tok[i] + (stok[e] if e is not None else 0) for i, e in zip(src_rows, extras, strict=True)], np.int32
    )
    flags = [
        ",".join(sorted(set(filter(None, (flag[i] + "," + (sflag[e] if e is not None else "")).split(",")))))
        for i, e in zip(src_rows, extras, strict=True)
    ]
    return tokens, flags


def synthetic_tables(
    turns: list[dict[str, Any]],
    emb: np.ndarray,
    *,
    planted: str,
    namespace: str,
    n: int,
    counter: Any,
    noise: float,
    seed: int,
) -> tuple[pa.Table, pa.Table]:
    """(events, memories, session mean embeddings) of `n` synthetic level-0 memories built from the
    non-planted conversations."""
    from memstage.stores.schema import EVENTS, MEMORIES
    from memstage.tasks.index import level0_id, level0_text

    rng = np.random.default_rng(seed)
    source_idx = [i for i, t in enumerate(turns) if t["conv"] != planted]
    by_conv: dict[str, list[int]] = {}
    for i in source_idx:
        by_conv.setdefault(turns[i]["conv"], []).append(i)
    convs = sorted(by_conv)
    session_of: dict[tuple[str, str], list[int]] = {}
    for i in source_idx:
        session_of.setdefault((turns[i]["conv"], turns[i]["session"]), []).append(i)
    ev: dict[str, list] = {
        k: [] for k in ("id", "session", "seq", "speaker", "text", "event_time", "metadata")
    }
    src_rows, texts, extras = [], [], []
    copy = 0
    while len(src_rows) < n:
        conv = convs[copy % len(convs)]
        rows = by_conv[conv]
        names = {
            s: f"{FIRST[rng.integers(len(FIRST))]} {LAST[rng.integers(len(LAST))]}"
            for s in {turns[i]["speaker"] for i in rows}
        }
        shift = timedelta(days=int(rng.integers(-2000, 800)))
        for i in rows[: n - len(src_rows)]:
            t = turns[i]
            same = session_of[(conv, t["session"])]
            text, extra = _recombine(t["text"], turns[same[int(rng.integers(len(same)))]]["text"], rng)
            for old, new in names.items():
                text = text.replace(old, new.split()[0])
            speaker = names[t["speaker"]]
            eid = hashlib.sha256(f"{namespace}/syn{copy}/{i}".encode()).hexdigest()[:24]
            meta = {"dia_id": f"S{copy}:{i}", "synthetic_of": conv}
            if t["caption"]:
                meta["blip_caption"] = t["caption"]
            ev["id"].append(eid)
            ev["session"].append(f"syn{copy}_{t['session']}")
            ev["seq"].append(t["seq"])
            ev["speaker"].append(speaker)
            ev["text"].append(text)
            ev["event_time"].append(t["time"] + shift)
            ev["metadata"].append(json.dumps(meta))
            src_rows.append(i)
            extras.append(extra)
            texts.append(level0_text(speaker, text, meta))
        copy += 1
    m = len(src_rows)
    at = datetime.now(UTC)
    events = pa.table(
        {**ev, "namespace": [namespace] * m, "source": ["bench/scale.py"] * m, "ingested_at": [at] * m}
    )
    vec = emb[np.asarray(src_rows)] + rng.normal(0.0, noise, size=(m, emb.shape[1])).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    tokens, flags = tokens_and_flags(turns, src_rows, extras, counter)
    flat = pa.array(vec.astype(np.float32).ravel(), pa.float32())
    memories = pa.table(
        {
            "id": [level0_id(e) for e in ev["id"]],
            "namespace": [namespace] * m,
            "level": pa.array(np.zeros(m, np.int8)),
            "text": texts,
            "tokens": pa.array(tokens, pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]).cast(pa.list_(pa.float32())),
            "event_ids": [[e] for e in ev["id"]],
            "session": ev["session"],
            "speaker": ev["speaker"],
            "event_time": ev["event_time"],
            "version": pa.array(np.ones(m, np.int32)),
            "valid_from": ev["event_time"],
            "importance": pa.array(np.full(m, 0.5, np.float32)),
            "access_count": pa.array(np.zeros(m, np.int32)),
            "status": ["active"] * m,
            "metadata": ev["metadata"],
            "flag": flags,  # scanned (from its parts), as the index stage stores a new row
            "created_at": [at] * m,
            "updated_at": [at] * m,
        }
    )
    from memstage.stores.store import conform

    codes, inverse = np.unique(np.asarray(ev["session"]), return_inverse=True)
    sums = np.zeros((len(codes), emb.shape[1]))
    np.add.at(sums, inverse, vec)
    means = {str(c): (v / np.linalg.norm(v)).astype(np.float32) for c, v in zip(codes, sums, strict=True)}
    return conform(events, EVENTS), conform(memories, MEMORIES), means


_NODE_SESSION = re.compile(r"^(syn\d+) session (\d+)\b")


def node_embedder(encoder: Any, session_means: dict[str, np.ndarray]) -> Any:
    """The `embed` the bench gives the stages: the real encoder, except for the level-1 nodes of
    synthetic sessions, which get the mean of their session's turn embeddings (tens of thousands of
    summary texts at 1M would keep this shared 2-core machine's encoder busy for hours)."""

    def embed(texts: Any) -> np.ndarray:
        out = np.zeros((len(texts), 384), np.float32)
        real = []
        for i, text in enumerate(texts):
            m = _NODE_SESSION.match(text)
            key = f"{m.group(1)}_session_{m.group(2)}" if m else None
            if key in session_means:
                out[i] = session_means[key]
            else:
                real.append(i)
        if real:
            out[real] = encoder.encode([texts[i] for i in real])
        embed.real += len(real)
        embed.proxy += len(texts) - len(real)
        return out

    embed.real, embed.proxy = 0, 0
    return embed
