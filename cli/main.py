"""The `memstage` command line: parses arguments, runs a command, prints JSON or a person's rendering.

Each command module in COMMAND_MODULES has `register(subparsers)`, which adds its subcommands with
`set_defaults(run=handler, render=renderer)`; a handler takes the parsed args and returns a dict.
With `--json`, stdout carries exactly one JSON object: everything else any library prints is moved
to stderr for the duration of the command. Exit status: 0 done; 2 a user error (one line on stderr,
no traceback); 1 an internal error; a command may set `exit_status` (ingest: 3 when some records
were quarantined).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memstage.runtime import backends as runtime
from memstage.settings import apply_process_defaults, get_settings

COMMAND_MODULES = [
    "memstage.cli.commands",
    "memstage.cli.stage_commands",
    "memstage.cli.ops_commands",
    "memstage.cli.eval_commands",
    "memstage.cli.serve_commands",
    "memstage.cli.keys_commands",
]
# Commands a person waits on: parsed with only their own module, so that a query answered by a warm
# `memstage serve` imports no other command's dependencies (0.9 s of imports for the full parser).
LIGHT_COMMANDS = {"query": "memstage.cli.commands", "retrieve": "memstage.cli.commands"}
# Commands that answer a person: they get settings.SERVING_DEFAULTS (OpenMP threads that do not spin).
SERVING_COMMANDS = ("query", "retrieve", "serve")


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def add_common(p: argparse.ArgumentParser) -> None:
    """Options every command takes (repeated per subcommand so they may follow it)."""
    p.add_argument(
        "--home", type=Path, default=None, help="data directory (default: $MEMSTAGE_HOME or ~/.memstage)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout; logs go to stderr")
    p.add_argument(
        "--runner",
        choices=runtime.RUNNERS,
        default=get_settings().runner,
        help="where tasks run: ray, local (in-process threads), or auto (Ray for batch flows; "
        "for a single query only when RAY_ADDRESS is set)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Ray logs")


def build_parser(modules: list[str] | None = None) -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="memstage",
        description="Long-term memory for LLM agents: ingest, compress, consolidate, update, index, forget, "
        "retrieve and generate, each a Prefect flow run on Ray over a DuckDB store.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules or COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def config_from(args: argparse.Namespace) -> runtime.RuntimeConfig:
    home = (args.home or get_settings().home).expanduser().resolve()
    return runtime.RuntimeConfig(home=home, runner=args.runner)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[Any]:
    """Point fd 1 at stderr (Prefect, Ray and torch all print); yield a stream on the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def quiet_logs(verbose: bool) -> None:
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "sentence_transformers", "ray", "filelock", "urllib3", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    # before any command module imports Prefect, Ray or transformers
    apply_process_defaults(serving=first in SERVING_COMMANDS)
    parser = build_parser([LIGHT_COMMANDS[first]] if first in LIGHT_COMMANDS else None)
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)

    with stdout_to_stderr() as out:
        try:
            result = args.run(args)
        except Exception as exc:  # noqa: BLE001 - a failed flow run: say which, not a traceback wall
            if _is_user_error(exc):
                _error(args, out, exc)
                return 2
            if args.verbose:
                raise
            _error(args, out, exc)
            return 1
        if args.json:
            out.write(json.dumps(result, ensure_ascii=False, default=str) + "\n")
        else:
            render = getattr(args, "render", None)
            out.write((render(result) if render else json.dumps(result, indent=2, default=str)) + "\n")
        out.flush()
    status = getattr(args, "exit_status", None)  # e.g. ingest: 3 when records were quarantined
    return status(result) if status else 0


def _is_user_error(exc: BaseException) -> bool:
    """A problem the user can fix (exit status 2). The store's errors count only if the store module
    was imported at all (a query answered by a service never imports DuckDB)."""
    store = sys.modules.get("memstage.stores.store")
    kinds: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError)
    return isinstance(exc, kinds + ((store.StoreError,) if store else ()))


def _error(args: argparse.Namespace, out: Any, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc)
    if args.json:
        out.write(json.dumps({"error": message}) + "\n")
        out.flush()
    print(f"memstage {args.command}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
