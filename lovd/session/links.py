"""Session links: a single-use token, separate from the cookie secret.

A link ``/c/<id>?token=<link token>`` is what the operator hands a person
(``POST /api/sessions``, ``lovd session link ID``, ``lovd restore``). Exchanging it gives
the browser a *fresh* cookie secret (the session's old cookie stops working) and uses the
link up: the same link a second time is refused with a page that says so. The cookie
secret itself is never in a link, so a visitor cannot build a link to their own session
from their cookie and plant it on someone else (docs/security.md, planted link).

Only hashes are stored (``link_hash``; ``token_hash`` for the cookie). Exchanges go
through one lock so two browsers opening the same link at once cannot both get in.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from enum import Enum
from typing import Any

from lovd import ids
from lovd.session.model import Session
from lovd.store import Store

# What a browser is told to do when its link does not work any more.
NEW_LINK = "ask whoever gave you the link for a new one (lovd session link ID)"


class LinkState(Enum):
    VALID = "valid"
    USED = "used"
    WRONG = "wrong"


def link_state(s: Session, token: str) -> LinkState:
    """Whether ``token`` is the session's link, and whether that was used (constant time
    for a wrong token, as for cookies)."""
    given = ids.hash_token(token)
    if not token or not s.link_hash or not hmac.compare_digest(given, s.link_hash):
        return LinkState.WRONG
    return LinkState.USED if s.link_used_at else LinkState.VALID


class Links:
    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self._lock = asyncio.Lock()

    async def mint(self, sid: str) -> str:
        """A new link token for ``sid`` (shown once); any earlier link stops working."""
        token = ids.new_token()
        async with self._lock:
            await self.store.update(
                sid, link_hash=ids.hash_token(token), link_used_at=0.0, event="link"
            )
        return token

    async def redeem(self, sid: str, token: str, *, rotate: bool = True) -> tuple[Session, str]:
        """Use the link up. With ``rotate`` the session gets a fresh cookie secret, returned
        for the browser's cookie (else ""). Raises LookupError with the link's state when it
        is not (any more) valid: checked again under the lock, so it is used once."""
        async with self._lock:
            s = self.store.get(sid)
            state = LinkState.WRONG if s is None else link_state(s, token)
            if s is None or state is not LinkState.VALID:
                raise LookupError(state)
            secret = ids.new_token() if rotate else ""
            changes: dict[str, Any] = {"link_used_at": self.clock()}
            if rotate:
                changes["token_hash"] = ids.hash_token(secret)
            s = await self.store.update(sid, event="link-used", **changes)
        return s, secret
