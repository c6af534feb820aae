"""Prefect artifacts for a run: a table of what each stage did, a short summary in words, a link to the report."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from memstage.settings import get_settings


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list | dict):
        return str(value)[:200]
    return value


def publish(key: str, rows: Sequence[dict[str, Any]], summary: str) -> None:
    """A table artifact of `rows` and a markdown artifact with `summary`; silently skipped outside a run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    table = [{k: _cell(v) for k, v in r.items()} for r in rows]
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
