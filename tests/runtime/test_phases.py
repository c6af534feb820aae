"""Phases of a flow: a nested phase counts only for itself, so the phases add up to the time spent in them."""

from __future__ import annotations

from memstage.runtime import phases as phases_module
from memstage.runtime.phases import Phases, encoder_report


def test_nested_phases_are_exclusive_and_add_up(monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 10.0, 20.0, 21.5])  # a fake clock: no timing in the test

    monkeypatch.setattr(phases_module.time, "perf_counter", lambda: next(clock))
    p = Phases()
    with p.timed("plan"), p.timed("index_builds"):  # plan 0 .. 10, the build inside it 1 .. 4
        pass
    with p.timed("index_builds"):  # 20 .. 21.5
        pass
    assert p.seconds == {"index_builds": 4.5, "plan": 7.0}
    assert list(p.as_dict()) == ["plan", "index_builds"]  # in the flow's order
    assert sum(p.seconds.values()) == 11.5


def test_encoder_report_is_the_difference_over_the_task():
    before = {"texts": 10.0, "encode_s": 1.0, "tokenise_s": 0.5}
    after = {"texts": 30.0, "encode_s": 3.5, "tokenise_s": 1.5}
    report = encoder_report(2, 20, 2.75, before, after)
    assert report == {
        "slot": 2,
        "texts": 20,
        "busy_s": 2.75,
        "encoder": {"texts": 20.0, "encode_s": 2.5, "tokenise_s": 1.0},
    }
    assert encoder_report(1, 0, 0.0, {}, {})["encoder"] == {}  # an encoder never loaded
