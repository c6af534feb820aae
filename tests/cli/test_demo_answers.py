"""`memstage demo --json`: its answers, read back, name the right person and never loop.

The prompt carries no answer: the test reads what the embedded generator answered from the sample's
memories. The answers are checked for the fact and the person the question is about (Maya, not Sam).
"""

from __future__ import annotations

import re

from conftest import run_json

from memstage.tasks.generate import repeats


def test_demo_answers_the_right_person_without_loops(capfd, tmp_path):
    out = run_json(capfd, "demo", "--home", str(tmp_path / "home"))
    assert out["questions"] and all(set(q) >= {"question", "answer", "memories"} for q in out["questions"])
    answers = {q["question"]: q["answer"] for q in out["questions"]}
    live = answers["Where does Maya live now?"]
    job = answers["What job did Maya start in the spring?"]
    dog = answers["What is the name of Sam's dog?"]
    assert re.search(r"berlin|kreuzberg", live, re.I) and not re.search(r"\bSam('s)?\b", live), live
    assert re.search(r"data engineer|velo", job, re.I) and not re.search(r"\bSam('s)?\b", job), job
    assert "pepper" in dog.lower(), dog
    assert not any(repeats(a) for a in answers.values()), answers
