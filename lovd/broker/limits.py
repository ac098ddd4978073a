"""Bounds on what callers of the broker can make lovd hold: connections, requests in
flight per session, LLM calls at once per session, request-body bytes in memory, and
how long a request may take to arrive.

Sessions are not trusted (whoever uses one controls its container), and the broker
runs inside lovd: without these, 40 parallel 31 MiB uploads or thousands of half-open
connections from one session grow lovd's memory and file descriptors without end.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from lovd.broker.rules import Refusal

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_body: int  # bytes of one request body
    body_memory: int  # bytes of request bodies held at once, all sessions
    session_requests: int  # requests in flight per session
    session_llm: int  # LLM calls in flight per session (more wait their turn)
    read_timeout: float  # seconds for a request's headers, and for its body
    max_connections: int  # open connections to the broker, all sessions

    @classmethod
    def defaults(cls) -> Limits:
        return cls(8 << 20, 256 << 20, 16, 2, 30.0, 1024)


@dataclass
class Gates:
    """The counters behind :class:`Limits` (one per broker; all on the event loop)."""

    limits: Limits
    body_bytes: int = 0
    session_bytes: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    llm: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    llm_users: dict[str, int] = field(default_factory=dict)

    # Plain enter/leave pairs rather than context managers: these run on every call.

    def enter(self, sid: str) -> None:
        """Count a request of ``sid`` in flight (Refusal 429 past session_requests); the
        caller calls :meth:`leave` when it is done."""
        n = self.requests.get(sid, 0)
        if n >= self.limits.session_requests:
            raise Refusal(
                429,
                f"this session already has {n} requests in flight at the broker (the most "
                "one session may have); retry when one has finished",
            )
        self.requests[sid] = n + 1

    def leave(self, sid: str) -> None:
        left = self.requests[sid] - 1
        if left:
            self.requests[sid] = left
        else:
            del self.requests[sid]

    def llm_slots(self, sid: str) -> asyncio.Semaphore:
        """The session's LLM slots (``async with`` one; a call beyond them waits, and its
        request already counts against ``session_requests``, so the queue is bounded).
        The caller calls :meth:`llm_done` afterwards."""
        sem = self.llm.get(sid)
        if sem is None:
            sem = self.llm[sid] = asyncio.Semaphore(self.limits.session_llm)
        self.llm_users[sid] = self.llm_users.get(sid, 0) + 1
        return sem

    def llm_done(self, sid: str) -> None:
        self.llm_users[sid] -= 1
        if not self.llm_users[sid]:
            del self.llm_users[sid]
            del self.llm[sid]

    async def read_body(self, request: web.Request, sid: str) -> tuple[bytes, int]:
        """The request's body, read as it arrives against the size cap, the memory budgets
        (all sessions: ``body_memory``; one session: two bodies of ``max_body``) and the
        read timeout. Returns it with the bytes taken from the budgets, which the caller
        gives back (:meth:`release`) when done with the body."""
        cap = self.limits.max_body
        session_budget = 2 * cap
        declared = request.content_length
        if declared is not None:
            if declared > cap:
                raise _too_large(declared, cap)
            # A declared length is taken from the budgets before reading (aiohttp reads
            # no more than it, and client_max_size is the same cap).
            self._take(sid, declared, session_budget)
            try:
                if request.content.is_eof():  # all here already (most calls): no timer
                    body = await request.read()
                else:
                    async with asyncio.timeout(self.limits.read_timeout):
                        body = await request.read()
            except BaseException as e:
                self.release(sid, declared)
                if isinstance(e, TimeoutError):
                    raise self._slow() from e
                raise
            return body, declared
        chunks: list[bytes] = []
        size = 0
        try:
            try:
                async with asyncio.timeout(self.limits.read_timeout):
                    async for chunk in request.content.iter_any():
                        size += len(chunk)
                        if size > cap:
                            raise _too_large(size, cap)
                        self._take(sid, len(chunk), session_budget)
                        chunks.append(chunk)
            except TimeoutError as e:
                raise self._slow() from e
        except BaseException:
            self.release(sid, sum(len(c) for c in chunks))
            raise
        return b"".join(chunks), size

    def _take(self, sid: str, n: int, session_budget: int) -> None:
        mine = self.session_bytes.get(sid, 0) + n
        if mine > session_budget or self.body_bytes + n > self.limits.body_memory:
            raise Refusal(
                503, "the broker is holding too many large requests at once; retry in a moment"
            )
        self.body_bytes += n
        self.session_bytes[sid] = mine

    def _slow(self) -> Refusal:
        return Refusal(
            408, f"the request body did not arrive within {self.limits.read_timeout:g} s"
        )

    def release(self, sid: str, taken: int) -> None:
        self.body_bytes -= taken
        left = self.session_bytes.get(sid, 0) - taken
        if left > 0:
            self.session_bytes[sid] = left
        else:
            self.session_bytes.pop(sid, None)


def _too_large(size: int, cap: int) -> Refusal:
    return Refusal(
        413,
        f"the request body is larger than the broker accepts ({size} > {cap} bytes, "
        "broker.max_body); start a new chat or send smaller attachments",
    )


_BUSY_BODY = json.dumps(
    {
        "error": {
            "message": "the broker has too many open connections; retry in a moment",
            "type": "lovd_broker",
            "code": 503,
        }
    }
).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


class _Busy(asyncio.Protocol):
    """Answers a connection beyond ``max_connections`` with 503 and closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class CappedSite(web.SockSite):
    """A SockSite that closes connections beyond ``max_connections`` at once (an open
    connection costs a file descriptor and a handler task, before any request)."""

    def __init__(self, runner: web.BaseRunner, sock: Any, max_connections: int) -> None:
        super().__init__(runner, sock)
        self.max_connections = max_connections
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None

        def factory() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.max_connections:
                self.refused += 1
                if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                    log.warning(
                        "broker: %d connections open, refusing more (%d so far)",
                        self.max_connections,
                        self.refused,
                    )
                return _Busy()
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)
