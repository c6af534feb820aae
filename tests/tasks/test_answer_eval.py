"""LoCoMo answer F1 as the benchmark computes it, the extractive baseline, and the even question subset."""

from __future__ import annotations

from memstage.tasks.answer_eval import extractive_answer, locomo_f1, spread, summarise_answers, token_f1
from memstage.tasks.evaluate import Question


def test_token_f1_normalises_like_locomo():
    assert token_f1("The Berlin!", "berlin") == 1.0
    assert token_f1("in Kreuzberg, Berlin", "Berlin") == 0.5  # 1 of 2 predicted tokens, all of the gold
    assert token_f1("I don't know.", "Berlin") == 0.0


def test_multi_hop_averages_gold_parts_and_open_domain_keeps_the_first():
    assert locomo_f1("painting, running", "running, painting", 1) == 1.0
    assert locomo_f1("running", "running, painting", 1) == 0.5
    assert locomo_f1("likely yes", "likely yes; she said so", 3) == 1.0


def test_extractive_takes_the_top_memorys_best_sentence():
    retrieval = {
        "question": "Where does Maya live now?",
        "memories": [
            {"text": "Sam: I live in Porto.", "score": 0.2},
            {"text": "Maya: Big news! I live in Kreuzberg now. It is sunny.", "score": 0.9},
        ],
    }
    assert extractive_answer(retrieval) == "I live in Kreuzberg now."
    assert extractive_answer({"question": "q", "memories": []}) == ""


def test_summary_by_category_and_spread():
    rows = [
        {"category": 4, "question": "q", "gold": "a", "answer": "a", "extractive": "b", "f1": 1.0,
         "extractive_f1": 0.0, "unknown": False},
        {"category": 2, "question": "q", "gold": "a", "answer": "I don't know.", "extractive": "a", "f1": 0.0,
         "extractive_f1": 1.0, "unknown": True},
    ]  # fmt: skip
    out = summarise_answers(rows, 1000)
    assert out["f1"] == 0.5 and out["extractive_f1"] == 0.5 and out["unknown_share"] == 0.5
    assert (
        out["by_category"]["single-hop"]["f1"] == 1.0
        and out["by_category"]["temporal"]["extractive_f1"] == 1.0
    )
    qs = [Question(f"ns{i // 10}", f"q{i}", 4, ["D1:1"]) for i in range(50)]
    picked = spread(qs, 5)
    assert [q.question for q in picked] == ["q0", "q10", "q20", "q30", "q40"] and spread(qs, None) == qs


def test_answer_budget_run_reports_what_the_generator_read():
    """`eval locomo --answers`' run at one answer budget: F1 beside the extractive baseline, with the
    prompt sizes and looping answers (a generator that echoes how many memory lines it was shown)."""
    from memstage.cli.eval_answers import _answers_at
    from memstage.gpu.generator import GenerationResult

    class Counting:
        name = "counting"

        def generate(self, messages, *, max_tokens, temperature, on_text=None):
            lines = messages[1]["content"].count("\n[m")
            return GenerationResult(f"Kreuzberg {lines}", 10 * lines, 0, 2, 0.01, 0.02)

    class Retriever:
        def retrieve(self, namespace, question, budget):
            mems = [
                {"memory_id": f"m{i}", "text": f"Maya: I live in Kreuzberg {i}.", "score": 1.0 - i / 10,
                 "tokens": 40, "event_time": None, "level": 0}
                for i in range(6)
            ]  # fmt: skip
            return {"namespace": namespace, "question": question, "memories": mems, "budget": budget}

    qs = [Question("ns", "Where does Maya live?", 4, ["D1:1"], "Kreuzberg")]
    small = _answers_at(Counting(), Retriever(), qs, {"ns": ""}, {"ns": "quote"}, 100)
    large = _answers_at(Counting(), Retriever(), qs, {"ns": ""}, {"ns": "quote"}, 250)
    assert small["examples"][0]["answer"] == "Kreuzberg 2" and large["examples"][0]["answer"] == "Kreuzberg 6"
    assert small["answer_budget"] == 100 and small["generation"]["prompt_tokens_p50"] == 20
    assert small["generation"]["answers_repeating_a_phrase_3_times"] == 0
    assert small["extractive_f1"] == large["extractive_f1"] > 0  # the baseline reads no answer budget
