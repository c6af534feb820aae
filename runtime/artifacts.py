"""Prefect artifacts for a run: a table of what each stage did, a short summary in words, a link to the report.

No memory text goes to Prefect by default: `publish` drops the TEXT_KEYS columns (memory text,
questions, answers, quarantine reasons) and the caller's `text_summary`, keeping ids, counts and
scores. With MEMSTAGE_ARTIFACT_TEXT=1 the operator opts in to both; what was written then is what a
hard forget must chase through Prefect's API (runtime/prefect_scrub.py). docs/stages.md has the design.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from memstage.settings import get_settings


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def namespaces_label(namespaces: Sequence[str], *, most: int = 3) -> str:
    """'demo', 'alice, bob' or '12 namespaces': how run names and artifact keys name what a run covered."""
    names = list(namespaces)
    if not names:
        return "no namespaces"
    return ", ".join(names) if len(names) <= most else f"{len(names)} namespaces"


def run_key(what: str, namespaces: Sequence[str]) -> str:
    """A stable, readable artifact key: 'maintain-demo', 'compress-12-namespaces' (one per kind of run and
    tenant set, so the Artifacts page lists what each did last instead of one card per run id)."""
    return artifact_key(what, namespaces_label(namespaces, most=1))


def figures_text(rows: Sequence[dict[str, Any]], skip: Sequence[str] = ()) -> str:
    """'archived=2, merged=0': the numeric figures of some stage rows, summed over namespaces."""
    totals: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
    return ", ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in totals.items())


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list | dict):
        return str(value)[:200]
    return value


TEXT_KEYS = frozenset({"text", "question", "answer", "quarantine_reasons", "evidence"})


def publish(
    key: str, rows: Sequence[dict[str, Any]], summary: str, *, text_summary: str | None = None
) -> None:
    """A table artifact of `rows` and a markdown artifact with `summary`; silently skipped outside a run.

    `summary` must hold no memory text (ids, counts, names of files and namespaces); `text_summary`
    (a question and its answer, say) is prepended only when the operator opted in to text."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    text_ok = get_settings().artifact_text
    if text_ok and text_summary:
        summary = f"{text_summary}\n\n{summary}"
    table = [{k: _cell(v) for k, v in r.items() if text_ok or k not in TEXT_KEYS} for r in rows]
    if table:  # nothing done (an empty store): the summary says so, no empty table
        create_table_artifact(
            table=table, key=artifact_key(key), description=summary.splitlines()[0] if summary else None
        )
    create_markdown_artifact(
        markdown=summary, key=artifact_key(key, "summary"), description="what this run did"
    )
    report = get_settings().report_url  # where `memstage report` output is published, if anywhere
    if report:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(
            link=report, link_text="memstage report (plots over time)", key="memstage-report"
        )
