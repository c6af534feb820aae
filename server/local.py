"""How a `memstage` command finds the warm `memstage serve` of its data directory, and asks it (stdlib only).

`memstage serve` writes HOME/serve.json (its URL and process id, mode 0600) once it listens, and
removes it when it stops. `memstage query` and `memstage retrieve` read it: when the process is
alive they POST the question to its `/memstage/query` route, which answers from models and indexes
already loaded, in about a second; otherwise the command loads what it needs itself (cold). This
module imports nothing heavy, so the warm path costs the command line about 0.2 s of start-up.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from memstage.settings import get_settings

SERVICE_FILE = "serve.json"
QUERY_ROUTE = "/memstage/query"


class ServiceError(Exception):
    """The service answered, with an error the user should see (bad namespace, bad question)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # a wildcard bind is reached on loopback


def write_service_file(home: Path, host: str, port: int, token: str | None = None) -> Path:
    """Record that this process serves `home` at host:port (read by `find_service`), with the token
    its owner's commands authenticate with (the file is mode 0600)."""
    path = Path(home) / SERVICE_FILE
    info = {
        "token": token,
        "url": f"http://{_client_host(host)}:{port}",
        "pid": os.getpid(),
        "home": str(home),
        "started_at": time.time(),
    }
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)
    return path


def remove_service_file(home: Path) -> None:
    """Remove HOME/serve.json if it is this process's (a second serve on another port may own it)."""
    path = Path(home) / SERVICE_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def find_service(home: Path) -> dict[str, Any] | None:
    """The service recorded for `home` if its process is alive, else None (no file, or a stale one)."""
    try:
        info = json.loads((Path(home) / SERVICE_FILE).read_text())
        pid, url = int(info["pid"]), str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not url.startswith("http://"):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's: its port may still answer us
        pass
    return info


def ask(service: dict[str, Any], payload: dict[str, Any], *, timeout_s: float = 300.0) -> dict[str, Any]:
    """POST a query to the service; its JSON answer, or ServiceError (4xx) / OSError (unreachable)."""
    headers = {"Content-Type": "application/json"}
    key = service.get("token") or get_settings().api_key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        service["url"] + QUERY_ROUTE, data=json.dumps(payload).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", {}).get("message") or exc.reason
        except (ValueError, AttributeError):
            message = str(exc.reason)
        raise ServiceError(exc.code, str(message)) from None
