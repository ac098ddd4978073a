"""OpenCode's web UI files, served by Caddy instead of by every session's container.

OpenCode (1.18.33) embeds its web UI in its binary and serves it from ``/`` with the
rest of its HTTP API. The UI's static files are the same public files for everyone: a
Vite build (hashed ``/assets/*`` — scripts, styles, fonts, sounds, icons) plus a few
files at the top (favicons, ``site.webmanifest``, ``social-share.png``). Loading them
through the gate from each container cost a forward_auth round trip per file and sent
them uncompressed and uncachable (issue 17).

So the first time lovd sees a session image's OpenCode version (a warm-pool container
is ready, web/gate.py), it fetches the UI's files once from that container's own HTTP
server, with the container's password, and stores them under
``<ui>/www`` with ``.zst`` and ``.gz`` siblings (``<ui>``: systemd's cache directory,
readable by Caddy, else ``<state_dir>/ui``; lovd/caddy.py ``ui_root``);
``<ui>/sets/<version>.json`` lists which files belong to which version. Caddy serves
``www`` (lovd/caddy.py: ``file_server``, precompressed, ``immutable`` on hashed names) without
forward_auth; a file not there yet goes through the gate to the container as before.

What is fetched is found by following the UI itself: the HTML shell's ``src``/``href``,
then every ``assets/<name>`` a script or style names (Vite's import map of lazy
chunks, CSS ``url(...)``), until nothing new turns up. The HTML shell itself is never
stored: it stays behind the gate with every API route.

Nothing in these files is configuration or a secret: they are byte for byte the files
in the public ``opencode-ai`` npm package, the same in every container whatever its
settings (tests/integration/test_ui_assets.py fetches them from a container whose
password and provider key are canaries and greps every file for both). HTML for any
other name is not stored (OpenCode answers a path it has no file for with its shell).

Several versions live side by side (hashed names do not collide): sessions on an older
image keep working after an upgrade. :meth:`UiAssets.prune` removes the files of
versions no running container uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

log = logging.getLogger(__name__)

VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
# What may be stored: a path of plain name parts (no "..", no hidden files).
_SAFE_PATH = re.compile(r"/(?:assets/)?[A-Za-z0-9_][A-Za-z0-9_.~-]{0,199}")
_TEXT = (".js", ".css", ".svg", ".webmanifest", ".json", ".txt", ".html", ".mjs", ".map")
_COMPRESS = (
    ".js",
    ".mjs",
    ".css",
    ".svg",
    ".webmanifest",
    ".json",
    ".txt",
    ".ttf",
    ".wasm",
    ".ico",
)
# assets/<name> in scripts (Vite's lazy-chunk map), ./<name> beside a script, url() in CSS.
_ASSET_REF = re.compile(
    r"""(?:^|["'`(/\s])(?:\./|/)?assets/([A-Za-z0-9_][A-Za-z0-9_.~-]*\.[a-z0-9]{1,12})"""
)
_SIBLING_REF = re.compile(r"""["'`(]\./([A-Za-z0-9_][A-Za-z0-9_.~-]*\.[a-z0-9]{1,12})["'`)]""")
_CSS_URL = re.compile(r"""url\(\s*["']?([^"')\s]+)["']?\s*\)""")
MAX_FILES = 5000
MAX_BYTES = 200 * 1024 * 1024
FETCH_TIMEOUT = 30.0
CONCURRENCY = 8
SERVER_ROUTE = b'"/server/:serverKey/session/:id"'


class _Shell(HTMLParser):
    """The files the HTML shell names, and the UI's entry script and styles."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        ref = a.get("src") if tag == "script" else a.get("href") if tag == "link" else ""
        if not ref or not ref.startswith("/") or ref.startswith("//"):
            return
        self.refs.append(ref)
        if tag == "script" and a.get("type") == "module":
            self.scripts.append(ref)
        elif tag == "link" and a.get("rel") == "stylesheet":
            self.styles.append(ref)
        elif tag == "link" and a.get("rel") == "modulepreload":
            self.scripts.append(ref)


@dataclass
class UiSet:
    """One OpenCode version's UI files (``sets/<version>.json``)."""

    version: str
    files: list[str]
    scripts: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)
    # What the UI's first paint needs besides its entry files: its text font (the code
    # font and KaTeX's load later, if at all).
    fonts: list[str] = field(default_factory=list)
    # Whether the UI has the server-scoped chat route (SERVER_ROUTE, OpenCode 1.18's
    # layout), where the landing page's script can put the address directly.
    server_route: bool = False


def _stored(path: str) -> bool:
    return bool(_SAFE_PATH.fullmatch(path)) and ".." not in path


def _refs(path: str, body: bytes) -> set[str]:
    """Paths a script or style names (absolute, under the site root)."""
    text = body.decode("utf-8", errors="replace")
    found = {f"/assets/{m}" for m in _ASSET_REF.findall(text)}
    if path.startswith("/assets/"):
        found |= {f"/assets/{m}" for m in _SIBLING_REF.findall(text)}
    if path.endswith(".css"):
        for ref in _CSS_URL.findall(text):
            if ref.startswith(("data:", "http:", "https:", "//", "#")):
                continue
            found.add(urlsplit(urljoin(path, ref)).path)
    if path.endswith(".webmanifest"):
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            for icon in json.loads(text).get("icons", []):
                found.add(urlsplit(urljoin(path, str(icon.get("src", "")))).path)
    return {p for p in found if _stored(p)}


_FONT_FACE = re.compile(r"@font-face\s*\{([^}]*)\}")
_FAMILY = re.compile(r"font-family\s*:\s*([^;]+)")


def _body_font(styles: list[str], got: dict[str, bytes]) -> list[str]:
    """The text fonts the entry stylesheets declare: every ``@font-face`` that is
    neither KaTeX's (loaded for a formula only) nor a monospace one (code blocks);
    for OpenCode 1.18.33 that is Inter, which its first paint uses."""
    fonts: list[str] = []
    for css in styles:
        for face in _FONT_FACE.findall(got[css].decode("utf-8", errors="replace")):
            family = _FAMILY.search(face)
            name = family.group(1) if family else ""
            if not name or "katex" in name.lower() or "mono" in name.lower():
                continue
            for ref in _CSS_URL.findall(face):
                path = urlsplit(urljoin(css, ref)).path
                if path in got and path not in fonts:
                    fonts.append(path)
    return fonts


class UiAssets:
    """The host's copy of the OpenCode UI's static files (see the module docstring)."""

    def __init__(self, root: Path, http: aiohttp.ClientSession) -> None:
        self.root = root
        self.www = root / "www"
        self.sets = root / "sets"
        self.http = http
        self._busy: dict[str, asyncio.Task[UiSet | None]] = {}

    def get(self, version: str) -> UiSet | None:
        if not VERSION.fullmatch(version):
            return None
        try:
            raw = json.loads((self.sets / f"{version}.json").read_text())
            ui = UiSet(
                version=str(raw["version"]),
                files=[str(f) for f in raw["files"]],
                scripts=[str(s) for s in raw.get("scripts", [])],
                styles=[str(s) for s in raw.get("styles", [])],
                fonts=[str(s) for s in raw.get("fonts", [])],
                server_route=raw.get("server_route") is True,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if "server_route" not in raw:
            # A set stored by an older lovd: look in its entry script once, and keep
            # the answer (a stored version is never fetched again).
            ui.server_route = self._has_server_route(ui.scripts)
            with contextlib.suppress(OSError):
                _atomic(self.sets / f"{version}.json", _meta(ui))
        return ui

    def _has_server_route(self, scripts: list[str]) -> bool:
        for s in scripts:
            with contextlib.suppress(OSError):
                if _stored(s) and SERVER_ROUTE in (self.www / s.lstrip("/")).read_bytes():
                    return True
        return False

    def versions(self) -> list[str]:
        """Stored versions, newest file first."""
        try:
            sets = sorted(self.sets.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return []
        return [p.stem for p in sets]

    def ensure(self, version: str, base: str, auth: str) -> asyncio.Task[UiSet | None] | None:
        """Start fetching ``version``'s files from the container at ``base`` unless they
        are stored or being fetched; the task's result is the set (None when it failed)."""
        if not VERSION.fullmatch(version) or self.get(version) is not None:
            return None
        task = self._busy.get(version)
        if task is None or task.done():
            task = asyncio.create_task(self._extract_logged(version, base, auth))
            self._busy[version] = task
        return task

    async def _extract_logged(self, version: str, base: str, auth: str) -> UiSet | None:
        try:
            return await self.extract(version, base, auth)
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("could not store OpenCode %s's UI files: %r", version, e)
            return None

    async def extract(self, version: str, base: str, auth: str) -> UiSet:
        """Fetch, store and compress the UI of the OpenCode server at ``base``."""
        if not VERSION.fullmatch(version):
            raise ValueError(f"not an OpenCode version: {version!r}")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        shell_body = await self._fetch(base, auth, "/")
        if shell_body is None:
            raise ValueError("OpenCode's HTML shell did not load")
        shell = _Shell()
        shell.feed(shell_body.decode("utf-8", errors="replace"))
        todo = {p for p in shell.refs if _stored(p)}
        seen: set[str] = set()
        got: dict[str, bytes] = {}
        total = 0
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(path: str) -> tuple[str, bytes | None]:
            async with sem:
                return path, await self._fetch(base, auth, path)

        while todo:
            seen |= todo
            if len(seen) > MAX_FILES:
                raise ValueError(f"OpenCode's UI names more than {MAX_FILES} files")
            results = await asyncio.gather(*(one(p) for p in sorted(todo)))
            todo = set()
            for path, body in results:
                if body is None:
                    continue
                got[path] = body
                total += len(body)
                if total > MAX_BYTES:
                    raise ValueError("OpenCode's UI is larger than lovd stores")
                if path.endswith(_TEXT):
                    todo |= _refs(path, body) - seen
        styles = [s for s in shell.styles if s in got]
        ui = UiSet(
            version=version,
            files=sorted(got),
            scripts=[s for s in shell.scripts if s in got],
            styles=styles,
            fonts=_body_font(styles, got),
            server_route=any(SERVER_ROUTE in got.get(s, b"") for s in shell.scripts),
        )
        await asyncio.to_thread(self._write, ui, got)
        log.info(
            "stored OpenCode %s's UI: %d files, %.1f MB, in %.1f s",
            version,
            len(got),
            total / 1e6,
            loop.time() - t0,
        )
        return ui

    async def _fetch(self, base: str, auth: str, path: str) -> bytes | None:
        async with self.http.get(
            base + path,
            headers={"Authorization": auth, "Accept-Encoding": "identity"},
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
            allow_redirects=False,
        ) as r:
            if r.status != 200:
                return None
            ctype = r.headers.get("Content-Type", "")
            body = await r.read()
        if path != "/" and "text/html" in ctype:
            return None  # OpenCode's answer (its HTML shell) for a path it has no file for
        return body

    def _write(self, ui: UiSet, got: dict[str, bytes]) -> None:
        for d in (self.root, self.www, self.sets):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)  # Caddy runs as another user: it reads, never writes
        zstd = shutil.which("zstd")
        for path, body in got.items():
            if path == "/":
                continue
            dest = self.www / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.parent.chmod(0o755)
            if dest.exists() and dest.read_bytes() == body:
                continue
            _atomic(dest, body)
            if path.endswith(_COMPRESS) and len(body) > 256:
                _atomic(dest.with_name(dest.name + ".gz"), gzip.compress(body, 9, mtime=0))
                if zstd:
                    _zstd(zstd, dest)
        _atomic(self.sets / f"{ui.version}.json", _meta(ui))

    def prune(self, live: Iterable[str]) -> int:
        """Forget every version not in ``live`` (the versions running containers use) and
        delete the files only they had. Returns how many files were deleted."""
        keep_versions = set(live)
        keep: set[str] = set()
        gone: list[Path] = []
        for version in self.versions():
            ui = self.get(version)
            if ui is None:
                continue
            if version in keep_versions:
                keep |= set(ui.files)
            else:
                gone.append(self.sets / f"{version}.json")
        if not gone:
            return 0
        removed = 0
        for version_file in gone:
            ui = self.get(version_file.stem)
            for path in ui.files if ui else []:
                if path in keep or not _stored(path):
                    continue
                for f in (path, path + ".gz", path + ".zst"):
                    with contextlib.suppress(FileNotFoundError):
                        (self.www / f.lstrip("/")).unlink()
                        removed += 1
            with contextlib.suppress(FileNotFoundError):
                version_file.unlink()
            log.info("removed OpenCode %s's UI files (no container uses it)", version_file.stem)
        return removed


def _meta(ui: UiSet) -> bytes:
    """``sets/<version>.json``."""
    return json.dumps(dataclasses.asdict(ui), indent=1).encode()


def _atomic(dest: Path, body: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _zstd(binary: str, src: Path) -> None:
    """``<file>.zst`` beside ``src`` (Python 3.11 has no zstd; the zstd tool is common)."""
    import subprocess

    dest = src.with_name(src.name + ".zst")
    tmp = src.with_name(f".tmp-{src.name}.zst")
    done = subprocess.run(
        [binary, "-q", "-12", "-f", "-o", str(tmp), str(src)], capture_output=True, check=False
    )
    if done.returncode == 0:
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    else:
        log.warning("zstd failed on %s: %s", src.name, done.stderr.decode(errors="replace")[:200])
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def describe(ui: UiSet | None) -> dict[str, Any]:
    return {"version": ui.version, "files": len(ui.files)} if ui else {}
