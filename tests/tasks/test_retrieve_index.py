"""The index path against an exhaustive scan: same scores where it scores, same evidence packed.

Rule checked (property test): every level-0 row the index path scores gets exactly the score an
exhaustive scan of the namespace gives it (z-statistics are namespace-wide either way, and whole
sessions are scored), so the index path packs what the exhaustive scan packs whenever the scan's
packed rows are among its candidates; on small namespaces with the default candidate counts that
is every question, and the packed memories are the same. Also: the columnar artifacts carry the
hierarchy (level-0 positions under each node), and a hard forget leaves no byte of the forgotten
text in any artifact file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import LOCOMO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstage.gpu.lexical_index import analyse
from memstage.stores.compact import find_bytes
from memstage.tasks import candidates as cand
from memstage.tasks.consolidate import run_consolidate
from memstage.tasks.forget_hard import forget_hard
from memstage.tasks.index import build_indexes, run_index
from memstage.tasks.retrieve import Retriever
from memstage.tasks.scoring import level_query, score_rows

CONV = "conv-30"
SESSIONS = 6


def _conversation() -> tuple[list[dict], list[str]]:
    if not LOCOMO.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO}")
    sample = next(s for s in json.loads(LOCOMO.read_text()) if s["sample_id"] == CONV)
    conv = sample["conversation"]
    rows = []
    for n in range(1, SESSIONS + 1):
        for turn in conv[f"session_{n}"]:
            rows.append(
                {
                    "namespace": "small",
                    "session": f"session_{n}",
                    "time": f"2023-0{n}-10T10:00:00Z",
                    "speaker": turn["speaker"],
                    "text": turn["text"],
                }
            )
    questions = [q["question"] for q in sample["qa"] if q.get("category") in (1, 2, 3, 4)]
    return rows, questions


@pytest.fixture(scope="module")
def small(tmp_path_factory, encoder, token_counter):
    from memstage.stores.store import MemoryStore
    from memstage.tasks.ingest import commit_events, parse_file

    rows, questions = _conversation()
    folder = tmp_path_factory.mktemp("index-path")
    path = folder / "turns.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = MemoryStore(folder / "home")
    commit_events(store, *parse_file(path, "jsonl"))
    kw = {"embed": encoder.encode, "count_tokens": token_counter.count_many}
    run_index(store, "small", **kw)
    run_consolidate(store, "small", **kw)
    build_indexes(store, "small")
    index = Retriever(store, encoder, token_counter)
    scan = Retriever(store, encoder, token_counter, exhaustive=True)
    return index, scan, questions


def test_artifacts_hold_the_hierarchy(small):
    index, _, _ = small
    ns = index.load("small")
    assert ns.n > 100 and 1 in ns.levels
    level1 = ns.levels[1]
    covered = np.concatenate(
        [level1.members[level1.members_ptr[i] : level1.members_ptr[i + 1]] for i in range(len(level1))]
    )
    assert sorted(covered.tolist()) == list(range(ns.n))  # every turn sits under exactly one session node


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pick=st.integers(min_value=0, max_value=10_000),
    k=st.sampled_from([5, 20, 200]),
    budget=st.sampled_from([100, 500, 1000]),
)
def test_index_path_scores_exactly_and_packs_what_the_scan_packs(small, monkeypatch, pick, k, budget):
    index, scan, questions = small
    question = questions[pick % len(questions)]
    ns = index.load("small")
    qvec = np.asarray(index.encoder.encode([question])[0], np.float32)
    from memstage.gpu.lexical_index import analyse

    queries = {lvl: level_query(level, qvec, analyse([question])[0]) for lvl, level in ns.levels.items()}
    everything = score_rows(ns, np.arange(ns.n), queries[0], question)
    monkeypatch.setattr(cand, "K_DENSE", k)
    monkeypatch.setattr(cand, "K_LEX", k)
    rows, _ = cand.candidates(ns, queries)
    np.testing.assert_allclose(
        score_rows(ns, rows, queries[0], question), everything[rows], rtol=1e-9, atol=1e-9
    )
    got = [m["memory_id"] for m in index.retrieve("small", question, budget)["memories"]]
    want = [m["memory_id"] for m in scan.retrieve("small", question, budget)["memories"]]
    scanned_ids = set(ns.levels[0].column("id").take(rows).to_pylist())
    if set(want) <= scanned_ids:  # the scan's packed rows are candidates: the same packing
        assert got == want
    if k == 200:  # default-sized candidate sets cover a small namespace's packing
        assert got == want


def test_device_scoring_scores_every_row_as_the_host_does(small, monkeypatch):
    """`gpu.device_scoring` (torch, here on the CPU in float64) gives every level-0 row the score
    `score_rows` gives it over all rows: plain, named-speaker, dated and relative questions (with the
    day asked), and the retriever scoring on the device packs what the exhaustive scan packs."""
    import dataclasses
    from datetime import date

    from memstage.gpu import device_scoring
    from memstage.tasks import scoring, scoring_device
    from memstage.tasks.retrieve import search_text
    from memstage.tasks.scoring import scored_words

    index, scan, questions = small
    ns = index.load("small")
    on_cpu = dataclasses.replace(ns, years=scoring.years_of(ns.days))
    on_cpu.device = scoring_device.device_level(on_cpu, "cpu")
    assert on_cpu.device.n == ns.n and on_cpu.device.n_sessions == SESSIONS
    named = [q for q in questions if "jon" in q.lower()][:3]
    extra = ["What did Gina do in March 2023?", "What happened two months ago?", "What did I say last month?"]
    today = date(2023, 5, 20)
    monkeypatch.setattr(scoring, "SESSION_TOP", 2)  # weights are read per question, not frozen at load
    for question in questions[:6] + named + extra:
        searched = search_text(ns, question)
        qvec = np.asarray(index.encoder.encode([searched])[0], np.float32)
        words = scored_words(ns, analyse([searched])[0], question)
        want = score_rows(ns, np.arange(ns.n), level_query(ns.levels[0], qvec, words), question, today)
        inputs = scoring_device.question_inputs(on_cpu, qvec, words, question, today)
        got = on_cpu.device.score(inputs, scoring_device.weights()).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert any(scoring_device.question_inputs(on_cpu, qvec, [], q, today).day_ranges for q in extra)
    monkeypatch.setattr(device_scoring, "PAD_SESSION", 0)  # sessions by scatters, not the padded grid
    scattered = scoring_device.device_level(on_cpu, "cpu")
    assert on_cpu.device.pad is not None and scattered.pad is None
    scattered.passages = True  # the turn maxima by scatter (each turn one row here: the same values)
    for question in named + extra:
        inputs = scoring_device.question_inputs(on_cpu, qvec, [], question, today)
        np.testing.assert_allclose(
            scattered.score(inputs, scoring_device.weights()).numpy(),
            on_cpu.device.score(inputs, scoring_device.weights()).numpy(),
            rtol=0,
            atol=1e-9,
        )
    assert scoring_device.question_inputs(on_cpu, qvec, [], named[0], today).named
    scan._loaded["small"] = on_cpu  # the scan's retriever now scores on the (CPU) device
    for question in questions[:8]:
        got = [m["memory_id"] for m in scan.retrieve("small", question, 500)["memories"]]
        want = [m["memory_id"] for m in index.retrieve("small", question, 500)["memories"]]
        assert got == want and scan.last_figures == {"scored": ns.n, "device": 1}


def test_a_level_scored_on_a_card_keeps_only_its_mapped_cpu_index(small):
    """A level the triton kernels score from its int8 codes (`card_scored`) gets no GPU copy of its
    dense index: the CPU form, memory-mapped, which still finds what the plain load finds."""
    index, _, questions = small
    ns = index.load("small")
    folder = next(p.parent for p in (index.store.home / "indexes").rglob("L0.dense.faiss"))
    mapped = cand.load_level(folder, 0, card_scored=True)
    assert mapped.dense.backend == "faiss-cpu" and mapped.dense.device_rows is None
    qvec = np.asarray(index.encoder.encode([questions[0]])[0], np.float32)
    got, want = mapped.dense.search(qvec, 20), ns.levels[0].dense.search(qvec, 20)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_hard_forget_leaves_no_byte_in_the_artifacts(small, encoder, token_counter):
    index, _, _ = small
    store = index.store
    subject = "studio"
    hits = [r for r in index.load("small").levels[0].rows.to_pylist() if subject in r["text"].lower()]
    assert hits, "the fixture conversation must mention the subject"
    files = [p for p in (store.home / "indexes").rglob("*") if p.is_file()]
    assert any(subject.encode() in p.read_bytes().lower() for p in files)  # the artifacts held it
    version = index.load("small").version
    result = forget_hard(store, "small", subject=subject, embed=encoder.encode)
    assert result.figures["indexes"] == "rebuilt"
    assert find_bytes(store.home / "indexes", subject) == []
    for p in (store.home / "indexes").rglob("*"):
        if p.is_file():
            assert subject.encode() not in p.read_bytes().lower(), p
    ns = index.load("small")  # the retriever notices the new version
    assert ns.version > version and ns.n > 0
    packed = index.retrieve("small", "What is Jon opening?", 1000)["memories"]
    assert packed and all(subject not in m["text"].lower() for m in packed)


def test_level_rows_of_a_file_of_several_batches_are_taken_without_concatenating() -> None:
    """A big namespace's rows file holds several record batches: `Level.take` and `Level.column`
    give what a one-batch table gives, in the asked order, without concatenating the columns."""
    import numpy as np
    import pyarrow as pa

    from memstage.tasks.candidates import Level

    whole = pa.table({"id": [f"m{i}" for i in range(10)], "text": [f"t{i}" for i in range(10)]})
    batched = pa.Table.from_batches(whole.to_batches(max_chunksize=3))
    assert batched.column("text").num_chunks == 4
    z = np.zeros(0)
    level = Level(batched, z, z, z, z, None, None, z)  # type: ignore[arg-type]
    picked = [9, 0, 4, 3, 8]
    assert level.take(picked) == whole.take(picked).to_pylist()
    assert [level.column("text")[i].as_py() for i in picked] == ["t9", "t0", "t4", "t3", "t8"]
    assert isinstance(level.column("text"), pa.ChunkedArray)  # as it is, not concatenated
