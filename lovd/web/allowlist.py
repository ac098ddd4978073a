"""Which OpenCode requests a session's browser may make: default deny.

Whoever holds a session cookie is untrusted. OpenCode's server offers far more than a
chat (terminals, a shell endpoint, file reads, config writes, TUI control, …), and the
forward_auth gate sees every proxied request's method and path (``X-Forwarded-Method``,
``X-Forwarded-Uri``) before Caddy sends it on. So the gate lets through only what the
OpenCode web UI uses for chatting, listed below, and refuses everything else with 403.

Made for **OpenCode 1.18.33** (``OPENCODE_VERSION``; packaging/images/opencode/build.sh).
How the list was derived: tests/browser/flow.mjs records every request the real web UI
makes through Caddy during a chat in Chromium (landing → start → OpenCode UI → question
→ streamed answer); those routes are here, plus the few chat actions that flow does not
click but a user will (stop a reply, answer a permission or question prompt). What the
UI can do besides chatting stays refused: terminal (``/pty``), shell, file browser and
search (``/file``, ``/find``), review diffs (``/vcs/diff``), config/provider/auth/MCP
writes, sharing, running commands, ``/tui``, ``/experimental`` (except the MCP resource
list the chat reads), ``/doc``, and every WebSocket (only the terminal uses one). The
UI's "/" menu entries ``/undo``, ``/redo``, ``/compact`` and ``/fork`` work on the
visitor's own chat (their bodies checked by lovd); ``/terminal`` (``POST /pty``) and
``/open`` (``/find/file``) stay refused: the 1.18.33 UI offers them whatever the server
answers, and they do nothing here (docs/security.md).

``GET /config``, ``/global/config`` and ``/provider`` stay allowed: the 1.18.33 UI reads
them during a chat and breaks without them. What they return must therefore hold
nothing secret (the credential broker keeps keys out of the container).

An upgrade must be reviewed: ``opencode_routes.txt`` (next to this file) is every route
of 1.18.33's ``GET /doc``; tests/integration/test_gate_opencode.py fails when the
shipped OpenCode's routes differ from it or when an allowed API route is gone.

Matching: the method (HEAD counts as GET) and the path; the query string is ignored
for matching and passed on untouched. The path is matched as sent, without decoding:
a path with ``%``, ``\\``, an empty or a dot segment is refused outright, because
OpenCode's URL parser would resolve it to a different route than the one matched here.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

OPENCODE_VERSION = "1.18.33"

# Characters a path may contain unencoded (RFC 3986 pchar without '%'). Anything else,
# notably '%' and '\', is refused rather than interpreted.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
_ID = r"[A-Za-z0-9_-]{1,128}"
_FILE = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}"
# What a path parameter may hold, by its name; any other name is an OpenCode id.
_PARAMS = {
    # The UI's project folder: base64url of an absolute path, so it starts with "L"
    # ("/" encodes to "L…"). No OpenCode API route starts with an upper-case letter.
    "dir": r"L[A-Za-z0-9_-]{0,1023}",
    # 1.18's tabbed layout names the server a chat is on: base64url of its URL (the
    # site's own origin here). Only a page route uses it: it serves the UI's index.html.
    "server": r"[A-Za-z0-9_-]{1,1024}",
    "asset": _FILE,
    "icon": _FILE + r"\.(?:ico|png|svg|webmanifest)",
}
# Remembered decisions (Allowlist.check), at most.
MAX_DECISIONS = 4096
_PARAM = re.compile(r"\{([A-Za-z0-9_]+)\}")


@dataclass(frozen=True)
class Route:
    """One allowed request shape. ``path`` uses OpenAPI's ``{param}`` templates, so API
    routes read exactly like the keys of OpenCode's ``/doc``."""

    methods: frozenset[str]
    path: str
    why: str
    api: bool = True  # an OpenCode API route (checked against /doc), else a UI page/asset
    chat: bool = False  # calls the model: the session is in use (Sessions.mark_used)
    body: bool = False  # its body can change the agent's rules: lovd checks it (bodycheck.py)
    lovd: bool = False  # lovd answers it itself (commands.py); the container is not asked
    websocket: bool = False  # may be a WebSocket upgrade
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts: list[str] = []
        last = 0
        for m in _PARAM.finditer(self.path):
            parts.append(re.escape(self.path[last : m.start()]))
            parts.append(f"(?P<{m.group(1)}>{_PARAMS.get(m.group(1), _ID)})")
            last = m.end()
        parts.append(re.escape(self.path[last:]))
        object.__setattr__(self, "pattern", re.compile("".join(parts)))

    def matches(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        m = self.pattern.fullmatch(path)
        if m is None:
            return False
        dir_ = m.groupdict().get("dir")
        return dir_ is None or _is_folder(dir_)

    @property
    def lines(self) -> list[str]:
        """``METHOD /path`` as in opencode_routes.txt (HEAD is implied by GET)."""
        return [f"{m} {self.path}" for m in sorted(self.methods) if m != "HEAD"]


def _is_folder(segment: str) -> bool:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return raw.decode().startswith("/")
    except (binascii.Error, ValueError):
        return False


def _r(methods: str, path: str, why: str, **kw: bool) -> Route:
    ms = set(methods.split())
    if "GET" in ms:
        ms.add("HEAD")
    return Route(frozenset(ms), path, why, **kw)


def _page(path: str, why: str) -> Route:
    return _r("GET", path, why, api=False)


# Kept in the order of the UI: pages and assets, what a page load reads, the chat.
OPENCODE_ROUTES: tuple[Route, ...] = (
    # The web UI itself (index.html for client-side routes, hashed assets, icons).
    _page("/", "the UI's start page"),
    _page("/{dir}", "client route: a project folder"),
    _page("/{dir}/session", "client route: a new chat in a folder"),
    _page("/{dir}/session/{id}", "client route: a chat"),
    _page("/new-session", "client route: a new chat"),
    # Where the 1.18.33 UI moves a chat opened at /{dir}/session/{id} (the landing
    # redirect, web/chat_landing.py) when its tabbed layout is on: a reload asks for it.
    _page("/server/{server}/session/{id}", "client route: a chat in the tabbed layout"),
    _page("/assets/{asset}", "the UI's JS, CSS, fonts, worker, sprites"),
    _page("/{icon}", "favicons, touch icon, web manifest, social image"),
    # Read on every page load: health, the project, what agents/models/commands exist.
    _r("GET", "/global/health", "server health and version"),
    _r("GET", "/global/config", "UI settings (must hold no secrets)"),
    _r("GET", "/config", "project config: models, agents (must hold no secrets)"),
    _r("GET", "/provider", "models to pick from (must hold no secrets)"),
    _r("GET", "/agent", "agents to pick from"),
    # lovd answers it ([]: running a command is refused, so none is offered in "/").
    _r("GET", "/command", "the slash-command list, answered by lovd", lovd=True),
    _r("GET", "/path", "the working directory"),
    _r("GET", "/project", "projects"),
    _r("GET", "/project/current", "the current project"),
    _r("GET", "/vcs", "branch shown in the header"),
    _r("GET", "/lsp", "LSP status shown in the status bar"),
    _r("GET", "/mcp", "MCP server status (Lovdata)"),
    _r("GET", "/experimental/resource", "MCP resources offered in the prompt"),
    _r("GET", "/api/health", "v2 API health"),
    _r("GET", "/api/reference", "v2 API: references offered in the prompt"),
    _r("GET", "/api/session", "v2 API: the chat list"),
    # The event stream the UI follows (Server-Sent Events, not a WebSocket).
    _r("GET", "/global/event", "live updates of chats and replies (SSE)"),
    # Chats and their messages.
    _r("GET", "/session", "the chat list"),
    _r("POST", "/session", "start a new chat", body=True),
    _r("GET", "/session/status", "which chats are busy"),
    _r("GET", "/session/{sessionID}", "one chat"),
    _r("GET", "/session/{sessionID}/message", "a chat's messages"),
    _r("GET", "/session/{sessionID}/todo", "the assistant's to-do list"),
    _r("POST", "/session/{sessionID}/prompt_async", "ask a question", chat=True, body=True),
    _r("POST", "/session/{sessionID}/abort", "stop a reply"),
    # The UI's own "/" commands on a chat (bodies checked by lovd: bodycheck.py).
    _r("POST", "/session/{sessionID}/revert", "/undo: hide the last question", body=True),
    _r("POST", "/session/{sessionID}/unrevert", "/redo: show it again", body=True),
    # A model call like a prompt: the same models, the broker's caps, chat activity.
    _r("POST", "/session/{sessionID}/summarize", "/compact", chat=True, body=True),
    _r("POST", "/session/{sessionID}/fork", "/fork: a copy of the chat", body=True),
    # Prompts the assistant may show while answering.
    _r("GET", "/permission", "pending permission prompts"),
    _r("POST", "/permission/{requestID}/reply", "answer a permission prompt"),
    _r("GET", "/question", "pending questions"),
    _r("POST", "/question/{requestID}/reply", "answer a question"),
    _r("POST", "/question/{requestID}/reject", "dismiss a question"),
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    route: Route | None
    method: str
    path: str
    reason: str = ""

    @property
    def chat(self) -> bool:
        return self.route is not None and self.route.chat

    @property
    def body(self) -> bool:
        return self.route is not None and self.route.body

    @property
    def via_lovd(self) -> bool:
        """Caddy sends it to lovd's own socket: a body to check, or lovd's own answer."""
        return self.route is not None and (self.route.body or self.route.lovd)


class Allowlist:
    """A default-deny matcher over :class:`Route` entries."""

    def __init__(self, routes: Iterable[Route] = OPENCODE_ROUTES) -> None:
        self.routes = tuple(routes)
        # A decision depends on nothing but (method, path, websocket) and the fixed
        # routes: a page's requests repeat the same few paths, so each is matched once.
        self._decided: dict[tuple[str, str, bool], Decision] = {}

    def check(self, method: str, uri: str, *, websocket: bool = False) -> Decision:
        path = uri.split("?", 1)[0].split("#", 1)[0]
        key = (method, path, websocket)
        decision = self._decided.get(key)
        if decision is None:
            decision = self._check(method.upper(), path, websocket)
            if len(self._decided) >= MAX_DECISIONS:
                self._decided.clear()  # many distinct paths: they only lose the shortcut
            self._decided[key] = decision
        return decision

    def _check(self, method: str, path: str, websocket: bool) -> Decision:
        if not _SAFE_PATH.fullmatch(path) or _odd_segments(path):
            return Decision(False, None, method, path, "the path is not in plain form")
        for route in self.routes:
            if route.matches(method, path):
                if websocket and not route.websocket:
                    return Decision(False, route, method, path, "no WebSocket here")
                return Decision(True, route, method, path)
        return Decision(False, None, method, path, "not a route of the chat")

    def api_lines(self) -> set[str]:
        """The allowed API routes as ``METHOD /path`` lines (HEAD implied by GET)."""
        return {line for r in self.routes if r.api for line in r.lines}


def _odd_segments(path: str) -> bool:
    """Empty, '.' or '..' segments: a URL parser would rewrite them to another path."""
    segments = path.split("/")[1:]
    if segments == [""]:
        return False  # "/" itself
    return any(s in ("", ".", "..") for s in segments)


def read_snapshot(text: str) -> set[str]:
    """The ``METHOD /path`` lines of opencode_routes.txt (comments and blanks skipped)."""
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
