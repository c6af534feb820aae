"""The chunk broker: work and result queues between a flow and its encoder tasks, and how they reach it.

One `ChunkBroker` per flow process holds a pair of queues per channel (flow run). An encoder task
reaches it through a `BrokerChannel`, one of three ways:
  * in-process, when the flow runs without Ray;
  * a socket served by a thread of the flow's process, when every Ray node is this machine (a Ray
    started here): a chunk goes straight from the flow to its encoder and back;
  * a threaded Ray actor owned by the flow's process, on a cluster (its workers may not reach this
    process) or through Ray Client. An actor is a process of its own: on a 2-core machine it took
    0.7 core-s per 36 s ingest from the encoders, which is why it is not the default here.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from typing import Any

ENCODERS_MAX = 64  # more than any flow has encoders: how many stop signals a closed channel sends
REMOTE_METHODS = frozenset({"get_work", "exchange", "put_result"})  # what an encoder may call


class ChunkBroker:
    """Work and result queues between a flow and its encoder tasks, one pair per channel (flow run)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[queue.Queue[Any], queue.Queue[Any]]] = {}

    def _queues(self, channel: str) -> tuple[queue.Queue[Any], queue.Queue[Any]] | None:
        with self._lock:
            return self._channels.get(channel)

    def open(self, channel: str) -> None:
        with self._lock:
            self._channels[channel] = (queue.Queue(), queue.Queue())

    def close(self, channel: str) -> None:
        """Drop the channel; its encoders get None (stop), those waiting in `get_work` at once."""
        with self._lock:
            queues = self._channels.pop(channel, None)
        if queues is not None:
            for _ in range(ENCODERS_MAX):
                queues[0].put(None)

    def put_work(self, channel: str, items: list[Any]) -> None:
        work, _ = self._queues(channel) or (None, None)
        if work is None:
            raise RuntimeError(f"encoder channel {channel} is closed")
        for item in items:
            work.put(item)

    def get_work(self, channel: str, timeout: float = 10.0) -> Any:
        """The next chunk; None when the flow is done or gone; "wait" when none came within timeout."""
        queues = self._queues(channel)
        if queues is None:
            return None
        try:
            return queues[0].get(timeout=timeout)
        except queue.Empty:
            return "wait"

    def put_result(self, channel: str, item: Any) -> None:
        queues = self._queues(channel)
        if queues is not None:  # a closed channel: the flow has failed or finished; drop the result
            queues[1].put(item)

    def exchange(self, channel: str, result: Any, timeout: float = 10.0) -> Any:
        """`put_result` then `get_work` in one call: one round trip per chunk for an encoder."""
        self.put_result(channel, result)
        return self.get_work(channel, timeout)

    def take_results(self, channel: str, timeout: float, min_items: int = 1) -> list[Any]:
        """Every result ready, waiting up to `timeout` until `min_items` of them have come."""
        queues = self._queues(channel)
        if queues is None:
            return []
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < min_items:
                out.append(queues[1].get(timeout=max(0.0, deadline - time.monotonic())))
            while True:
                out.append(queues[1].get_nowait())
        except queue.Empty:
            return out


class BrokerServer:
    """This process's broker served on a loopback socket: a thread per connected encoder.
    Connections authenticate with a random key that travels with the channel (Ray task arguments)."""

    def __init__(self, broker: ChunkBroker) -> None:
        self.broker = broker
        self.authkey = os.urandom(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self.authkey)
        self.address: tuple[str, int] = self._listener.address
        threading.Thread(target=self._accept, name="chunk-broker", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except (AuthenticationError, EOFError, ConnectionError):
                continue  # a stranger or a dropped handshake; keep serving the encoders
            threading.Thread(target=self._serve, args=(conn,), name="chunk-broker-conn", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    method, channel, args = conn.recv()
                except (EOFError, OSError):
                    return  # the encoder's process ended
                if method not in REMOTE_METHODS:
                    conn.send(RuntimeError(f"chunk broker: {method!r} may not be called remotely"))
                    continue
                conn.send(getattr(self.broker, method)(channel, *args))


_connections = threading.local()  # this thread's connection to each broker server it has called


def _connection(address: tuple[str, int], authkey: bytes) -> Connection:
    conns: dict[tuple[str, int], Connection] = _connections.__dict__.setdefault("by_address", {})
    if address not in conns:
        conns[address] = Client(address, authkey=authkey)
    return conns[address]


@dataclass
class BrokerChannel:
    """One flow's channel on a broker: the broker itself (in the flow's process), its socket, or
    its Ray actor. Pickled into an encoder task it keeps the socket's address or the actor's handle."""

    channel: str
    local: ChunkBroker | None = field(default=None, repr=False)
    address: tuple[str, int] | None = None
    authkey: bytes | None = field(default=None, repr=False)
    actor: Any = None

    def call(self, method: str, *args: Any) -> Any:
        if self.local is not None:
            return getattr(self.local, method)(self.channel, *args)
        if self.address is not None:
            assert self.authkey is not None
            conn = _connection(self.address, self.authkey)
            conn.send((method, self.channel, args))
            out = conn.recv()
            if isinstance(out, Exception):
                raise out
            return out
        import ray

        return ray.get(getattr(self.actor, method).remote(self.channel, *args))

    def __reduce__(self) -> Any:  # what travels to an encoder task: never the queues themselves
        if self.address is not None:
            return (BrokerChannel, (self.channel, None, self.address, self.authkey))
        if self.actor is None:
            raise TypeError("an in-process broker channel cannot leave its process")
        return (BrokerChannel, (self.channel, None, None, None, self.actor))


_lock = threading.Lock()
_broker = ChunkBroker()  # this process's queues, whichever way encoders reach them
_server: BrokerServer | None = None
_actors: dict[tuple[str, str], Any] = {}  # (cluster, job) -> this process's broker actor


def open_channel(channel: str, *, use_ray: bool, encoders: int) -> BrokerChannel:
    """A new channel on a broker the flow's encoders can reach (see the module's docstring). The
    flow's own calls go straight to this process's broker unless it is an actor."""
    if use_ray and not _ray_is_this_machine():
        out = BrokerChannel(channel, actor=_broker_actor(encoders))
    else:
        out = BrokerChannel(channel, local=_broker)
        if use_ray:
            server = _broker_server()
            out.address, out.authkey = server.address, server.authkey
    out.call("open")
    return out


def _broker_server() -> BrokerServer:
    global _server
    with _lock:
        if _server is None:
            _server = BrokerServer(_broker)
        return _server


def _ray_is_this_machine() -> bool:
    """Whether every Ray worker runs on this machine, so reaches this process on the loopback: a
    Ray started here or a one-node cluster on this host, not Ray Client or a multi-node cluster."""
    import ray
    from ray.util.client import ray as ray_client

    if ray_client.is_connected():
        return False
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def _broker_actor(encoders: int) -> Any:
    """This process's broker actor on the Ray it is connected to, created on first use. Threaded:
    each encoder blocks in `get_work` on a thread of its own; no CPU reserved (it only moves
    references). Keyed by cluster and job: a process that reconnects to Ray (tests, a notebook)
    must not reuse a handle from its previous connection, whose actor died with it."""
    import ray

    context = ray.get_runtime_context()
    key = (context.gcs_address, context.get_job_id())
    with _lock:
        if key not in _actors:
            _actors[key] = (
                ray.remote(ChunkBroker)
                .options(num_cpus=0, max_concurrency=max(16, 2 * encoders + 4))
                .remote()
            )
        return _actors[key]
