"""`memstage serve --workers N`: N server processes answering on one listening socket.

Why: one Python process serving queries uses about 1.1 cores (the GIL), so on a many-core host, or
under many concurrent clients, the other cores idle. The supervisor binds the socket, starts N
workers (`memstage serve --worker-fd FD`, each with the app, its own models and its own access
journal and flusher: stores/access_log.py merges the journals of every process) and announces
HOME/serve.json, with its own pid, once every worker is warm. The kernel hands each connection to
one worker. A worker that dies is started again (at most `MAX_RESTARTS`); SIGINT or SIGTERM stops
them all, each merging its journal on the way out. The owner's token goes to the workers on stdin,
not on their command line, where any local user could read it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger("memstage")

READY = "memstage-worker-ready"
MAX_RESTARTS = 10
START_TIMEOUT_S = 600.0


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket every worker accepts on, inheritable by them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def worker_argv(serve_args: list[str], fd: int, ready_fd: int) -> list[str]:
    """A worker's command line: `memstage serve` with the supervisor's options, on the socket `fd`,
    saying it is warm on the pipe `ready_fd`."""
    return [
        sys.executable, "-m", "memstage.cli.main", "serve", *serve_args,
        "--worker-fd", str(fd), "--ready-fd", str(ready_fd),
    ]  # fmt: skip


class Supervisor:
    """Starts, watches and stops the workers of one `memstage serve --workers N`."""

    def __init__(self, serve_args: list[str], workers: int, host: str, port: int, token: str) -> None:
        self.workers, self.token = workers, token
        self.sock = listening_socket(host, port)
        self.serve_args = serve_args
        # each worker's torch gets its share of the cores, unless MEMSTAGE_THREADS says otherwise
        self.env = {**os.environ}
        self.env.setdefault("MEMSTAGE_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        self.procs: list[subprocess.Popen[str]] = []
        self.restarts = 0
        self._stopping = False

    def _start_one(self) -> tuple[subprocess.Popen[str], int]:
        """A worker, and the read end of the pipe it says READY on."""
        read, write = os.pipe()
        proc = subprocess.Popen(
            worker_argv(self.serve_args, self.sock.fileno(), write),
            env=self.env,
            stdin=subprocess.PIPE,
            text=True,
            pass_fds=(self.sock.fileno(), write),
            start_new_session=True,
        )  # fmt: skip  (own session: a terminal's Ctrl-C reaches the supervisor, which stops them once)
        os.close(write)  # the worker holds the only write end: its exit ends our read
        assert proc.stdin is not None
        proc.stdin.write(self.token + "\n")
        proc.stdin.close()
        return proc, read

    def start(self) -> None:
        """Start every worker and return once each has said it is warm (raises if one exits first)."""
        started = [self._start_one() for _ in range(self.workers)]
        self.procs = [proc for proc, _ in started]
        deadline = time.monotonic() + START_TIMEOUT_S
        for proc, read in started:
            if not _wait_ready(read, deadline):
                self.stop()
                raise RuntimeError(f"a serve worker did not start (exit status {proc.poll()}); see its log")

    def watch(self) -> None:
        """Until a signal: start again a worker that died."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        # Python raises KeyboardInterrupt on SIGINT only if SIGINT was not ignored when it started; a
        # serve launched from a background job inherits it ignored (POSIX shells do that to `cmd &`) and
        # then never stopped on SIGINT (a clean-clone CI run started in the background hung 240 s here)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while not self._stopping:
                time.sleep(0.5)
                for i, proc in enumerate(self.procs):
                    if proc.poll() is not None and not self._stopping:
                        if self.restarts >= MAX_RESTARTS:
                            raise RuntimeError(f"serve workers died {self.restarts} times; stopping")
                        log.warning(
                            "serve worker %d exited (%s); starting it again", proc.pid, proc.returncode
                        )
                        self.restarts += 1
                        self.procs[i], read = self._start_one()
                        os.close(read)  # it takes connections once uvicorn listens; no need to wait
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        """SIGINT to every worker (each merges its journal), then wait; a second Ctrl-C does not cut it short."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # uvicorn's shutdown: the lifespan merges the journal
        for proc in self.procs:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.sock.close()


def _wait_ready(read: int, deadline: float) -> bool:
    """Whether the worker said READY on its pipe before `deadline` (False: it exited, or timed out)."""
    import select

    got = b""
    try:
        while READY.encode() not in got:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                return False
            chunk = os.read(read, 64)
            if not chunk:  # the worker exited
                return False
            got += chunk
        return True
    finally:
        os.close(read)


def announce_ready(ready_fd: int) -> None:
    """Said by a worker once its models are warm, on its pipe to the supervisor."""
    import contextlib

    with contextlib.suppress(BrokenPipeError):  # a restarted worker: nobody waits for it
        os.write(ready_fd, (READY + "\n").encode())
    os.close(ready_fd)


def read_token() -> str:
    """The owner's token, which the supervisor writes to a worker's stdin."""
    return sys.stdin.readline().strip()


def run_supervised(args: Any, serve_args: list[str], token: str, announce: Any) -> None:
    """`memstage serve --workers N`'s body: start the workers, `announce()` (serve.json), watch, stop."""
    supervisor = Supervisor(serve_args, args.workers, args.host, args.port, token)
    supervisor.start()
    announce()
    supervisor.watch()
