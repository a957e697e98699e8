"""Connections: how `uclip serve` keeps answering its owner while other peers hold sockets open.

What went wrong (issue 19 item 2): uvicorn's `limit_concurrency=256` counts every open connection,
including those that never finish their request head, and uvicorn has no deadline for a head (its
keep-alive timer runs only between requests). 300 sockets that sent `GET / HTTP/1.1\\r\\nHost: ` and
stopped made every other request a 503 for as long as they stayed open, and the token check (the Guard,
app.py) comes only after a complete head, so with `--allow-remote` any peer could do it.

What this module does instead (`Gate`, one per server, consulted by every connection's protocol):
- A deadline for the request head: a connection has `header_seconds` (10 s) from its connect, and from
  the first byte after a keep-alive pause, to deliver a complete head; then it gets a one-line 408 and is
  closed. An idle keep-alive connection is still closed by uvicorn's keep-alive timer.
- A cap per peer address (`per_peer`, 64: a browser opens 6 per host) and one for the whole server
  (`max_connections`, at most half the open-file limit so a flood cannot make accept() fail). A new
  connection past a cap closes the oldest *waiting* connection of that peer (of any peer for the total
  cap): one with no request in progress, a half-open head or an idle keep-alive. Connections that never
  carried a request the Guard accepted go first; the owner's (a request with the token, or on a loopback
  server with a loopback Host) go last. Only when every connection in the way is busy answering is the
  new one refused (503, one line, closed).
  Why evict the oldest rather than refuse the newest: refusing newcomers is exactly what lets a flood
  lock everyone out; evicting the oldest idle means a client that sends its request promptly (the
  owner's browser, even from the flooder's own address, even on loopback where every peer is 127.0.0.1)
  is answered whatever the flood, while the flooder only churns its own sockets.
- A deadline for the client to read: a response whose writing stays paused (the client reads nothing, its
  window closed) for `stall_seconds` (60 s) is abandoned and the connection aborted. A busy connection is
  never evicted, so without this a client that requests photos and never reads them would hold its slots
  (and a task each) forever; a slow but live link resumes writing long before.
- Peers are addresses, except IPv6 ones, counted by /64 (one host can hold a whole /64).
- Requests in flight are bounded by the same caps (HTTP/1.1: one request per connection at a time), so
  uvicorn's `limit_concurrency` is off: it is what turned idle sockets into a lockout.

The protocol is uvicorn's h11 one (pure Python; chosen explicitly, so installing httptools changes
nothing) with these hooks added. Everything runs on the event loop's thread: no locks.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import resource
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import OWNER_SCOPE_KEY

HEADER_SECONDS = 10.0       # to deliver one complete request head
STALL_SECONDS = 60.0        # a response the client does not read at all for this long is abandoned
PER_PEER = 64               # open connections from one address
MAX_CONNECTIONS = 1024      # open connections in all (lowered to half the open-file limit)


def default_max_connections() -> int:
    """MAX_CONNECTIONS, or half the process's open-file limit when that is lower (thumbnails, SQLite and the
    models need descriptors too; accept() failing with EMFILE would stall every client)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2))


def peer_key(host: str) -> str:
    """The address connections are counted by: the address itself, an IPv6 one's /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if not address.is_loopback:
            return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def raw_answer(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response written before (or without) a parsed request: one-line JSON, then close."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"cache-control: no-store\r\nconnection: close\r\n" + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n")
    return head.encode() + body


class Gate:
    """The open connections of one server, by age and by peer; decides who is admitted and who is evicted."""

    def __init__(self, *, header_seconds: float = HEADER_SECONDS, per_peer: int = PER_PEER,
                 max_connections: int | None = None, stall_seconds: float = STALL_SECONDS):
        self.header_seconds = header_seconds
        self.stall_seconds = stall_seconds
        self.per_peer = per_peer
        self.max_connections = max_connections or default_max_connections()
        self.open: dict[GuardedProtocol, None] = {}              # insertion order: oldest first
        self.by_peer: dict[str, dict[GuardedProtocol, None]] = {}
        self.evicted = 0        # counters: tests and the benchmark read them
        self.refused = 0
        self.timed_out = 0
        self.stalled = 0

    def protocol(self) -> type[GuardedProtocol]:
        """The protocol class for uvicorn's Config(http=...), bound to this gate."""
        return type("UclipH11Protocol", (GuardedProtocol,), {"gate": self})

    def admit(self, conn: GuardedProtocol) -> bool:
        """Make room for `conn` (evicting the oldest waiting connection past a cap); False: refuse it."""
        mine = self.by_peer.setdefault(conn.peer, {})
        if len(mine) >= self.per_peer and not self._evict(mine):
            return False
        if len(self.open) >= self.max_connections and not self._evict(self.open):
            return False
        self.open[conn] = None
        mine[conn] = None
        return True

    def forget(self, conn: GuardedProtocol) -> None:
        self.open.pop(conn, None)
        mine = self.by_peer.get(conn.peer)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.by_peer[conn.peer]

    def _evict(self, group: dict[GuardedProtocol, None]) -> bool:
        waiting = [c for c in group if c.waiting]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: (c.owner, c.waiting_since))
        self.evicted += 1
        victim.drop()
        return True


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the head deadline and the gate's admission (the module docstring)."""

    gate: Gate

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = peer_key(self.client[0]) if self.client else ""
        self.owner = False                       # a request on it passed the Guard
        self.waiting_since = time.monotonic()
        self._partial = False                    # bytes of a head received, head not complete
        self._deadline: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        if not self.gate.admit(self):
            self.gate.refused += 1
            self.peer = "\x00refused"            # not counted: forget() must not touch the peer's entries
            transport.write(raw_answer(503, "Service Unavailable", "too many connections from your address are busy: "
                                                                 "try again in a moment"))
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.gate.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.waiting:
            self._partial = True
            if self._deadline is None:
                self._arm()
        else:
            self._partial = False
            self._disarm()

    def on_response_complete(self) -> None:
        if self.scope is not None and self.scope.get(OWNER_SCOPE_KEY):
            self.owner = True
        self.waiting_since = time.monotonic()
        super().on_response_complete()         # may start a pipelined request
        if not self.waiting:
            self._disarm()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.gate.stall_seconds, self._not_reading)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _not_reading(self) -> None:
        self._stall = None
        self.gate.stalled += 1
        self.transport.abort()                 # close() would wait for the buffer the client does not read

    @property
    def waiting(self) -> bool:
        """No request in progress: a head still coming, or an idle keep-alive connection."""
        return self.cycle is None or self.cycle.response_complete

    def drop(self) -> None:
        """Close to make room for a newer connection (the gate's eviction)."""
        self._disarm()
        self.gate.forget(self)
        if not self.transport.is_closing():
            if self._partial:
                self.transport.write(raw_answer(503, "Service Unavailable", "the server needed this connection "
                                                                            "for another: send the request again"))
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.gate.header_seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.waiting and not self.transport.is_closing():
            self.gate.timed_out += 1
            self.transport.write(raw_answer(408, "Request Timeout", f"the request head took over "
                                                                    f"{self.gate.header_seconds:g} s: send it again"))
            self.transport.close()
