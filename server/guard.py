"""What stands between a client and a namespace: API keys, the namespace rule, size limits, error schema.

- `BodyLimit`: ASGI middleware; a body over `max_body_bytes` gets 413 before any parsing (the
  Content-Length is checked first, then the bytes actually sent, so a chunked or lying client
  cannot get more through).
- `authorize`: the bearer key (`Authorization: Bearer msk_...`, as OpenAI clients send it) -> its
  `ApiKey`, else 401. Without a key ring (`memstage serve --insecure-local`) everyone is let in.
- `resolve_namespace`: header and `user` must agree (400), the key must allow it (403), the store
  must hold it (404), in that order, so a key never learns which other namespaces exist.
- `ERROR_RESPONSES`: the OpenAPI documentation of those answers.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from memstage.stores.keys import ALL, ApiKey


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 256 * 1024  # a chat request with history; far above any real question
    max_question_chars: int = 8_000  # the question is embedded and tokenized: bounded work per request
    max_messages: int = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_json(status: int, message: str, code: str) -> dict[str, Any]:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "code": code}}


_ERROR_SCHEMA = {  # the error body, inline (no $ref), so routes of any media type document JSON errors
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {k: {"type": "string"} for k in ("message", "type", "code")},
        }
    },
}


def _doc(text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _doc(
        "no namespace (name it in the X-Memstage-Namespace header or the `user` field), an invalid one, "
        "header and `user` naming different namespaces, an empty question, or a malformed Content-Length"
    ),
    401: _doc("no API key, or an unknown or revoked one (send `Authorization: Bearer <key>`)"),
    403: _doc("the API key may not read this namespace"),
    404: _doc("the store holds no namespace of that name"),
    413: _doc("the body, the question or the number of messages is over the server's limit"),
    422: _doc("the body is not a valid chat completion request"),
}
AUTH_RESPONSES = {401: ERROR_RESPONSES[401]}


class BodyLimit:
    """Pure ASGI middleware: reads at most `limit` bytes of a request body, else answers 413 unread."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _reply(send, 400, "Content-Length is not a number", "invalid_content_length")
            if size > self.limit:
                return await _reply(send, 413, self._too_big(size), "body_too_large")
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                return await _reply(send, 413, self._too_big(total, at_least=True), "body_too_large")
            chunks.append(body)
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict[str, Any]:
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)

    def _too_big(self, size: int, at_least: bool = False) -> str:
        return f"request body of {'at least ' if at_least else ''}{size} bytes is over the {self.limit}-byte limit"


async def _reply(send: Any, status: int, message: str, code: str) -> None:
    body = json.dumps(error_json(status, message, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authorize(keys: Any | None, token: str | None, local_token: str | None = None) -> Any | None:
    """The caller's ApiKey (None when the server runs without keys); 401 for a missing or unknown key.

    `local_token` is the serving process's own secret, written to HOME/serve.json (mode 0600) for the
    data directory's owner: it reads every namespace, like the owner can read the store itself."""
    if keys is None:
        return None
    if local_token and token and hmac.compare_digest(token.encode(), local_token.encode()):
        return ApiKey(id="local", sha256="", namespaces=[ALL], name="serve.json")
    key = keys.lookup(token)
    if key is None:
        raise ApiError(
            401, "a valid API key is required: send `Authorization: Bearer <key>`", "invalid_api_key"
        )
    return key


class KnownNamespaces:
    """Namespaces a store was seen to hold, remembered for `ttl_s`: a request's existence check costs no
    DuckDB connection. Measured: opening one per request was half of `memstage serve`'s CPU per query
    (29 ms, of which retrieval 10), and ran on the event loop, so 32 concurrent clients queued behind it.
    One thread checks a namespace at a time (the others wait for its answer, not open connections of
    their own). A namespace emptied by a forget is unknown again within `ttl_s`; keys are never cached."""

    def __init__(self, ttl_s: float = 30.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._until: dict[tuple[str, str], float] = {}
        self._checking: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def _fresh(self, key: tuple[str, str]) -> bool:
        with self._lock:
            return self._until.get(key, 0.0) > time.monotonic()

    def require(self, store: Any, ns: str) -> None:
        """`store.require_namespace(ns)` (raises NamespaceError), unless it passed less than ttl_s ago."""
        key = (str(store.home), ns)
        if self._fresh(key):
            return
        with self._lock:
            gate = self._checking.setdefault(key, threading.Lock())
        with gate:
            if self._fresh(key):  # another thread's check just passed
                return
            store.require_namespace(ns)
            with self._lock:
                if len(self._until) >= self.max_entries:
                    self._until.clear()
                    self._checking.clear()
                self._until[key] = time.monotonic() + self.ttl_s


known_namespaces = KnownNamespaces()


def resolve_namespace(header: str | None, user: str | None, key: Any | None, store: Any) -> str:
    from memstage.stores.store import NamespaceError, validate_namespace

    if header and user and header != user:
        raise ApiError(
            400,
            "the X-Memstage-Namespace header and the `user` field name different namespaces",
            "namespace_mismatch",
        )
    ns = header or user
    if not ns:
        raise ApiError(
            400,
            "name the memory namespace in the X-Memstage-Namespace header or the `user` field",
            "namespace_missing",
        )
    try:
        validate_namespace(ns)
    except NamespaceError as exc:
        raise ApiError(400, str(exc), "namespace_invalid") from exc
    if key is not None and not key.may_read(ns):
        raise ApiError(403, "this API key may not read that namespace", "namespace_forbidden")
    try:
        known_namespaces.require(store, ns)
    except NamespaceError as exc:  # say only that it is unknown: the list of other tenants stays private
        raise ApiError(404, f"namespace {ns!r} not found", "namespace_not_found") from exc
    return ns


def check_question(question: str, n_messages: int, limits: Limits) -> None:
    if n_messages > limits.max_messages:
        raise ApiError(
            413, f"{n_messages} messages is over the {limits.max_messages}-message limit", "too_many_messages"
        )
    if len(question) > limits.max_question_chars:
        raise ApiError(
            413,
            f"question of {len(question)} characters is over the {limits.max_question_chars}-character limit",
            "question_too_large",
        )
