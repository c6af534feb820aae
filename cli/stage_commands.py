"""The stage commands: run, maintain, history, forget, restore, policy and as-of."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from memstage.cli.main import UserError, add_common, config_from
from memstage.tasks.registry import STAGE_NAMES, STAGES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one maintenance stage as its own flow")
    p.add_argument("stage", choices=STAGE_NAMES, help="; ".join(f"{s.name}: {s.summary}" for s in STAGES))
    p.add_argument("--namespace", default=None, help="one namespace (default: every namespace in the store)")
    add_common(p)
    p.set_defaults(run=cmd_run, render=render_stage)

    p = sub.add_parser("maintain", help=" -> ".join(STAGE_NAMES) + ", as one flow")
    p.add_argument("--namespace", default=None, help="one namespace (default: every namespace in the store)")
    add_common(p)
    p.set_defaults(run=cmd_maintain, render=render_maintain)

    p = sub.add_parser("history", help="the versions and ops of one memory")
    p.add_argument("memory_id")
    p.add_argument("--namespace", default=None, help="only needed if the id exists in several namespaces")
    add_common(p)
    p.set_defaults(run=cmd_history, render=render_history)

    p = sub.add_parser(
        "forget",
        help="apply the namespace's retention policy, or forget a subject / an era / everything "
        "(archived, undoable with restore; with --hard deleted everywhere, NOT undoable)",
    )
    p.add_argument("--namespace", required=True)
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--subject", default=None, help="every memory and event whose text mentions this")
    sel.add_argument("--before", default=None, help="everything that happened before this date (YYYY-MM-DD)")
    sel.add_argument("--all", action="store_true", help="the whole namespace")
    p.add_argument(
        "--hard",
        action="store_true",
        help="delete everywhere: tables, ops text, indexes, DB free pages, what memstage wrote into Prefect; "
        "exit status 4 when the byte check (data directory, Prefect's database) still finds the subject",
    )
    add_common(p)
    p.set_defaults(run=cmd_forget, render=render_stage, exit_status=forget_exit_status)

    p = sub.add_parser("restore", help="undo soft forgetting of memories (from ops)")
    p.add_argument("--namespace", required=True)
    p.add_argument("memory_ids", nargs="+")
    add_common(p)
    p.set_defaults(run=cmd_restore, render=render_stage)

    p = sub.add_parser(
        "policy", help="show or set a namespace's forget policy (stored in HOME/policies.json)"
    )
    p.add_argument("--namespace", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. capacity=500 ttl_days=365")
    add_common(p)
    p.set_defaults(run=cmd_policy, render=None)

    p = sub.add_parser("as-of", help="the memories that were current at a date")
    p.add_argument("date", help="YYYY-MM-DD or an ISO timestamp")
    p.add_argument("--namespace", required=True)
    p.add_argument("--grep", default=None, help="only memories whose text contains this")
    p.add_argument("--level", type=int, default=0)
    add_common(p)
    p.set_defaults(run=cmd_as_of, render=render_as_of)


# ---- handlers -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.flows.stages import run_stage

    return run_stage(args.stage, args.namespace, config_from(args))


def cmd_maintain(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.flows.stages import run_maintain

    return run_maintain(args.namespace, config_from(args))


def cmd_history(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.stores.store import MemoryStore
    from memstage.tasks.history import HistoryError, memory_history

    try:
        return memory_history(MemoryStore(config_from(args).home), args.memory_id, args.namespace)
    except HistoryError as exc:
        raise UserError(str(exc)) from exc


def cmd_forget(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.flows.stages import parse_date, run_forget, run_stage

    config = config_from(args)
    selector: dict[str, Any] = {}
    if args.subject is not None:
        selector["subject"] = args.subject
    elif args.before is not None:
        selector["before"] = parse_date(args.before)
    elif args.all:
        selector["all"] = True
    if not selector:
        if args.hard:
            raise UserError("--hard needs --subject, --before or --all")
        return run_stage("forget", args.namespace, config)
    return run_forget(args.namespace, selector, config, hard=args.hard)


def forget_exit_status(result: dict[str, Any]) -> int:
    """4 when a hard forget's own byte checks still find the subject (data directory, Prefect)."""
    return 4 if result.get("subject_remains") else 0


def cmd_restore(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.flows.stages import run_restore

    return run_restore(args.namespace, args.memory_ids, config_from(args))


def cmd_policy(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.stores.store import MemoryStore
    from memstage.tasks.forget import load_policy, save_policy

    store = MemoryStore(config_from(args).home)
    if not args.set:
        return {"namespace": args.namespace, "policy": load_policy(store, args.namespace)}
    updates = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            updates[key] = json.loads(value)
        except json.JSONDecodeError:
            updates[key] = value
    return {"namespace": args.namespace, "policy": save_policy(store, args.namespace, updates)}


def cmd_as_of(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.flows.stages import parse_date
    from memstage.stores.store import MemoryStore
    from memstage.tasks.update import memories_as_of

    when = parse_date(args.date)
    rows = memories_as_of(
        MemoryStore(config_from(args).home), args.namespace, when, level=args.level
    ).to_pylist()
    if args.grep:
        rows = [r for r in rows if args.grep.lower() in r["text"].lower()]
    keep = ("id", "text", "version", "valid_from", "valid_to", "superseded_by")
    return {
        "namespace": args.namespace,
        "as_of": when,
        "count": len(rows),
        "memories": [{k: r[k] for k in keep} for r in rows],
    }


# ---- renderings for people ----------------------------------------------------------------------


def render_stage(r: dict[str, Any]) -> str:
    if "namespaces" in r and isinstance(r["namespaces"], list):
        return "\n".join(
            [f"{r['stage']}: {r['changed']} changed"] + [render_stage(x) for x in r["namespaces"]]
        )
    figures = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("stage", "namespace", "changed"))
    return f"{r.get('stage')} {r.get('namespace')}: changed {r.get('changed')} ({figures})"


def render_maintain(r: dict[str, Any]) -> str:
    lines = [f"maintain {', '.join(r['namespaces'])} in {r['duration_s']} s"]
    for stage, s in r["stages"].items():
        if s["status"] != "ok":
            lines.append(f"  {stage:12s} FAILED after retry ({s['duration_s']} s): {s['error']}")
        else:
            lines.append(f"  {stage:12s} changed {s['changed']:6d} in {s['duration_s']:8.2f} s")
    return "\n".join(lines)


def render_history(r: dict[str, Any]) -> str:
    lines = [f"memory {r['memory_id']} ({r['namespace']}): {len(r['versions'])} version(s)"]
    for v in r["versions"]:
        until = v["valid_to"] or "now"
        lines.append(
            textwrap.shorten(
                f"  v{v['version']} {v['id']} [{v['valid_from']} .. {until}] {v['status']}: {v['text']}", 200
            )
        )
    lines.append(f"{len(r['ops'])} op(s):")
    for op in r["ops"]:
        lines.append(
            textwrap.shorten(
                f"  {op['at']} {op['stage']}/{op['action']} {op['memory_id']}: {op['reason']}", 200
            )
        )
    return "\n".join(lines)


def render_as_of(r: dict[str, Any]) -> str:
    lines = [f"{r['count']} memories current in {r['namespace']} as of {r['as_of']}:"]
    lines += [textwrap.shorten(f"  v{m['version']} {m['id']}: {m['text']}", 160) for m in r["memories"]]
    return "\n".join(lines)
