# ruff: noqa: RUF001 - Norwegian typography writes the dash as an en dash (tankestrek).
"""lovd's own pages in Norwegian first, English on request (lovd/web/texts.py, pages.py).

Each page is rendered as the gate and the public site render it and read as text, the
way a person (or a screen reader) meets it. axe-core checks the same pages in Chromium
(tests/browser).
"""

from __future__ import annotations

import re
import string
from html.parser import HTMLParser

import pytest

from lovd.errors import LovdError
from lovd.session.model import Session
from lovd.web import texts
from lovd.web.pages import Page, Pages
from lovd.web.texts import negotiate

# Words of the English pages that must not appear on a Norwegian one.
ENGLISH = re.compile(r"\b(session|start a|places|wait|the|your|please|not available)\b", re.I)


@pytest.mark.parametrize(
    ("header", "lang"),
    [
        (None, "nb"),  # no preference: Norwegian bokmål
        ("", "nb"),
        ("nb-NO,nb;q=0.9,no;q=0.8,en;q=0.7", "nb"),
        ("no", "nb"),
        ("nn-NO", "nb"),  # nynorsk readers read bokmål better than English
        ("en-US,en;q=0.9", "en"),
        ("en-GB", "en"),
        ("de-DE,de;q=0.9,en;q=0.5", "en"),  # the best language lovd has
        ("de-DE,fr;q=0.9", "nb"),  # none lovd has: the default
        ("en;q=0.5,nb;q=0.9", "nb"),  # q-values, not order
        ("en;q=0, *;q=0.1", "nb"),  # q=0 means "not this one"
        ("EN-us", "en"),
        ("en;q=abc", "nb"),
    ],
)
def test_language_follows_accept_language(header: str | None, lang: str) -> None:
    assert negotiate(header) == lang


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def test_every_language_has_every_text_with_the_same_blanks() -> None:
    for lang, table in texts.TEXTS.items():
        missing = set(texts.NB) - set(table)
        # English shows lovd's own detail for errors; every other text is there.
        assert not {k for k in missing if not k.startswith("text.")}, (lang, missing)
        for key, template in table.items():
            assert _fields(template) == _fields(texts.NB[key]), (lang, key)
        assert lang in texts.HTML_LANG
    assert set(texts.TAGS.values()) <= set(texts.TEXTS)


class _Doc(HTMLParser):
    """Text, <html lang>, headings, landmarks and live regions of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.lang = ""
        self.h1 = 0
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "html":
            self.lang = a.get("lang") or ""
        if tag == "h1":
            self.h1 += 1
        if tag in ("script", "style", "title"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "title"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.text.append(data.strip())

    def find(self, tag: str, **want: str) -> dict[str, str | None]:
        for t, a in self.tags:
            if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in want.items()):
                return a
        raise AssertionError(f"no <{tag} {want}>")


def pages(used: int = 1, limit: int = 3) -> Pages:
    return Pages(max_running=limit, running=lambda: used, retry_after=lambda: 200)


def read(p: Pages, page: Page) -> tuple[_Doc, dict[str, str]]:
    resp = p.render(page)
    assert resp.text is not None
    doc = _Doc()
    doc.feed(resp.text)
    # What every page has: its language, one heading, a skip link to the content.
    assert doc.lang == page.lang and resp.headers["Content-Language"] == page.lang
    assert "Accept-Language" in resp.headers["Vary"]
    assert doc.h1 == 1
    assert doc.find("a", **{"class": "skip"})["href"] == "#main"
    doc.find("main", id="main")
    return doc, dict(resp.headers)


def session(status: str) -> Session:
    return Session("s1", status, "", "h", 1, "", "h1", 0.0, 0.0, 9e9, 0.0)


def test_landing_page_norwegian_by_default_english_on_request() -> None:
    p = pages()
    nb, _ = read(p, p.landing_page())
    said = " ".join(nb.text)
    assert "Finn fram i norsk lov" in said and "1 av 3 plasser er i bruk" in said
    assert "ikke juridisk rådgivning" in said
    assert nb.find("button", type="submit") is not None and "Start en ny økt" in said
    assert not ENGLISH.search(said.replace("lovdata.no", "")), said
    en, _ = read(p, p.landing_page(lang="en"))
    said = " ".join(en.text)
    assert "Research Norwegian law" in said and "1 of 3 places are in use" in said
    assert "Start a new session" in said


def test_full_landing_page_says_the_wait_in_the_readers_language() -> None:
    p = pages(used=3)
    nb, headers = read(p, p.landing_page())
    assert headers["Retry-After"] == "200"
    assert "Alle 3 plassene er i bruk nå – en blir ledig om 4 min" in " ".join(nb.text)
    assert nb.find("p", role="alert")


def test_progress_page_has_a_live_region_that_speaks_the_page_language() -> None:
    p = pages()
    for status, title in (("starting", "Økten din startes"), ("idle-stopped", "Økten din vekkes")):
        doc, headers = read(p, p.progress_page(session(status)))
        assert headers["Retry-After"] == "2" and title in " ".join(doc.text)
        live = doc.find("p", id="progress-status")
        assert live["role"] == "status" and live["aria-live"] == "polite"
        assert live["data-ready"] == "Økten er klar. Åpner den …"
        assert live["data-retry"] == "Prøver igjen om {s} s."
        assert doc.find("progress", id="progress-bar")["aria-label"] == "Framdrift"
    doc, _ = read(p, p.progress_page(session("idle-stopped"), "en"))
    assert "Waking up your session…" in doc.text
    assert doc.find("p", id="progress-status")["data-default"] == "Waking up…"


@pytest.mark.parametrize(
    ("err", "nb", "en"),
    [
        (
            LovdError("unauthorized", "this session link is not valid (wrong or old token)"),
            "Du har ingen gyldig økt her",
            "This session link is not valid (wrong or old token).",
        ),
        (
            LovdError("forbidden", "this session has expired; start a new one"),
            "Økten din er utløpt. Start en ny økt.",
            "This session has expired; start a new one.",
        ),
        (
            LovdError("rate-limited", "too many failed attempts", retry_after=300),
            "Prøv igjen om 5 min.",
            "Too many failed attempts.",
        ),
        (
            LovdError("not-found", "there is nothing at /x/y"),
            "Det finnes ingenting på /x/y.",
            "There is nothing at /x/y.",
        ),
        (
            LovdError("too-many-sessions", "full", retry_after=90, extra={"limit": 1}),
            "Den eneste plassen er i bruk – prøv igjen om 2 min.",
            "The only place is in use — try again in 2 min.",
        ),
        (
            LovdError("unavailable", "this session failed (image gone); start a new one"),
            "Økten stoppet med en feil (image gone). Start en ny økt.",
            "This session failed (image gone); start a new one.",
        ),
    ],
)
def test_refusals_say_why_in_the_readers_language(err: LovdError, nb: str, en: str) -> None:
    p = pages()
    doc, _ = read(p, p.refusal_page(err))
    said = " ".join(doc.text)
    assert nb in said and "Start en ny økt" in said
    assert doc.find("p", role="alert")
    doc, _ = read(p, p.refusal_page(err, "en"))
    assert en in " ".join(doc.text)


def test_every_error_code_has_a_norwegian_title_and_text() -> None:
    from lovd.errors import CODES

    p = pages()
    for code in CODES:
        page = p.refusal_page(LovdError(code, "some detail"))
        assert page.title == texts.NB[f"error.{code}"]
        assert texts.NB[f"text.{code}"], code
        assert "some detail" not in page.main or "{detail}" in texts.NB[f"text.{code}"]


def test_refused_route_page() -> None:
    p = pages()
    doc, _ = read(p, p.route_refused_page("GET /pty", "not here"))
    assert "GET /pty: dette er ikke tilgjengelig i denne tjenesten" in " ".join(doc.text)
    assert doc.find("a", href="/") is not None and "Tilbake til økten din" in doc.text
    doc, _ = read(p, p.route_refused_page("GET /pty", "WebSockets are not here", "en"))
    assert "GET /pty: WebSockets are not here." in doc.text
