"""`memstage serve`: start the HTTP app of server/ over this data directory, warm, on loopback by default."""

from __future__ import annotations

import argparse
import secrets
import sys
import threading
import time
from typing import Any

from memstage.server.app import create_app
from memstage.server.guard import Limits


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.cli.main import UserError, config_from
    from memstage.server.local import remove_service_file, write_service_file
    from memstage.stores.keys import KeyRing

    config = config_from(args)
    config.home.mkdir(parents=True, exist_ok=True)
    keys = None if args.insecure_local else KeyRing(config.home)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, not {args.workers}")
    if args.insecure_local and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(
            f"--insecure-local serves every namespace without a key: loopback only, not {args.host}"
        )
    if keys is not None and not keys.entries() and args.worker_fd is None:
        print(
            f"memstage serve: no API keys in {config.home}; /v1 requests get 401 until "
            "`memstage keys add --namespace NS` makes one (or use --insecure-local on loopback)",
            file=sys.stderr,
        )
    # the data directory's owner (who can read HOME/serve.json, mode 0600) queries through this token
    if args.worker_fd is not None:
        from memstage.server.supervisor import read_token

        local_token = read_token()  # the supervisor's, so one serve.json reaches every worker
    else:
        local_token = secrets.token_urlsafe(32)
    if args.workers > 1 and args.worker_fd is None:
        from memstage.server.supervisor import run_supervised

        announce = lambda: write_service_file(config.home, args.host, args.port, token=local_token)  # noqa: E731
        try:
            run_supervised(args, _serve_args(args), local_token, announce)
        finally:
            remove_service_file(config.home)
        return {
            "served": f"http://{args.host}:{args.port}/v1",
            "home": str(config.home),
            "workers": args.workers,
        }
    _serve_process(args, config, keys, local_token)
    return {"served": f"http://{args.host}:{args.port}/v1", "home": str(config.home)}


def _serve_process(args: argparse.Namespace, config: Any, keys: Any, local_token: str) -> None:
    """One server process: the app over warm models, on host:port, or on a supervisor's socket."""
    import uvicorn

    from memstage.runtime.services import services
    from memstage.server.local import remove_service_file, write_service_file

    limits = Limits(max_body_bytes=args.max_body_bytes, max_question_chars=args.max_question_chars)
    svc = services(config, use_ray=False)  # the instance the query flow's tasks use in this process
    app = create_app(
        svc,
        budget=args.budget,
        engine=args.engine,
        keys=keys,
        limits=limits,
        metrics_namespaces=args.metrics_namespaces,
        local_token=local_token,
    )
    where = {"fd": args.worker_fd} if args.worker_fd is not None else {"host": args.host, "port": args.port}
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **where))

    def warm_then_announce() -> None:
        # Load what a query needs before announcing HOME/serve.json (a worker tells its supervisor,
        # which announces once all are warm): `memstage query` finds the server only once a question
        # costs it about a second.
        _warm(svc, args.engine)
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started and args.worker_fd is not None:
            from memstage.server.supervisor import announce_ready

            announce_ready(args.ready_fd)
        elif server.started:
            write_service_file(config.home, args.host, args.port, token=local_token)

    threading.Thread(target=warm_then_announce, name="memstage-warm", daemon=True).start()
    try:
        server.run()
    finally:
        if args.worker_fd is None:
            remove_service_file(config.home)


def _serve_args(args: argparse.Namespace) -> list[str]:
    """The options a worker of `memstage serve --workers N` is started with (the supervisor's own)."""
    out = [
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--budget",
        str(args.budget),
        "--runner",
        args.runner,
    ]
    out += [
        "--max-body-bytes",
        str(args.max_body_bytes),
        "--max-question-chars",
        str(args.max_question_chars),
    ]
    out += ["--engine", args.engine] if args.engine else []
    out += ["--home", str(args.home)] if args.home else []
    flags = {"--insecure-local": args.insecure_local, "--metrics-namespaces": args.metrics_namespaces}
    return out + [flag for flag, on in flags.items() if on] + (["--verbose"] if args.verbose else [])


def _warm(svc: Any, engine: str | None) -> None:
    import logging
    import os

    from memstage.settings import get_settings

    try:
        svc.warm(generator=engine or get_settings().generator)
        if os.environ.get("PREFECT_API_URL"):
            import memstage.flows.query  # noqa: F401 - Prefect's import, paid before the first query
    except Exception as exc:  # noqa: BLE001 - an empty store or a missing model: the first query says why
        logging.getLogger("memstage").warning("warming the query models failed: %s", exc)


def register(sub: argparse._SubParsersAction) -> None:
    from memstage.cli.main import add_common

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible chat endpoint that answers with a namespace's memory"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--budget", type=int, default=1000, help="evidence tokens per answer (default 1000)")
    p.add_argument("--engine", default=None, help="generator engine: transformers (default), openai, vllm")
    p.add_argument(
        "--insecure-local",
        action="store_true",
        help="serve without API keys: any client reads any namespace (loopback hosts only)",
    )
    p.add_argument(
        "--metrics-namespaces", action="store_true", help="label /metrics gauges with namespace names"
    )
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="larger bodies get 413")
    p.add_argument(
        "--max-question-chars", type=int, default=Limits.max_question_chars, help="longer questions get 413"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the one port (default 1); each loads its own models: memory x N. "
        "One process uses about one core, so more answer more concurrent clients on a many-core host",
    )
    p.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)  # a worker's socket
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # ... and its ready pipe
    add_common(p)
    p.set_defaults(run=cmd_serve)
