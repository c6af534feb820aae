"""`memstage keys add|list|revoke`: the API keys `memstage serve` accepts, and the namespaces each may read.

Keys are stored hashed in HOME/api_keys.json (stores/keys.py); `add` prints the key once.
"""

from __future__ import annotations

import argparse
from typing import Any

from memstage.cli.main import UserError, add_common, config_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="API keys for `memstage serve`: add, list, revoke")
    keys_sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    a = keys_sub.add_parser("add", help="make a key that may read the given namespaces (printed once)")
    a.add_argument("--namespace", action="append", default=[], help="a namespace it may read (repeatable)")
    a.add_argument("--all-namespaces", action="store_true", help="it may read every namespace")
    a.add_argument("--name", default="", help="a label for `keys list`")
    add_common(a)
    a.set_defaults(run=cmd_add, render=render_add, command="keys add")

    ls = keys_sub.add_parser(
        "list", help="the keys (ids, names, namespaces, revoked), never the keys themselves"
    )
    add_common(ls)
    ls.set_defaults(run=cmd_list, render=render_list, command="keys list")

    r = keys_sub.add_parser("revoke", help="revoke a key by its id (a running server stops accepting it)")
    r.add_argument("key_id")
    add_common(r)
    r.set_defaults(run=cmd_revoke, render=None, command="keys revoke")


def _ring(args: argparse.Namespace) -> Any:
    from memstage.stores.keys import KeyRing

    return KeyRing(config_from(args).home)


def cmd_add(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.stores.keys import ALL, KeyRingError
    from memstage.stores.store import NamespaceError

    if args.all_namespaces == bool(args.namespace):
        raise UserError("give --namespace NS (repeatable) or --all-namespaces")
    try:
        key, entry = _ring(args).add([ALL] if args.all_namespaces else args.namespace, args.name)
    except (KeyRingError, NamespaceError) as exc:
        raise UserError(str(exc)) from None
    return {"key": key, **entry.public()}


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    return {"keys": [k.public() for k in _ring(args).entries()]}


def cmd_revoke(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.stores.keys import KeyRingError

    try:
        return _ring(args).revoke(args.key_id).public()
    except KeyRingError as exc:
        raise UserError(str(exc)) from None


def render_add(r: dict[str, Any]) -> str:
    return (
        f"{r['key']}\n(id {r['id']}, reads {', '.join(r['namespaces'])}; shown once: only its hash is stored)"
    )


def render_list(r: dict[str, Any]) -> str:
    if not r["keys"]:
        return "no keys"
    return "\n".join(
        f"{k['id']}  {'revoked ' + k['revoked_at'] if k['revoked_at'] else 'active'}  "
        f"{', '.join(k['namespaces'])}  {k['name']}  (created {k['created_at']})"
        for k in r["keys"]
    )
