"""What the gate remembers between requests so that answering Caddy stays cheap.

A page visit sends ~40 requests through forward_auth with the same Cookie header, so
the gate parses each distinct header once (:class:`CookieHeaders`) and verifies each
cookie value once (:class:`VerifiedCookies`). Neither decides anything on its own:

- a cached parse is exactly what aiohttp's parser gave for that header string;
- a cached verification holds the token hash the cookie matched, and a hit counts
  only while the session's live row (the store's in-memory copy) still has that hash
  and has not expired. Delete (the row goes, or its hash is blanked), a new link (a new
  hash) and expiry so refuse the cookie on its very next request, with the same error
  as an uncached check. The session's state is never cached: the gate reads it from the
  row on every request, so a stopped session's cookie wakes it exactly as before.

Only a cookie that passed the full check is stored; a guess never is. Both maps are
bounded. Keys are looked up in a dict whose string hashing is keyed per process
(SipHash), so lookup time says nothing about which cookies are valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lovd.session.model import Session

MAX_HEADERS = 1024
MAX_COOKIES = 10_000


class CookieHeaders:
    """The session cookie's value per Cookie header string (``names`` in order of
    preference; the first present one counts)."""

    def __init__(self, names: tuple[str, ...], size: int = MAX_HEADERS) -> None:
        self.names = names
        self.size = size
        self._seen: dict[str, str | None] = {}

    def value(self, header: str, parse: Callable[[], Mapping[str, str]]) -> str | None:
        """The value for ``header``; ``parse`` (``web.Request.cookies``) reads it the
        first time, so the answer is always aiohttp's own reading of that header."""
        try:
            return self._seen[header]
        except KeyError:
            pass
        cookies = parse()
        found = next((v for n in self.names if (v := cookies.get(n))), None)
        if len(self._seen) >= self.size:
            # Whoever sends many distinct headers only makes their own parse uncached.
            self._seen.clear()
        self._seen[header] = found
        return found


@dataclass(frozen=True)
class Verified:
    sid: str
    token_hash: str


class VerifiedCookies:
    """Cookie values that passed the full check, valid while their row agrees."""

    def __init__(
        self,
        find: Callable[[str], Session | None],
        now: Callable[[], float],
        size: int = MAX_COOKIES,
    ) -> None:
        self.find = find
        self.now = now
        self.size = size
        self._verified: dict[str, Verified] = {}

    def get(self, value: str) -> Session | None:
        """The live row of a cookie verified before, or None (then check it in full)."""
        hit = self._verified.get(value)
        if hit is None:
            return None
        s = self.find(hit.sid)
        if s is None or s.token_hash != hit.token_hash or s.expires_at <= self.now():
            del self._verified[value]
            return None
        return s

    def put(self, value: str, s: Session) -> None:
        """Remember ``value`` after it passed the full check against ``s``."""
        if len(self._verified) >= self.size:
            self._verified.pop(next(iter(self._verified)))  # the oldest
        self._verified[value] = Verified(s.id, s.token_hash)

    def __len__(self) -> int:
        return len(self._verified)

    def __contains__(self, value: object) -> bool:
        return value in self._verified
