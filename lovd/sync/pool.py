"""A small pool of psycopg 3 async connections (the relay holds one, reads borrow the rest).

psycopg_pool would do, but lovd needs only this: a bounded number of autocommit
connections, opened lazily, and a connection that saw any error (or a cancelled
query) is closed rather than reused, so an outage never leaves a broken connection
in the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg import pq

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[Any]


def describe(dsn: str) -> str:
    """The DSN without secrets (host, port, database, user) for logs and doctor."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable postgres.dsn)"
    parts = [f"{k}={info[k]}" for k in ("host", "port", "dbname", "user") if info.get(k)]
    return " ".join(parts) or "(libpq defaults)"


async def connect(dsn: str, timeout: float) -> Conn:
    # libpq's connect_timeout is whole seconds (at least 2); the asyncio bound is exact.
    async with asyncio.timeout(timeout):
        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=max(2, int(timeout + 0.999))
        )


class Pool:
    def __init__(self, dsn: str, size: int, connect_timeout: float) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._sem = asyncio.Semaphore(size)
        self._idle: list[Conn] = []
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        if self._closed:
            raise psycopg.OperationalError("the PostgreSQL pool is closed")
        async with self._sem:
            conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = await connect(self.dsn, self.connect_timeout)
            ok = False
            try:
                yield conn
                ok = True
            finally:
                idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
                if ok and idle and not conn.closed and not self._closed:
                    self._idle.append(conn)
                else:
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()
