"""Idempotency at size: 3,000 LoCoMo dev turns in one namespace; every stage run twice changes 0 rows the second time.

The five dev conversations are concatenated into one namespace with their own session names
(`session_1` of each conversation lands in one session), then cycled to 3,000 turns: many
near-duplicates across sessions, the case where a merged survivor's absorbed events used to move it
within its session on the next consolidate (65 rows changed by a second `maintain`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from memstage.stores.store import MemoryStore
from memstage.tasks.compress import run_compress
from memstage.tasks.consolidate import run_consolidate
from memstage.tasks.forget import run_forget
from memstage.tasks.index import run_index
from memstage.tasks.ingest import commit_events, parse_file, parse_locomo_time
from memstage.tasks.update import run_update

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # 10-20 minutes on 2 busy cores
TURNS = 3000


def one_namespace(locomo: Path, out: Path, n: int = TURNS) -> Path:
    samples = json.loads(locomo.read_text())
    rows: list[dict] = []
    rnd = 0
    while len(rows) < n:
        for s in samples:
            conv = s["conversation"]
            keys = sorted(
                (k for k in conv if re.match(r"^session_\d+$", k)), key=lambda k: int(k.split("_")[1])
            )
            for k in keys:
                for i, t in enumerate(conv[k] or []):
                    if len(rows) < n:
                        rows.append(
                            {
                                "namespace": "big", "session": k if rnd == 0 else f"r{rnd}-{k}", "seq": i + 1,
                                "speaker": t["speaker"], "text": t["text"],
                                "time": parse_locomo_time(conv[f"{k}_date_time"]).isoformat(),
                            }
                        )  # fmt: skip
        rnd += 1
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_every_stage_twice_changes_nothing_the_second_time(tmp_path, locomo_path, encoder, token_counter):
    store = MemoryStore(tmp_path / "home")
    commit_events(store, *parse_file(one_namespace(locomo_path, tmp_path / "big.jsonl"), "jsonl"))
    run_index(store, "big", embed=encoder.encode, count_tokens=token_counter.count_many)
    assert store.counts("big")["events"] >= 2900  # identical lines collapse; nearly all are distinct
    stages = {
        "compress": lambda: run_compress(store, "big", count_tokens=token_counter.count_many),
        "consolidate": lambda: run_consolidate(
            store, "big", embed=encoder.encode, count_tokens=token_counter.count_many
        ),
        "update": lambda: run_update(store, "big", embed=encoder.encode),
        "index": lambda: run_index(store, "big", embed=encoder.encode, count_tokens=token_counter.count_many),
        "forget": lambda: run_forget(store, "big", embed=encoder.encode),
    }
    first, second, again = {}, {}, {}
    for name, run in stages.items():  # each stage twice in a row: the second changes nothing
        first[name] = run().changed
        second[name] = run()
    for name, run in stages.items():  # and a whole second pass (a second `maintain`) changes nothing
        again[name] = run().changed
    print({"first": first, "second": {k: r.changed for k, r in second.items()}, "second_pass": again})
    assert first["consolidate"] > 0  # the first pass did real work
    assert {k: r.changed for k, r in second.items()} == dict.fromkeys(stages, 0), {
        k: r.figures for k, r in second.items() if r.changed
    }
    assert again == dict.fromkeys(stages, 0)
