"""`lovd session link ID` against a real lovd (its API socket, real Podman): a new
single-use link; the session's earlier link stops working."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.lovdproc import LovdProc, remove_all

pytestmark = [pytest.mark.podman]


@pytest.fixture
def lovd(tmp_path: Path, test_image: str) -> Iterator[LovdProc]:
    p = LovdProc(tmp_path)
    yield p.start()
    remove_all(p)


def _path(url: str) -> str:
    u = urlsplit(url)
    return f"{u.path}?{u.query}"


def test_session_link_makes_a_new_single_use_link(lovd: LovdProc) -> None:
    status, _, s = lovd.api("POST", "/api/sessions")
    assert status == 201
    first = _path(s["url"])
    r = lovd.cli("session", "link", s["id"])
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    assert url.startswith(s["url"].split("?", 1)[0] + "?token=") and url != s["url"]
    assert "works once" in r.stderr
    assert lovd.api("GET", first)[0] == 401  # the earlier link no longer works
    status, headers, _ = lovd.api("GET", _path(url))
    assert status == 303 and headers["Set-Cookie"].startswith(f"lovd_session={s['id']}.")
    status, _, body = lovd.api("GET", _path(url))
    assert status == 410 and body["code"] == "link-used"
    r = lovd.cli("session", "link", "0123456789abcdef")
    assert r.returncode == 1 and "no session 0123456789abcdef" in r.stderr
