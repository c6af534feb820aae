"""Fusion features and their fit: the hand weights over the features are today's scoring exactly; a
fit on a small slice of LoCoMo (three conversations, their first sessions) runs through the real
candidate path, and each leave-one-conversation-out fold trains on every other conversation and
never on the held-out one; a feature that separates evidence gains weight in the fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import LOCOMO

from memstage.tasks import fusion, fusion_fit
from memstage.tasks.as_of import as_of_day
from memstage.tasks.evaluate import load_questions
from memstage.tasks.fusion import FEATURES, RowFeatures
from memstage.tasks.index import run_index
from memstage.tasks.ingest import commit_events, parse_file
from memstage.tasks.retrieve import Retriever
from memstage.tasks.scoring import score_rows

CONVERSATIONS = ("conv-26", "conv-30", "conv-41")
SESSIONS = 3


def _slice(path) -> None:
    """The first SESSIONS sessions of CONVERSATIONS, with the questions whose evidence lies in them."""
    if not LOCOMO.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO}")
    out = []
    for sample in json.loads(LOCOMO.read_text()):
        if sample["sample_id"] not in CONVERSATIONS:
            continue
        conv = sample["conversation"]
        keep = {k: v for k, v in conv.items() if not k.startswith("session_")}
        for n in range(1, SESSIONS + 1):
            keep[f"session_{n}"] = conv[f"session_{n}"]
            keep[f"session_{n}_date_time"] = conv[f"session_{n}_date_time"]
        known = {t["dia_id"] for n in range(1, SESSIONS + 1) for t in conv[f"session_{n}"]}
        qa = [q for q in sample["qa"] if q.get("evidence") and set(q["evidence"]) <= known]
        out.append({"sample_id": sample["sample_id"], "conversation": keep, "qa": qa})
    path.write_text(json.dumps(out))


@pytest.fixture(scope="module")
def sliced(tmp_path_factory, encoder, token_counter):
    from memstage.stores.store import MemoryStore

    folder = tmp_path_factory.mktemp("fusion")
    path = folder / "slice.json"
    _slice(path)
    store = MemoryStore(folder / "home")
    commit_events(store, *parse_file(path, "locomo"))
    for ns in CONVERSATIONS:
        run_index(store, ns, embed=encoder.encode, count_tokens=token_counter.count_many)
    retriever = Retriever(store, encoder, token_counter)
    return retriever, load_questions(path).items


def test_hand_weights_over_the_features_are_the_hand_scoring(sliced):
    retriever, questions = sliced
    for q in questions[::7]:
        ns, rows, lq = fusion_fit.question_rows(retriever, q.namespace, q.question)
        feats = fusion.row_features(ns, rows, lq, q.question, as_of_day(q.as_of))
        assert feats.x.shape == (len(rows), len(FEATURES))
        want = score_rows(ns, rows, lq, q.question, as_of_day(q.as_of))
        np.testing.assert_allclose(fusion.combine(feats, fusion.hand_weights()), want, atol=1e-9)


def test_loco_fit_on_a_slice_never_trains_on_the_held_out_conversation(sliced):
    retriever, questions = sliced
    samples = fusion_fit.collect(retriever, questions, "slice")
    assert {s.conversation for s in samples} == set(CONVERSATIONS)
    assert all(s.labels.any() and len(s.labels) == len(s.features.x) for s in samples)
    folds = fusion_fit.loco_folds(s.conversation for s in samples)
    assert [held for held, _ in folds] == sorted(CONVERSATIONS)
    for held, train in folds:
        assert train == frozenset(CONVERSATIONS) - {held}
        picked = fusion_fit.fold_samples(samples, train, held)
        assert {s.conversation for s in picked} == train
        assert len(picked) == sum(s.conversation != held for s in samples)
        w = fusion_fit.fit_listwise(picked)
        assert np.isfinite(w).all() and w.shape == (len(FEATURES),)
        assert w[FEATURES.index("dense")] + w[FEATURES.index("lex")] == pytest.approx(1.0)
    # a conversation's samples are left out even when `train` names it by mistake
    held = CONVERSATIONS[0]
    kept = fusion_fit.fold_samples(samples, frozenset(CONVERSATIONS), held)
    assert {s.conversation for s in kept} == set(CONVERSATIONS) - {held}


def _synthetic(seed: int, n_questions: int = 40, rows: int = 60) -> list[fusion_fit.Sample]:
    """Questions whose evidence rows are the only ones with `period` set, and relevance is weak."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_questions):
        x = np.zeros((rows, len(FEATURES)))
        x[:, FEATURES.index("dense")] = rng.normal(size=rows)
        x[:, FEATURES.index("lex")] = rng.normal(size=rows)
        y = np.zeros(rows, bool)
        y[rng.choice(rows, 2, replace=False)] = True
        x[y, FEATURES.index("dense")] += 0.5
        x[y, FEATURES.index("period")] = 1.0
        out.append(fusion_fit.Sample(f"c{i % 4}", "synthetic", RowFeatures(x, np.zeros(rows, bool)), y))
    return out


def test_a_separating_feature_gains_weight_and_unused_features_stay_zero():
    samples = _synthetic(0)
    hand = fusion.hand_weights()
    w = fusion_fit.fit_listwise(samples, use=("dense", "lex", "period"))
    assert w[FEATURES.index("period")] > 2 * hand[FEATURES.index("period")]
    others = [i for i, f in enumerate(FEATURES) if f not in ("dense", "lex", "period")]
    assert not w[others].any()
    pw = fusion_fit.fit_pairwise(samples, use=("dense", "lex", "period"))
    assert pw[FEATURES.index("period")] > hand[FEATURES.index("period")]


def _two_files() -> list[fusion_fit.Sample]:
    """File `a`: evidence marked by `period`; file `b` (twice as many questions): by `speaker`."""
    a = _synthetic(1, n_questions=20)
    b = _synthetic(2, n_questions=40)
    for s in b:
        s.source = "b"
        col = s.features.x[:, FEATURES.index("period")].copy()
        s.features.x[:, FEATURES.index("period")] = 0.0
        s.features.x[:, FEATURES.index("speaker")] = col
    return a + b


def test_file_weights_give_each_file_its_total_shared_by_its_questions():
    samples = _two_files()
    w = fusion_fit.file_weights(samples)
    src = np.array([s.source for s in samples])
    assert w[src == "synthetic"].sum() == pytest.approx(1.0)
    assert w[src == "b"].sum() == pytest.approx(1.0)
    assert w[src == "b"][0] == pytest.approx(w[src == "synthetic"][0] / 2)
    w3 = fusion_fit.file_weights(samples, {"b": 3.0})
    assert w3[src == "b"].sum() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        fusion_fit.file_weights(samples, {"b": -1.0})
    with pytest.raises(ValueError):
        fusion_fit.fit_listwise(samples, weights=np.ones(3))


def test_a_file_weighed_higher_pulls_the_fit_towards_its_signal():
    samples = _two_files()
    use = ("dense", "lex", "period", "speaker")
    period, speaker = FEATURES.index("period"), FEATURES.index("speaker")
    to_a = fusion_fit.fit_listwise(samples, use=use, weights=fusion_fit.file_weights(samples, {"b": 0.1}))
    to_b = fusion_fit.fit_listwise(samples, use=use, weights=fusion_fit.file_weights(samples, {"b": 10.0}))
    assert to_a[period] > to_b[period] and to_b[speaker] > to_a[speaker]
    # unit weights are the unweighted fit
    plain = fusion_fit.fit_listwise(samples, use=use)
    np.testing.assert_allclose(fusion_fit.fit_listwise(samples, use=use, weights=np.ones(60)), plain)


def test_a_fold_leaves_its_conversation_out_of_every_file():
    samples = _two_files()
    assert {s.conversation for s in samples if s.source == "b"} == {s.conversation for s in samples}
    for held, train in fusion_fit.loco_folds(s.conversation for s in samples):
        picked = fusion_fit.fold_samples(samples, train, held)
        assert held not in {s.conversation for s in picked}
        assert {s.source for s in picked} == {"synthetic", "b"}
        assert len(picked) == sum(s.conversation != held for s in samples)
