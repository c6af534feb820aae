"""Many small namespaces for bench/wide.py: LoCoMo dev turns recombined, and stored as ingest leaves them.

`synthesise` writes the input: namespace k takes `turns` consecutive turns of dev conversation
k mod C from a session offset that grows with k, its speakers renamed from a pool of names (in the
texts too) and its dates shifted. `ingest` stores it as the ingest flow would, with embeddings made
as in the scale bench (bench/scale_data.py), so the encoder is not the whole cost: the real parser
and event commit (tasks/ingest.py), then each event's level-0 memory from the real
`tasks.index.level0_rows` (token counts, injection flags, `ops` rows), inserted with its embedding:
the source dev turn's real embedding (cached) plus Gaussian noise (sigma 0.02 per dimension),
renormalised. No indexes: the maintain flow's index stage builds them. One transaction per
`CHUNK` namespaces, in this process.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from scale_data import FIRST, cached_embeddings, dev_turns  # noqa: E402 - bench/ is on the path

NAMES = FIRST[:14]  # the scale bench's first names: one list for both synthetic benches
CHUNK = 500  # namespaces per ingest transaction, at most
NOISE = 0.02


def synthesise(
    data: Path, n: int, turns: int, out: Path
) -> tuple[int, dict[tuple[str, str], int], list[int]]:
    """JSONL of `n` namespaces of `turns` turns each; returns the turns written and, per
    (namespace, text), the index of the dev turn it came from, and the turns of each namespace."""
    all_turns = dev_turns(data)
    by_conv: dict[str, list[int]] = {}
    for i, t in enumerate(all_turns):
        by_conv.setdefault(t["conv"], []).append(i)
    convs = sorted(by_conv)
    source: dict[tuple[str, str], int] = {}
    written, per_namespace = 0, []
    with out.open("w") as f:
        for k in range(n):
            rows = by_conv[convs[k % len(convs)]]
            start = (k // len(convs) * turns) % max(1, len(rows) - turns)
            speakers = sorted({all_turns[i]["speaker"] for i in rows})
            rename = {s: NAMES[(k + j) % len(NAMES)] + str(k) for j, s in enumerate(speakers)}
            ns = f"w{k:05d}"
            per_namespace.append(len(rows[start : start + turns]))
            for i in rows[start : start + turns]:
                t = all_turns[i]
                text = t["text"]
                for old, new in rename.items():
                    text = text.replace(old, new)
                when = t["time"] + timedelta(days=k % 365)
                row = {"namespace": ns, "session": t["session"], "speaker": rename[t["speaker"]],
                       "text": text, "time": when.isoformat()}  # fmt: skip
                if t["caption"]:
                    row["metadata"] = {"blip_caption": t["caption"]}
                f.write(json.dumps(row) + "\n")
                source[(ns, _key(text))] = i
                written += 1
    return written, source, per_namespace


def _key(text: str) -> str:
    """A text as the parser stores it, give or take whitespace (it trims and collapses it)."""
    return " ".join(text.split())


def embeddings(data: Path, cache: Path) -> np.ndarray:
    """The dev turns' real embeddings, computed once per machine (cached under `cache`)."""
    from memstage.gpu.encoder import Encoder

    class Lazy:  # the encoder is loaded only when the cache misses
        def encode(self, texts: Any) -> np.ndarray:
            return Encoder().encode(texts)

    return cached_embeddings(dev_turns(data), cache, Lazy(), None)


def _level0(chunk: list[tuple[str, list[dict[str, Any]]]], models: str) -> tuple[list, list]:
    """The real level-0 rows and `ops` rows of a chunk of namespaces (run in a pool process: the
    injection scan of every text is the cost)."""
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.tasks.index import level0_rows, level0_text

    counter = _COUNTERS.get(models) or _COUNTERS.setdefault(models, TokenCounter(Path(models)))
    rows, ops = [], []
    for ns, new in chunk:
        texts = [level0_text(e["speaker"], e["text"], json.loads(e["metadata"] or "{}")) for e in new]
        r, o = level0_rows(ns, new, texts, count_tokens=counter.count_many)
        rows += r
        ops += o
    return rows, ops


_COUNTERS: dict[str, Any] = {}


def ingest(path: Path, home: Path, source: dict[tuple[str, str], int], emb: np.ndarray, log: Any) -> dict:
    """Events and level-0 memories (with embeddings) of `path` into `home`; returns the counts.
    Level-0 rows are made by a pool of processes (one per core), stored here, CHUNK namespaces per
    transaction."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from memstage.stores.store import MemoryStore, models_dir
    from memstage.tasks.index import embeddings_table, insert_memories
    from memstage.tasks.ingest import commit_events, parse_file

    store = MemoryStore(home)
    models = str(models_dir(home))
    events, quarantine = parse_file(path, "jsonl")
    committed = commit_events(store, events, quarantine)
    rng = np.random.default_rng(0)
    by_ns: dict[str, list[dict[str, Any]]] = {}
    for e in events.to_pylist():
        by_ns.setdefault(e["namespace"], []).append(e)
    names, made, unmatched = sorted(by_ns), 0, 0
    cpus = max(1, os.cpu_count() or 1)
    size = max(1, min(CHUNK, -(-len(names) // (2 * cpus))))  # two chunks per core at least
    chunks = [[(ns, by_ns[ns]) for ns in names[i : i + size]] for i in range(0, len(names), size)]
    with ProcessPoolExecutor(cpus) as pool:
        made_rows = pool.map(_level0, chunks, [models] * len(chunks))
        for done, (chunk, (rows, ops)) in enumerate(zip(chunks, made_rows, strict=True)):
            found = [source.get((ns, _key(e["text"]))) for ns, new in chunk for e in new]
            unmatched += sum(i is None for i in found)
            v = np.asarray([emb[i if i is not None else 0] for i in found], np.float32)
            v += rng.normal(0, NOISE, v.shape).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            made += insert_memories(store, rows, ops, embeddings_table([m["id"] for m in rows], v))
            log(f"ingest: {min((done + 1) * size, len(names))}/{len(names)} namespaces stored")
    return {"events": committed.figures["events_new"], "quarantined": committed.figures["quarantined"],
            "level0": made, "namespaces": len(names), "embeddings_unmatched": unmatched}  # fmt: skip
