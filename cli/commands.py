"""The foundation's commands: ingest, retrieve, query, stats and demo."""

from __future__ import annotations

import argparse
import textwrap
from importlib import resources
from pathlib import Path
from typing import Any

from memstage.cli.main import UserError, add_common, config_from
from memstage.defaults import DEFAULT_BUDGET, FORMATS

DEMO_QUESTIONS = [
    "Where does Maya live now?",
    "What job did Maya start in the spring?",
    "What is the name of Sam's dog?",
]


INGEST_EXIT_CODES = """exit status:
  0  every record stored (or already stored)
  3  the run completed, but some records were quarantined (`memstage stats` counts them)
  2  user error: missing file, a directory, unknown or unreadable format, bad namespace; printed
     as one line, no traceback, before Prefect or Ray start
  1  internal error"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest a file of turns or documents, then index it",
        description="Ingest a file of turns or documents, then index it.",
        epilog=INGEST_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", type=Path, help="the file: .jsonl, LoCoMo .json or .parquet")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: from the file)")
    p.add_argument(
        "--namespace",
        default=None,
        help="jsonl/parquet: namespace of records that name none; locomo: prefix of each conversation's namespace",
    )
    add_common(p)
    p.set_defaults(run=cmd_ingest, render=render_ingest, exit_status=ingest_exit_status)

    for name, helptext, handler, renderer in (
        (
            "retrieve",
            "print the evidence for a question that fits the token budget",
            cmd_retrieve,
            render_retrieve,
        ),
        ("query", "retrieve evidence and answer the question with the generator", cmd_query, render_query),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("question")
        p.add_argument("--namespace", required=True, help="whose memory to search (one tenant)")
        p.add_argument(
            "--budget", type=int, default=DEFAULT_BUDGET, help=f"token budget (default {DEFAULT_BUDGET})"
        )
        p.add_argument(
            "--no-service",
            action="store_true",
            help="answer in this process even when a `memstage serve` of this data directory is running",
        )
        p.add_argument(
            "--as-of",
            default=None,
            metavar="DATE",
            help="when the question is asked (YYYY-MM-DD or an ISO 8601 time): later memories are left "
            'out, and relative periods ("last month", "two weeks ago") resolve against it',
        )
        if name == "query":
            p.add_argument(
                "--engine",
                default=None,
                choices=("transformers", "openai", "vllm"),
                help="generator engine (default: $MEMSTAGE_GENERATOR, else transformers)",
            )
        add_common(p)
        p.set_defaults(run=handler, render=renderer)

    p = sub.add_parser("stats", help="rows per table and memories per level")
    p.add_argument("--namespace", default=None)
    add_common(p)
    p.set_defaults(run=cmd_stats, render=render_stats)

    p = sub.add_parser(
        "demo", help="ingest the bundled sample conversation, ask questions, show evidence and answers"
    )
    add_common(p)
    p.set_defaults(run=cmd_demo, render=render_demo)


# ---- handlers -----------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.stores.store import NamespaceError, validate_namespace
    from memstage.tasks.ingest import IngestError, check_input

    try:  # everything a user can get wrong, before Prefect or Ray start (seconds) and without a traceback
        check_input(args.path, args.format)
        if args.namespace is not None:
            validate_namespace(args.namespace)
    except (IngestError, NamespaceError) as exc:
        raise UserError(str(exc)) from None
    from memstage.flows.ingest import run_ingest

    try:
        return run_ingest(
            args.path, args.format, args.namespace, config_from(args), show_progress=not args.json
        )
    except IngestError as exc:
        raise UserError(str(exc)) from exc


def ingest_exit_status(result: dict[str, Any]) -> int:
    return 3 if result.get("quarantined") else 0


def cmd_retrieve(args: argparse.Namespace) -> dict[str, Any]:
    return _query(args, answer=False)


def cmd_query(args: argparse.Namespace) -> dict[str, Any]:
    return _query(args, answer=True)


def _query(args: argparse.Namespace, *, answer: bool) -> dict[str, Any]:
    """Warm: the `memstage serve` of this data directory answers (models loaded, ~1 s). Cold: this
    process loads them, as a Prefect flow run when PREFECT_API_URL is set, else without Prefect."""
    import os
    import sys

    from memstage.server.local import ServiceError, ask, find_service

    as_of = None
    if args.as_of is not None:  # its module imports numpy: only when asked (the warm path's start-up)
        from memstage.tasks.as_of import parse_as_of

        try:
            as_of = parse_as_of(args.as_of)
        except ValueError as exc:
            raise UserError(f"--as-of: {exc}") from None
        as_of = as_of.isoformat() if as_of else None
    config = config_from(args)
    engine = getattr(args, "engine", None)
    service = None if args.no_service else find_service(config.home)
    if service is not None:
        payload = {"question": args.question, "namespace": args.namespace, "budget": args.budget}
        payload.update(answer=answer, engine=engine, as_of=as_of)
        try:
            result = ask(service, payload)
        except ServiceError as exc:
            if exc.status in (400, 404, 413, 422):
                raise UserError(exc.args[0]) from None
            print(f"memstage: the service at {service['url']} refused ({exc.status}: {exc}); "
                  "answering in this process", file=sys.stderr)  # fmt: skip
        except OSError as exc:
            print(f"memstage: no answer from the service at {service['url']} ({exc}); "
                  "answering in this process", file=sys.stderr)  # fmt: skip
        else:
            _say_warm(service, result)
            return result
    api = os.environ.get("PREFECT_API_URL")
    print(
        f"memstage: cold query: no `memstage serve` running for {config.home}, so this process loads the "
        "models and indexes first (seconds; a running `memstage serve` keeps them loaded); "
        + (f"the run goes to the Prefect server at {api}" if api else
           "no PREFECT_API_URL, so no Prefect server is started: the run is recorded in the store "
           "(memstage report) only"),
        file=sys.stderr,
    )  # fmt: skip
    if api or config.use_ray(batch=False):
        from memstage.flows.query import run_query

        return run_query(
            args.question, args.namespace, args.budget, config, engine=engine, answer=answer, as_of=as_of
        )
    from memstage.flows.query_steps import run_plain
    from memstage.stores.store import MemoryStore

    MemoryStore(config.home).require_namespace(args.namespace)
    return run_plain(
        args.question, args.namespace, args.budget, config, engine=engine, answer=answer, as_of=as_of
    )


def _say_warm(service: dict[str, Any], result: dict[str, Any]) -> None:
    import os
    import sys

    served = result.get("served") or {}
    where = (
        f"the Prefect run {served['flow_run_id']}"
        if served.get("flow_run_id")
        else f"a Prefect flow run at {served.get('prefect_api_url')}, written after the answer"
        if served.get("flow_run")
        else "the store's runs"
    )
    print(f"memstage: answered by the warm service at {service['url']} (pid {service['pid']}); "
          f"recorded in {where}", file=sys.stderr)  # fmt: skip
    api = os.environ.get("PREFECT_API_URL")
    if api and served.get("prefect_api_url") != api:
        print(f"memstage: note: the service reports to {served.get('prefect_api_url') or 'no Prefect server'}, "
              f"not {api}: restart `memstage serve` with this PREFECT_API_URL to see its runs there",
              file=sys.stderr)  # fmt: skip


def cmd_stats(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.stores import queries
    from memstage.stores.store import MemoryStore

    store = MemoryStore(config_from(args).home)
    namespaces = [args.namespace] if args.namespace else store.namespaces()
    return {
        "home": str(store.home),
        "total": store.counts(args.namespace),
        "namespaces": {ns: store.counts(ns) for ns in namespaces},
        # instruction-like memories (tasks.injection): what the prompt quotes with a warning or holds out
        "flagged_memories": [
            {**r, "event_time": str(r["event_time"]) if r["event_time"] else None, "text": r["text"][:200]}
            for r in queries.flagged_memories(store, args.namespace, limit=20).to_pylist()
        ],
    }


def sample_path() -> Path:
    return Path(str(resources.files("memstage.cli") / "samples" / "sample_conversation.jsonl"))


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.flows.ingest import run_ingest
    from memstage.flows.query import run_query

    config = config_from(args)
    ingested = run_ingest(sample_path(), "jsonl", None, config, show_progress=not args.json)
    answers = [run_query(q, "demo", 400, config) for q in DEMO_QUESTIONS]
    return {"home": str(config.home), "ingest": ingested, "questions": answers}


# ---- renderings for people ----------------------------------------------------------------------


def render_ingest(r: dict[str, Any]) -> str:
    lines = [
        f"ingested {r['records']} records in {r['duration_s']} s ({r['turns_per_s']} turns/s, runner: {r['runner']}):",
        f"  {r['events_new']} new events, {r['events_already_stored']} already stored, {r['quarantined']} quarantined",
    ]
    lines += [f"  ! {reason}" for reason in r["quarantine_reasons"][:10]]
    for ns, f in r["indexed"].items():
        lines.append(
            f"  {ns}: {f['level0_created']} new memories, {f['embedded']} embedded, {f['memories_indexed']} indexed"
        )
    return "\n".join(lines)


def _evidence(r: dict[str, Any]) -> list[str]:
    lines = [
        f"{len(r['memories'])} memories, {r['tokens']}/{r['budget']} tokens, {r.get('latency_ms', '?')} ms:"
    ]
    for m in r["memories"]:
        tag = ",".join(m["dia_ids"]) or m["memory_id"][:12]
        lines.append(textwrap.shorten(f"  [{tag} L{m['level']}] {m['text']}", width=160))
    return lines


def render_retrieve(r: dict[str, Any]) -> str:
    return "\n".join([f"Q: {r['question']}", *_evidence(r)])


def render_query(r: dict[str, Any]) -> str:
    u = r.get("usage", {})
    return "\n".join(
        [
            f"Q: {r['question']}",
            f"A: {r.get('answer', '')}",
            f"   ({u.get('prompt_tokens', '?')} prompt tokens, {u.get('cached_tokens', 0)} cached, "
            f"first token {u.get('ttft_ms', '?')} ms, total {r.get('total_ms', '?')} ms)",
            *_evidence(r)[:6],
        ]
    )


def render_stats(r: dict[str, Any]) -> str:
    lines = [f"data directory: {r['home']}"]
    for ns, c in r["namespaces"].items():
        levels = ", ".join(f"{k}: {v}" for k, v in c["memories_by_level"].items())
        lines.append(
            f"  {ns}: {c['events']} events, {c['memories']} memories ({levels}), {c['quarantine']} quarantined, "
            f"{c.get('flagged', 0)} flagged instruction-like"
        )
    for f in r.get("flagged_memories", []):
        lines.append(
            textwrap.shorten(
                f"  ! flagged [{f['namespace']} {f['id']} L{f['level']} {f['flag']}] {f['text']}", 160
            )
        )
    t = r["total"]
    lines.append(
        f"  total: {t['events']} events, {t['memories']} memories, {t['ops']} ops, {t['quarantine']} quarantined"
    )
    return "\n".join(lines)


def render_demo(r: dict[str, Any]) -> str:
    parts = [render_ingest(r["ingest"]), ""]
    for q in r["questions"]:
        parts += [render_query(q), ""]
    parts.append(
        f'data directory: {r["home"]} — try: memstage query "..." --namespace demo --home {r["home"]}'
    )
    return "\n".join(parts)
