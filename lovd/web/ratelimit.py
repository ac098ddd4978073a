"""Per-client-address limits for the browser path (failed cookie checks, starts)."""

from __future__ import annotations

import collections
import ipaddress
import math
import time
from collections.abc import Callable

from aiohttp import web


class RateLimiter:
    """Sliding-window counter per key (a client address): at most ``limit`` hits per
    ``window`` seconds. Memory is bounded: the oldest keys are dropped past ``max_keys``."""

    def __init__(
        self,
        limit: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10000,
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._hits: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def retry_after(self, key: str) -> int | None:
        """Seconds until ``key`` may try again, or None when it is under the limit."""
        q = self._hits.get(key)
        if q is None:
            return None
        cutoff = self.clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._hits[key]
            return None
        if len(q) < self.limit:
            return None
        return max(1, math.ceil(q[0] - cutoff))

    def hit(self, key: str) -> None:
        q = self._hits.get(key)
        if q is None:
            q = self._hits[key] = collections.deque()
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(key)
        q.append(self.clock())
        while len(q) > self.limit:
            q.popleft()


def client_address(request: web.Request) -> str:
    """The client as Caddy saw it. Caddy (2.5+) replaces a client-sent X-Forwarded-For
    unless trusted_proxies is configured, so the last entry is Caddy's own view."""
    xff = request.headers.get("X-Forwarded-For", "")
    if xff:
        return xff.rsplit(",", 1)[-1].strip()
    return request.remote or "local"


def client_key(addr: str) -> str:
    """The key one client's places are counted under: the address itself for IPv4, its
    /64 for IPv6 (one subscriber's line usually holds a whole /64 and can pick any
    address in it), an IPv4-mapped IPv6 address as the IPv4 address."""
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
