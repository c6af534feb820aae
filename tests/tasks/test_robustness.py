"""The robustness variants (tasks/robustness.py) on a tiny two-conversation file, and the as-of dates
they rely on: parsing, the known-by mask, relative periods resolved against the question's day."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import numpy as np
import pytest

from memstage.tasks.as_of import known_mask, parse_as_of
from memstage.tasks.evaluate import load_questions
from memstage.tasks.robustness import (
    PAD_TURNS,
    make_variant,
    relative_question,
    session_time,
    sessions,
    write_variants,
)
from memstage.tasks.scoring import question_periods, relative_periods


def _conversation(sample_id: str, a: str, b: str, month: int, n_sessions: int = 3) -> dict:
    conv = {"speaker_a": a, "speaker_b": b}
    for s in range(1, n_sessions + 1):
        conv[f"session_{s}_date_time"] = f"10:00 am on {s * 3} {date(2023, month, 1):%B}, 2023"
        conv[f"session_{s}"] = [
            {
                "speaker": a if t % 2 else b,
                "dia_id": f"D{s}:{t}",
                "text": f"{a} and {b} talk {s}.{t} about {sample_id}",
            }
            for t in range(1, 5)
        ]
    qa = [
        {
            "question": f"What did {a} say in {date(2023, month, 1):%B} 2023?",
            "evidence": ["D2:1"],
            "category": 2,
        },
        {"question": f"What does {b} like?", "evidence": ["D1:2; D3:4"], "category": 1},
        {"question": "Unanswerable?", "evidence": ["D1:1"], "category": 5},
    ]
    return {"sample_id": sample_id, "conversation": conv, "qa": qa}


@pytest.fixture
def samples():
    return [_conversation("c1", "Ann", "Bob", 5), _conversation("c2", "Cleo", "Dan", 8, n_sessions=4)]


def _turns(sample: dict) -> list[dict]:
    conv = sample["conversation"]
    return [t for n in sessions(conv) for t in conv[f"session_{n}"]]


def _evidence_texts(samples: list[dict]) -> dict:
    return {
        (s["sample_id"], t["dia_id"]): t["text"]
        for s in samples
        for t in _turns(s)
        if t["dia_id"].startswith("D")
    }


def test_every_variant_keeps_questions_and_evidence_resolvable(samples, tmp_path):
    src = tmp_path / "src.json"
    src.write_text(json.dumps(samples))
    base = load_questions(src)
    written = write_variants(src, tmp_path / "variants", seed=3)
    assert set(written) == {"speakers", "padded", "dated", "long", "assistant", "ontopic"}
    for name, path in written.items():
        qs = load_questions(path)
        assert [q.evidence for q in qs.items] == [q.evidence for q in base.items], name
        assert qs.dropped_ids == [] and qs.without_evidence == 0, name
    assert json.loads(src.read_text()) == samples  # the source file is untouched


def test_speakers_are_user_and_assistant_in_the_fields_only(samples):
    out = make_variant(samples, "speakers")
    for before, after in zip(samples, out, strict=True):
        assert {t["speaker"] for t in _turns(after)} == {"user", "assistant"}
        assert [t["text"] for t in _turns(after)] == [t["text"] for t in _turns(before)]
        assert after["qa"] == before["qa"]
    assert samples[0]["conversation"]["speaker_a"] == "Ann"  # a copy, not the caller's data


def test_padding_adds_foreign_sessions_spoken_by_the_same_people(samples):
    out = make_variant(samples, "padded", seed=1)
    for before, after in zip(samples, out, strict=True):
        conv, own = after["conversation"], sessions(before["conversation"])
        added = [n for n in sessions(conv) if n not in own]
        n_own, n_added = len(_turns(before)), sum(len(conv[f"session_{n}"]) for n in added)
        foreign = sum(len(_turns(s)) for s in samples if s is not before)
        assert n_added >= min(max(PAD_TURNS - n_own, n_own), foreign)  # bounded by what the others hold
        names = {conv["speaker_a"], conv["speaker_b"]}
        times = [session_time(before["conversation"], n) for n in own]
        for n in added:
            assert min(times) <= session_time(conv, n) <= max(times)
            for k, turn in enumerate(conv[f"session_{n}"], 1):
                assert turn["speaker"] in names and turn["dia_id"] == f"D{n}:{k}"
                other = {"Ann", "Bob", "Cleo", "Dan"} - names
                assert not any(o in turn["text"] for o in other)
        for n in own:  # the history itself is as it was
            assert conv[f"session_{n}"] == before["conversation"][f"session_{n}"]


def test_dated_questions_are_asked_after_their_evidence_and_said_relative_to_it(samples):
    out = make_variant(samples, "dated", seed=2)
    for after in out:
        conv = after["conversation"]
        for qa in after["qa"]:
            asked = date.fromisoformat(qa["question_date"])
            sessions_of = {int(e.split(":")[0][1:]) for ev in qa["evidence"] for e in ev.split("; ")}
            assert asked >= max(session_time(conv, n).date() for n in sessions_of)
    q = out[0]["qa"][0]
    assert "2023" not in q["question"] and "2023" in q["question_absolute"]
    # the relative phrase resolves (in the scorer) to a period holding the original one
    (lo, hi) = relative_periods(q["question"], date.fromisoformat(q["question_date"]))[0]
    assert lo <= date(2023, 5, 6) <= hi


def test_long_variant_makes_the_assistant_side_long_and_keeps_its_words(samples):
    out = make_variant(samples, "long", seed=4)
    for before, after in zip(samples, out, strict=True):
        b = before["conversation"]["speaker_b"]
        for t0, t1 in zip(_turns(before), _turns(after), strict=True):
            if t0["speaker"] == b:
                assert t0["text"] in t1["text"] and len(t1["text"].split()) >= 150
            else:
                assert t1 == t0


def test_assistant_variant_is_padded_long_and_user_assistant(samples):
    out = make_variant(samples, "assistant", seed=5)
    for before, after in zip(samples, out, strict=True):
        turns = _turns(after)
        assert {t["speaker"] for t in turns} == {"user", "assistant"}
        own = sessions(before["conversation"])
        assert len(sessions(after["conversation"])) > len(own)  # distractor sessions added
        assert len(turns) >= min(PAD_TURNS, sum(len(_turns(s)) for s in samples))
        for t in turns:  # every assistant turn long, the user's as they were
            assert (len(t["text"].split()) >= 150) == (t["speaker"] == "assistant")
        for t0, t1 in zip(_turns(before), turns, strict=False):  # the history's own turns come first
            assert t0["dia_id"] == t1["dia_id"] and t0["text"] in t1["text"]
        assert after["qa"] == before["qa"]


def test_ontopic_variant_fills_the_assistant_turns_from_their_own_session(samples):
    out = make_variant(samples, "ontopic", seed=6)
    for before, after in zip(samples, out, strict=True):
        conv = after["conversation"]
        assert len(sessions(conv)) > len(sessions(before["conversation"]))  # padded as `assistant`
        evidence = {e for q in before["qa"] for e in q["evidence"]}
        own = {t["dia_id"]: t["text"] for t in _turns(before)}
        for t in _turns(before):
            n = int(t["dia_id"][1:].split(":")[0])
            session = conv[f"session_{n}"]
            new = next(u for u in session if u["dia_id"] == t["dia_id"])
            assert t["text"] in new["text"]  # every turn keeps its own words whole
            if new["speaker"] != "assistant":
                assert new["text"] == t["text"]
                continue
            fillers = [own[u["dia_id"]] for u in session if u["dia_id"] != t["dia_id"]]
            assert any(f in new["text"] for f in fillers)  # filled with this session's own talk
            for e in evidence - {t["dia_id"]}:  # never with a question's evidence
                assert e not in own or not e.startswith(f"D{n}:") or own[e] not in new["text"]
        assert after["qa"] == before["qa"]


def test_variants_are_deterministic_for_a_seed(samples):
    for name in ("padded", "dated", "long", "assistant", "ontopic"):
        assert make_variant(samples, name, seed=7) == make_variant(samples, name, seed=7)
        assert make_variant(samples, name, seed=7) != make_variant(samples, name, seed=8), name
    with pytest.raises(ValueError, match="unknown variant"):
        make_variant(samples, "shouting")


def test_parse_as_of_forms_and_errors():
    end_of_day = datetime(2023, 5, 30, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_as_of("2023-05-30") == end_of_day
    assert parse_as_of("2023/05/30 (Tue) 23:40") == datetime(2023, 5, 30, 23, 40, tzinfo=UTC)
    assert parse_as_of("2023/05/30") == end_of_day
    assert parse_as_of("1:56 pm on 8 May, 2023") == datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
    assert parse_as_of("2023-05-30T10:00:00+02:00") == datetime(2023, 5, 30, 8, 0, tzinfo=UTC)
    assert parse_as_of(None) is None and parse_as_of(" ") is None
    for bad in ("last tuesday", "2023-13-40", 20230530):
        with pytest.raises(ValueError):
            parse_as_of(bad)


def test_known_mask_keeps_undated_memories_and_drops_later_ones():
    times = np.array(
        ["2023-05-01T10:00", "NaT", "2023-05-30T23:00", "2023-05-31T00:00"], dtype="datetime64[us]"
    )
    assert known_mask(times, parse_as_of("2023-05-30")).tolist() == [True, True, True, False]
    assert known_mask(times, None).all()


def test_relative_periods_match_the_rewritten_questions():
    asked = date(2023, 11, 5)
    cases = {
        "What did Mel do in October 2023?": date(2023, 10, 14),
        "What did Gina find on 1 February, 2023?": date(2023, 2, 1),
        "What did Maria say on October 13, 2023?": date(2023, 10, 13),
        "How often did Tim run in 2022?": date(2022, 6, 1),
    }
    for question, when in cases.items():
        relative = relative_question(question, asked)
        assert relative != question and not question_periods(relative), relative
        assert any(lo <= when <= hi for lo, hi in relative_periods(relative, asked)), relative
    assert relative_question("When did Mel go camping in June?", asked) == "When did Mel go camping in June?"
    assert relative_periods("what happened last month", None) == []


def test_eval_variants_reports_each_variant_beside_the_file(samples, tmp_path):
    """`memstage eval locomo PATH --variants all`'s wiring: every variant evaluated from a generated
    file, reported under `variants` with memstage minus the file's recall, and a table for each.
    The evaluation itself is stood in for (it is measured end to end by test_evaluate's contract test
    and bench/robustness.py): here it reports the file's question count and dated questions."""
    from memstage.cli.eval_commands import recall_table, render_eval, write_plot
    from memstage.cli.eval_variants import evaluate_variants, resolve_variants

    seen = []

    def evaluate(path, **options):
        seen.append((path, options))
        qs = load_questions(path)
        share = sum(q.as_of is not None for q in qs.items) / len(qs.items)
        rec = {"250": 0.5 + share / 10, "1000": 0.8}
        cats = {b: {"multi-hop": v, "temporal": v} for b, v in rec.items()}
        base = {
            "recall": rec,
            "by_category": cats,
            "tokens": {},
            "latency_ms": {},
            "questions": len(qs.items),
        }
        lat = {b: {"p50": 1.0, "p95": 2.0} for b in rec}
        return {
            **base,
            "tokens": {b: 100.0 for b in rec},
            "latency_ms": lat,
            "baselines": {"rrf": {**base, "recall": {"250": 0.4, "1000": 0.7}}},
            "conversations": 2,
            "evidence_dropped": 0,
            "evidence_dropped_ids": [],
            "questions_without_evidence": 0,
            "questions_dated": round(share * len(qs.items)),
        }

    src = tmp_path / "src.json"
    src.write_text(json.dumps(samples))
    report = evaluate_variants(
        src, resolve_variants(["all"]), evaluate, seed=1, budgets=(250, 1000), plot=None
    )
    assert list(report["variants"]) == ["speakers", "padded", "dated", "long", "assistant", "ontopic"]
    assert report["variants"]["dated"]["minus_dev"] == {"250": 0.1, "1000": 0.0}
    assert report["variants"]["speakers"]["minus_dev"] == {"250": 0.0, "1000": 0.0}
    assert seen[0] == (src, {"budgets": (250, 1000), "plot": None})
    assert all(opts["exhaustive"] is False and opts["home"] is None for _, opts in seen[1:])
    text = render_eval(report)
    assert text.count("variant ") == 6 and "dated memstage" in text and "+0.100" in text
    assert recall_table(report)[1].startswith("memstage")
    png = write_plot(report, tmp_path / "recall.png")  # recall by budget, and per category beside it
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert resolve_variants(None) == () and resolve_variants(["long", "speakers"]) == ("speakers", "long")
    with pytest.raises(ValueError, match="unknown variant"):
        resolve_variants(["noisy"])
