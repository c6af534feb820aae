"""Forget: per-namespace retention policies (soft, undoable) and hard deletion of a subject's data.

Soft forget archives level-0 memories (status 'archived'; `restore` undoes it from `ops`): those whose
events passed the TTL, those whose retention R = exp(-t / S) fell under `min_retention`, and the
lowest-R ones beyond the namespace's `capacity`. As in MemoryBank, t is the age since the last access
(or the event) in days and the strength S grows with access count and importance.

Hard forget (`forget_hard`, defined in `tasks.forget_hard` and re-exported here) is not undoable: it
deletes the data everywhere, the DuckDB file's free pages included.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from memstage.stores import queries
from memstage.stores.store import MemoryStore, now_utc, validate_namespace
from memstage.tasks.contract import StageResult, commit_memory_changes, make_op, timed
from memstage.tasks.forget_hard import ForgetError, check_selector, forget_hard, matches
from memstage.tasks.index import Embed

__all__ = ["ForgetError", "forget_hard", "forget_soft", "load_policy", "restore", "run_forget", "save_policy"]

POLICY_FILE = "policies.json"
DEFAULT_POLICY: dict[str, Any] = {
    "ttl_days": None,  # events older than this (by event time): their level-0 memories archived
    "ttl_hard": False,  # and, when true, the events and memories hard-deleted instead
    "min_retention": None,  # archive level-0 memories whose retention R falls below this
    "capacity": None,  # at most this many active level-0 memories; the lowest-R beyond it archived
    "strength_days": 30.0,  # S of a never-used memory of importance 0.5
    "clock": "wall",  # "wall", or "latest_event": ages counted from the namespace's newest event (replays)
    # memories flagged instruction-like (tasks.injection) in prompts: "quote" (shown with a warning, the
    # flagged sentences withheld) or "hold" (left out of prompts)
    "flagged": "quote",
}
FLAGGED_CHOICES = ("quote", "hold")
# ---- policies --------------------------------------------------------------------------------


def _policy_path(store: MemoryStore) -> Path:
    return store.home / POLICY_FILE


def load_policy(store: MemoryStore, namespace: str) -> dict[str, Any]:
    """DEFAULT_POLICY, overridden by the file's "default", then by its entry for the namespace."""
    validate_namespace(namespace)
    path = _policy_path(store)
    stored = json.loads(path.read_text()) if path.exists() else {}
    policy = {
        **DEFAULT_POLICY,
        **stored.get("default", {}),
        **stored.get("namespaces", {}).get(namespace, {}),
    }
    unknown = set(policy) - set(DEFAULT_POLICY)
    if unknown:
        raise ForgetError(f"{path}: unknown policy keys {sorted(unknown)}; known: {sorted(DEFAULT_POLICY)}")
    return policy


def save_policy(store: MemoryStore, namespace: str, policy: dict[str, Any]) -> dict[str, Any]:
    validate_namespace(namespace)
    unknown = set(policy) - set(DEFAULT_POLICY)
    if unknown:
        raise ForgetError(f"unknown policy keys {sorted(unknown)}; known: {sorted(DEFAULT_POLICY)}")
    if "flagged" in policy and policy["flagged"] not in FLAGGED_CHOICES:
        raise ForgetError(f"flagged must be one of {FLAGGED_CHOICES}, got {policy['flagged']!r}")
    path = _policy_path(store)
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.setdefault("namespaces", {}).setdefault(namespace, {}).update(policy)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=2, sort_keys=True))
    tmp.replace(path)
    return load_policy(store, namespace)


def retention(m: dict[str, Any], now: datetime, strength_days: float) -> float:
    """Ebbinghaus retention exp(-t/S): t days since last access (or the event), S grows with use and importance."""
    last = m["last_access"] or m["event_time"] or m["created_at"] or now
    t = max((now - last).total_seconds() / 86400.0, 0.0)
    importance = m["importance"] if m["importance"] is not None else 0.5
    s = strength_days * (1 + (m["access_count"] or 0)) * (0.5 + importance)
    return math.exp(-t / s)


# ---- soft forget -----------------------------------------------------------------------------


def _forgettable(store: MemoryStore, namespace: str) -> list[dict[str, Any]]:
    """Active level-0 memories that a policy may archive (pinned ones never)."""
    return [
        m
        for m in store.memories(namespace, level=0, status="active", current=False).to_pylist()
        if not json.loads(m["metadata"] or "{}").get("pinned")
    ]


def policy_reasons(mem: list[dict[str, Any]], policy: dict[str, Any], now: datetime) -> dict[str, str]:
    """{memory id: why the policy forgets it}: TTL first, then retention below the floor, then the
    lowest retention over capacity. Pure: the same memories, policy and clock give the same answer."""
    reasons: dict[str, str] = {}
    if policy["ttl_days"] is not None:
        cutoff = now.timestamp() - float(policy["ttl_days"]) * 86400
        for m in mem:
            if m["event_time"] is not None and m["event_time"].timestamp() < cutoff:
                reasons[m["id"]] = f"TTL: event older than {policy['ttl_days']} days"
    strength = float(policy["strength_days"])
    scored = sorted((retention(m, now, strength), m["id"]) for m in mem if m["id"] not in reasons)
    if policy["min_retention"] is not None:
        for r, mid in scored:
            if r < float(policy["min_retention"]):
                reasons[mid] = f"retention {r:.3f} below {policy['min_retention']}"
    if policy["capacity"] is not None:
        kept = [(r, mid) for r, mid in scored if mid not in reasons]
        excess = len(kept) - int(policy["capacity"])
        for r, mid in kept[: max(excess, 0)]:
            reasons[mid] = f"capacity {policy['capacity']}: among the {excess} lowest retention ({r:.3f})"
    return reasons


def archive_rows(
    namespace: str, by_id: dict[str, dict[str, Any]], reasons: dict[str, str], flow_run_id: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The archived rows and their ops for `reasons` ({id: why}); undoable with `restore`."""
    at = now_utc()
    rows, ops = [], []
    for mid, why in sorted(reasons.items()):
        old = by_id[mid]
        new = {**old, "status": "archived", "updated_at": at}
        rows.append(new)
        ops.append(
            make_op(
                namespace=namespace,
                memory_id=mid,
                stage="forget",
                action="archive",
                before=old,
                after=new,
                reason=why + "; undo with restore",
                flow_run_id=flow_run_id,
                at=at,
            )
        )
    return rows, ops


def run_forget(
    store: MemoryStore,
    namespace: str,
    *,
    now: datetime | None = None,
    embed: Embed | None = None,
    flow_run_id: str | None = None,
) -> StageResult:
    """Apply the namespace's policy: archive what it says to forget (undoable with `restore`)."""
    result = StageResult("forget", namespace)
    with timed(result):
        policy = load_policy(store, namespace)
        if now is None:
            latest = (
                queries.latest_event_time(store, namespace) if policy["clock"] == "latest_event" else None
            )
            now = latest or now_utc()
        if policy["ttl_days"] is not None and policy["ttl_hard"]:
            cutoff = datetime.fromtimestamp(now.timestamp() - float(policy["ttl_days"]) * 86400, now.tzinfo)
            hard = forget_hard(store, namespace, before=cutoff, embed=embed, flow_run_id=flow_run_id)
            result.figures["ttl_hard_deleted"] = hard.changed
        mem = _forgettable(store, namespace)
        rows, ops = archive_rows(
            namespace, {m["id"]: m for m in mem}, policy_reasons(mem, policy, now), flow_run_id
        )
        result.changed = commit_memory_changes(store, rows, ops) + result.figures.get("ttl_hard_deleted", 0)
        result.figures.update({"archived": len(rows), "considered": len(mem), "policy": policy})
    return result


def restore(
    store: MemoryStore, namespace: str, memory_ids: list[str], *, flow_run_id: str | None = None
) -> StageResult:
    """Undo soft forgetting: memories archived by the forget stage become active again, and pinned
    (the policy will not archive them again)."""
    result = StageResult("restore", namespace)
    with timed(result):
        validate_namespace(namespace)
        archived = queries.archived_by_forget(store, namespace, memory_ids)
        at = now_utc()
        rows, ops = [], []
        for old in archived:
            meta = {**json.loads(old["metadata"] or "{}"), "pinned": True}
            new = {**old, "status": "active", "metadata": json.dumps(meta, sort_keys=True), "updated_at": at}
            rows.append(new)
            ops.append(
                make_op(
                    namespace=namespace,
                    memory_id=old["id"],
                    stage="forget",
                    action="restore",
                    before=old,
                    after=new,
                    reason="restored by request; pinned against the policy",
                    flow_run_id=flow_run_id,
                    at=at,
                )
            )
        result.changed = commit_memory_changes(store, rows, ops)
        result.figures = {
            "restored": [r["id"] for r in rows],
            "not_restorable": sorted(set(memory_ids) - {r["id"] for r in rows}),
        }
    return result


def forget_soft(
    store: MemoryStore,
    namespace: str,
    *,
    subject: str | None = None,
    before: datetime | None = None,
    all: bool = False,  # noqa: A002 - mirrors the --all flag
    flow_run_id: str | None = None,
) -> StageResult:
    """Archive the active memories that match (undoable with `restore`); nothing is deleted."""
    validate_namespace(namespace)
    check_selector(subject, before, all)
    result = StageResult("forget.soft", namespace)
    with timed(result):
        mem = store.memories(namespace, status="active", current=False).to_pylist()
        hit = [
            m
            for m in mem
            if all
            or (subject is not None and (matches(m["text"], subject) or matches(m["metadata"], subject)))
            or (before is not None and m["event_time"] is not None and m["event_time"] < before)
        ]
        reasons = {m["id"]: "forgotten by request (soft)" for m in hit}
        rows, ops = archive_rows(namespace, {m["id"]: m for m in hit}, reasons, flow_run_id)
        result.changed = commit_memory_changes(store, rows, ops)
        result.figures = {"archived": len(rows), "undoable": True}
    return result
