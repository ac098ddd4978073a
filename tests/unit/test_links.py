"""Session links (lovd/session/links.py, web/public.py) and the cookie rules, in-process:
each test tries the attack. The planted link through a real Caddy is in
tests/integration/test_gate_caddy.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from lovd.store import Session
from tests.unit.test_gate import NAV, XHR, Gate, open_gate

SAME = {**NAV, "Sec-Fetch-Site": "same-origin"}
CROSS = {**NAV, "Sec-Fetch-Site": "cross-site"}


@pytest.fixture
async def g(tmp_path: Path, free_ports: list[int]) -> AsyncIterator[Gate]:
    async with open_gate(tmp_path, free_ports) as gate:
        yield gate


def jar(s: Session, secret: str, name: str = "lovd_session") -> dict[str, str]:
    return {"Cookie": f"{name}={s.id}.{secret}"}


def new_cookie(r: aiohttp.ClientResponse) -> tuple[str, str]:
    """(session id, secret) of the Set-Cookie a response carries."""
    value = r.headers["Set-Cookie"].split(";", 1)[0].split("=", 1)[1]
    sid, _, secret = value.partition(".")
    return sid, secret


async def open_link(
    g: Gate, sid: str, token: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    return await g.client.get(
        f"/c/{sid}?token={token}", headers={**NAV, **(headers or {})}, allow_redirects=False
    )


def form_of(page: str) -> dict[str, str]:
    """The hidden fields of the switch page's form."""
    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', page))


async def test_a_link_is_not_the_cookie_and_works_once(g: Gate) -> None:
    s, cookie_secret = await g.session()
    link = await g.sessions.new_link(s.id)
    assert link != cookie_secret
    # The cookie secret is no link: a visitor cannot build one from their own cookie.
    assert (await open_link(g, s.id, cookie_secret)).status == 401
    r = await open_link(g, s.id, link)
    assert r.status == 303 and r.headers["Location"] == "/"
    sid, fresh = new_cookie(r)
    assert sid == s.id and fresh not in (link, cookie_secret)
    # The exchange rotated the cookie secret: only the browser that used the link is in.
    assert (await g.auth(s, fresh)).status == 204
    assert (await g.auth(s, cookie_secret)).status == 401
    # The same link again (another browser, or the attacker who planted it): refused,
    # with a page that says what happened and how to get a new one.
    again = await open_link(g, s.id, link)
    assert again.status == 410 and "Set-Cookie" not in again.headers
    text = await again.text()
    assert "already used" in text and "lovd session link ID" in text
    nb = await open_link(g, s.id, link, {"Accept-Language": "nb"})
    assert "Lenken er allerede brukt" in await nb.text()
    # A used link is not a guess: it does not count against the address.
    assert g.gate.failures.retry_after("192.0.2.1") is None
    # A new link from the operator works, once; the earlier one stays dead.
    link2 = await g.sessions.new_link(s.id)
    assert (await open_link(g, s.id, link2)).status == 303
    assert (await open_link(g, s.id, link)).status == 401


async def test_a_planted_link_never_replaces_a_live_cookie(g: Gate) -> None:
    victim, victim_secret = await g.session()
    attacker, _ = await g.session()
    planted = await g.sessions.new_link(attacker.id)
    # The victim follows the attacker's link from another site.
    r = await open_link(g, attacker.id, planted, {**CROSS, **jar(victim, victim_secret)})
    assert r.status == 200 and "Set-Cookie" not in r.headers
    page = await r.text()
    assert "Switch session?" in page and victim.id in page and attacker.id in page
    assert g.store.get(attacker.id).link_used_at == 0  # type: ignore[union-attr]
    assert (await g.auth(victim, victim_secret)).status == 204  # still theirs
    form = form_of(page)
    assert form["token"] == planted and form["switch"]

    async def post(headers: dict[str, str], data: dict[str, str]) -> aiohttp.ClientResponse:
        return await g.client.post(
            f"/c/{attacker.id}", data=data, headers=headers, allow_redirects=False
        )

    # The attacker's page submits the form for the victim: cross-site, refused.
    for site in ("cross-site", "same-site", "none"):
        r = await post({**NAV, "Sec-Fetch-Site": site, **jar(victim, victim_secret)}, form)
        assert r.status == 403 and "Set-Cookie" not in r.headers, site
    # No Sec-Fetch-Site (an old browser): another Origin is refused too.
    legacy = {**NAV, "Origin": "https://evil.example", **jar(victim, victim_secret)}
    assert (await post(legacy, form)).status == 403
    # Without the page's form token, or with one made for another cookie (the
    # attacker opening their own link with a cookie of theirs), same-origin or not:
    own, own_secret = await g.session()
    theirs = form_of(await (await open_link(g, attacker.id, planted, jar(own, own_secret))).text())
    for data in ({"token": planted}, {"token": planted, "switch": "1.00"}, theirs):
        r = await post({**SAME, **jar(victim, victim_secret)}, data)
        assert r.status == 403 and "Set-Cookie" not in r.headers
    assert g.store.get(attacker.id).link_used_at == 0  # type: ignore[union-attr]
    assert (await g.auth(victim, victim_secret)).status == 204
    # The person asks to switch, on the page itself: switched, and the link is used up.
    r = await post({**SAME, **jar(victim, victim_secret)}, form)
    assert r.status == 303 and new_cookie(r)[0] == attacker.id
    assert (await post({**SAME, **jar(victim, victim_secret)}, form)).status == 410


async def test_own_link_in_a_browser_already_in_that_session(g: Gate) -> None:
    s, secret = await g.session()
    link = await g.sessions.new_link(s.id)
    r = await open_link(g, s.id, link, jar(s, secret))
    assert r.status == 303 and "Set-Cookie" not in r.headers
    assert (await g.auth(s, secret)).status == 204  # nothing rotated
    assert (await open_link(g, s.id, link)).status == 410  # but the link is spent


async def test_a_dead_cookie_does_not_stop_a_link(g: Gate) -> None:
    gone, gone_secret = await g.session()
    await g.store.delete(gone.id, "test")
    s, _ = await g.session()
    link = await g.sessions.new_link(s.id)
    r = await open_link(g, s.id, link, jar(gone, gone_secret))
    assert r.status == 303 and new_cookie(r)[0] == s.id


async def test_only_the_host_cookie_counts_under_https(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """Cookie tossing: a sibling domain can set lovd_session for this host, never a
    __Host- cookie; under an https public_url the plain one is ignored."""
    async with open_gate(tmp_path, free_ports, public_url="https://chat.example") as g:
        s, secret = await g.session()
        plain = await g.client.get(
            "/_lovd/auth",
            headers={**XHR, **jar(s, secret), "X-Forwarded-Method": "GET",
                     "X-Forwarded-Uri": "/global/health", "X-Lovd-Gate": g.key},
        )  # fmt: skip
        assert plain.status == 401
        secure = await g.client.get(
            "/_lovd/auth",
            headers={**XHR, **jar(s, secret, "__Host-lovd_session"), "X-Forwarded-Method": "GET",
                     "X-Forwarded-Uri": "/global/health", "X-Lovd-Gate": g.key},
        )  # fmt: skip
        assert secure.status == 204
        # A tossed plain cookie of the attacker's session is not a live session either:
        # the victim's __Host- one decides (here: none, so the link is simply used).
        link = await g.sessions.new_link(s.id)
        r = await open_link(g, s.id, link)  # (a TLS proxy in front may say http)
        assert r.headers["Set-Cookie"].startswith(f"__Host-lovd_session={s.id}.")
