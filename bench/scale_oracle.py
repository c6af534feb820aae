"""Oracle decomposition of the planted conversation's recall loss at scale (issue 16).

    python bench/scale.py --sizes 100000 --keep --work /tmp/scale      # the namespaces, kept
    python bench/scale_oracle.py /tmp/scale/alone /tmp/scale/n100000 --modes none dense lexval ...

Both data directories come from one bench/scale.py run: `alone` holds the planted conversation by
itself, the other the same conversation among synthetic memories. Each mode asks the planted
questions at 1000 tokens in the big namespace with ONE namespace-dependent statistic replaced by its
value in the planted-alone namespace (several, joined by '+'), and prints recall@1000:
- `dense`: the dense z-score's mean and sd (from the level's mean and covariance);
- `lexstat`: the BM25 z-score's mean and sd over the namespace;
- `lexval`: the planted rows' BM25 weights (IDF and average length of the alone namespace);
- `lexnames` / `lexother`: `lexval` for the speaker-name words of the query only / for its other words;
- `planted`: the planted rows only are ranked (what the reordering of the conversation's own turns
  costs, without synthetic memories competing);
- `exhaustive`: every row scored (the index path's reference);
- `session=X`: scoring.SPEAKER_SESSION set to X (the named participants' sessions' boost).
`--scoring old` scores as before issue 16's change (speaker names searched, session cue 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
NAMES = {"carolin", "melani", "mel"}  # conv-26's speakers and alias, as analysed (stemmed)


def column_values(lex, words, rows_ok) -> dict[int, float]:
    """Summed BM25 weights of `words` per row, rows kept where rows_ok(row)."""
    out: dict[int, float] = {}
    for w in set(words):
        if w not in lex.vocab:
            continue
        c = lex.vocab[w]
        lo, hi = int(lex.indptr[c]), int(lex.indptr[c + 1])
        for r, v in zip(
            np.asarray(lex.indices[lo:hi]).tolist(), np.asarray(lex.data[lo:hi]).tolist(), strict=True
        ):
            if rows_ok(r):
                out[r] = out.get(r, 0.0) + v
    return out


def oracle_query(orig, A, B, b2a, a2b, modes):
    """`level_query` with the big namespace's level-0 statistics replaced as `modes` say."""

    def patched(level, qvec, qwords):
        q = orig(level, qvec, qwords)
        if level is not B.levels[0]:
            return q
        qa = orig(A.levels[0], qvec, qwords)
        if "dense" in modes:
            q.dense_mean, q.dense_sd = qa.dense_mean, qa.dense_sd
        if "lexstat" in modes:
            q.lex_mean, q.lex_sd = qa.lex_mean, qa.lex_sd
        swap = {
            "lexval": lambda w: True,
            "lexnames": lambda w: w in NAMES,
            "lexother": lambda w: w not in NAMES,
        }
        picked = [f for m, f in swap.items() if m in modes]
        if picked:
            pick = picked[0]
            la, lb = A.levels[0].lexical, B.levels[0].lexical
            vals = column_values(lb, [w for w in qwords if not pick(w)], lambda r: True)
            for r, v in column_values(lb, [w for w in qwords if pick(w)], lambda r: b2a[r] < 0).items():
                vals[r] = vals.get(r, 0.0) + v
            for r, v in column_values(la, [w for w in qwords if pick(w)], lambda r: True).items():
                vals[a2b[r]] = vals.get(a2b[r], 0.0) + v
            rows = np.array(sorted(vals), np.int64)
            q.lex_rows, q.lex_vals = rows, np.array([vals[r] for r in rows.tolist()], np.float32)
            q.has_words = q.has_words or qa.has_words
        return q

    return patched


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("alone", type=Path)
    ap.add_argument("big", type=Path)
    ap.add_argument("--modes", nargs="+", default=["none"])
    ap.add_argument("--scoring", choices=("new", "old"), default="new")
    ap.add_argument("--planted", default="conv-26")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from scale import DATA, models

    from memstage.stores.store import MemoryStore
    from memstage.tasks import retrieve as R
    from memstage.tasks import scoring
    from memstage.tasks.evaluate import load_questions, own_memories, run_questions

    torch.set_num_threads(1)
    if args.scoring == "old":
        scoring.NAMES_SEARCHED, scoring.SPEAKER_SESSION = True, 0.5
    encoder, counter = models()
    sa, sb = MemoryStore(args.alone), MemoryStore(args.big)
    na, nb = sa.namespaces()[0], sb.namespaces()[0]
    A, B = R.Retriever(sa, encoder, counter).load(na), R.Retriever(sb, encoder, counter).load(nb)
    ida = {v: i for i, v in enumerate(A.levels[0].column("id").to_pylist())}
    b2a = np.array([ida.get(v, -1) for v in B.levels[0].column("id").to_pylist()])
    a2b = {int(a): b for b, a in enumerate(b2a.tolist()) if a >= 0}
    questions = [q for q in load_questions(DATA).items if q.namespace == args.planted]
    for q in questions:
        q.namespace = nb
    owns = {nb: own_memories(sb, nb)}
    orig = R.level_query
    result = {"scoring": args.scoring, "load_average": [round(x, 1) for x in os.getloadavg()], "recall": {}}
    for mode in args.modes:
        modes = set(mode.split("+"))
        cue = scoring.SPEAKER_SESSION
        for m in modes:
            if m.startswith("session="):
                scoring.SPEAKER_SESSION = float(m.split("=")[1])
        retriever = R.Retriever(sb, encoder, counter, exhaustive="exhaustive" in modes)
        retriever._loaded = {nb: B}
        R.level_query = oracle_query(orig, A, B, b2a, a2b, modes)
        if "planted" in modes:
            ranked = retriever.ranked
            retriever.ranked = lambda ns, *a, _r=ranked, **k: [
                it for it in _r(ns, *a, **k) if it[0] != 0 or b2a[it[1]] >= 0
            ]
        records = run_questions(retriever.retrieve, questions, owns, (1000,))
        R.level_query, scoring.SPEAKER_SESSION = orig, cue
        result["recall"][mode] = round(float(np.mean([r["recall"] for r in records])), 4)
        print(f"{mode}: {result['recall'][mode]}", file=sys.stderr, flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
