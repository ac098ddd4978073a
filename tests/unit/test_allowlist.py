"""The OpenCode route allowlist (lovd/web/allowlist.py): what a session's browser may ask.

Each refused shape is an attack a session's user can try with curl and their cookie; each
allowed one is a request the real web UI made during a chat (tests/browser/flow.mjs).
"""

from __future__ import annotations

import re

import pytest

from lovd.web.allowlist import OPENCODE_ROUTES, OPENCODE_VERSION, Allowlist, read_snapshot
from tests.conftest import ROOT

SES = "ses_1a2b3c4d5e6fABCDEFGHIJKLMN"
PER = "per_1a2b3c4d5e6fABCDEFGHIJKLMN"
DIR = "L3dvcms"  # base64url("/work"), the UI's folder segment

# What the OpenCode 1.18.33 web UI requested through the gate during a chat in
# Chromium (tests/browser/flow.mjs, ids filled in again). Static files' names vary by
# build; the patterns they match do not.
UI_REQUESTS = [
    ("GET", "/"),
    ("GET", f"/{DIR}/session/{SES}"),
    ("GET", "/assets/index-jmcwmLQ6.js"),
    ("GET", "/assets/index-DLiUNAg_.css"),
    ("GET", "/assets/Inter.ttf"),
    ("GET", "/assets/markdown.worker-Bu_Dc9RP.js"),
    ("GET", "/assets/sprite-CMBzwCGs.svg"),
    ("GET", "/assets/staplebops-01-gmydkbKo.js"),
    ("GET", "/favicon-v3.ico"),
    ("GET", "/apple-touch-icon-v3.png"),
    ("GET", "/site.webmanifest"),
    ("GET", "/agent"),
    ("GET", "/api/health"),
    ("GET", "/api/reference"),
    ("GET", "/api/session"),
    ("GET", "/command"),
    ("GET", "/config"),
    ("GET", "/experimental/resource"),
    ("GET", "/global/config"),
    ("GET", "/global/event"),
    ("GET", "/global/health"),
    ("GET", "/lsp"),
    ("GET", "/mcp"),
    ("GET", "/path"),
    ("GET", "/permission"),
    ("GET", "/project"),
    ("GET", "/project/current"),
    ("GET", "/provider"),
    ("GET", "/question"),
    ("GET", "/session"),
    ("GET", f"/session/{SES}"),
    ("GET", f"/session/{SES}/message"),
    ("GET", f"/session/{SES}/todo"),
    ("GET", "/session/status"),
    ("GET", "/vcs"),
    ("POST", "/session"),
    ("POST", f"/session/{SES}/prompt_async"),
]

# Chat actions the flow does not click but a user will.
CHAT_ACTIONS = [
    ("POST", f"/session/{SES}/abort"),
    # The "/" menu: /undo, /redo, /compact, /fork (bodies checked: test_chat_actions.py).
    ("POST", f"/session/{SES}/revert"),
    ("POST", f"/session/{SES}/unrevert"),
    ("POST", f"/session/{SES}/summarize"),
    ("POST", f"/session/{SES}/fork"),
    ("POST", f"/permission/{PER}/reply"),
    ("POST", "/question/que_1/reply"),
    ("POST", "/question/que_1/reject"),
    ("GET", f"/{DIR}"),
    ("GET", f"/{DIR}/session"),
    ("GET", "/new-session"),
    ("GET", "/favicon-96x96-v3.png"),
    ("GET", "/favicon-v3.svg"),
    ("GET", "/social-share.png"),
]

# What a hostile session user tries: routes the chat does not need.
ATTACKS = [
    # terminals
    ("GET", "/pty"),
    ("POST", "/pty"),
    ("GET", "/pty/shells"),
    ("GET", "/pty/pty_1"),
    ("PUT", "/pty/pty_1"),
    ("GET", "/pty/pty_1/connect"),
    ("POST", "/pty/pty_1/connect-token"),
    ("POST", "/api/pty"),
    ("GET", "/api/pty/pty_1/connect"),
    # shell and commands
    ("POST", f"/session/{SES}/shell"),
    ("POST", f"/session/{SES}/command"),
    ("POST", f"/session/{SES}/init"),
    # files and search
    ("GET", "/file?path=/"),
    ("GET", "/file/content?path=/run/secrets/lovd.env"),
    ("GET", "/file/status"),
    ("GET", "/find?pattern=CANARY"),
    ("GET", "/find/file?query=lovd.env"),
    ("GET", "/find/symbol?query=x"),
    ("GET", "/api/fs/read/run/secrets/lovd.env"),
    ("GET", "/api/fs/list"),
    ("GET", "/api/fs/find"),
    ("GET", "/vcs/diff"),
    ("GET", "/vcs/diff/raw"),
    ("POST", "/vcs/apply"),
    ("GET", f"/session/{SES}/diff"),
    # TUI remote control
    ("POST", "/tui/append-prompt"),
    ("POST", "/tui/submit-prompt"),
    ("POST", "/tui/execute-command"),
    ("GET", "/tui/control/next"),
    ("POST", "/tui/control/response"),
    ("POST", "/tui/publish"),
    # config, provider, auth and MCP writes; config reads that may hold secrets
    ("PATCH", "/config"),
    ("PATCH", "/global/config"),
    ("GET", "/config/providers"),
    ("GET", "/provider/auth"),
    ("POST", "/provider/openai/oauth/authorize"),
    ("POST", "/provider/openai/oauth/callback"),
    ("PUT", "/auth/openai"),
    ("DELETE", "/auth/openai"),
    ("PATCH", "/api/credential/cred_1"),
    ("POST", "/api/integration/x/connect/key"),
    ("POST", "/mcp"),
    ("POST", "/mcp/lovdata/connect"),
    ("POST", "/mcp/lovdata/disconnect"),
    ("POST", "/mcp/lovdata/auth"),
    # session changes that carry a permission ruleset, sharing, history rewrites
    ("PATCH", f"/session/{SES}"),
    ("DELETE", f"/session/{SES}"),
    ("POST", f"/session/{SES}/share"),
    ("POST", f"/session/{SES}/message"),  # the UI prompts with prompt_async only
    ("POST", f"/session/{SES}/permissions/{PER}"),
    # the server itself
    ("POST", "/global/upgrade"),
    ("POST", "/global/dispose"),
    ("POST", "/instance/dispose"),
    ("POST", "/log"),
    ("GET", "/doc"),
    ("GET", "/event"),
    ("POST", "/project/git/init"),
    ("POST", "/experimental/worktree"),
    ("GET", "/experimental/console"),
    ("POST", "/experimental/workspace/warp"),
    ("POST", "/sync/start"),
    ("OPTIONS", "/session"),
    ("TRACE", "/"),
    # the same, dressed up so that a naive matcher would take it for an allowed route
    ("GET", "/p%74y"),
    ("GET", "/%70ty/pty_1/connect"),
    ("GET", "/PTY"),
    ("GET", "/assets/../pty"),
    ("GET", "/assets/%2e%2e/file/content"),
    ("GET", "/assets/..%2ffile%2fcontent"),
    ("GET", "/assets\\..\\pty"),
    ("GET", f"/{DIR}/../pty"),
    ("GET", f"/{DIR}/session/../../pty"),
    ("GET", f"/session/{SES}/../../file/content"),
    ("GET", "//pty"),
    ("GET", "/./pty"),
    ("POST", "/session//shell"),
    ("GET", "/assets/.env"),
    ("GET", "/pty/session/x"),  # a "folder" that is an API path, not base64 of "/…"
    ("GET", "/file/session"),
    ("GET", "/L"),  # not base64
    ("GET", "pty"),
    ("GET", ""),
]


@pytest.mark.parametrize(("method", "uri"), UI_REQUESTS + CHAT_ACTIONS)
def test_what_the_chat_uses_is_allowed(method: str, uri: str) -> None:
    d = Allowlist().check(method, uri)
    assert d.allowed, (method, uri, d.reason)


@pytest.mark.parametrize(("method", "uri"), ATTACKS)
def test_everything_else_is_refused(method: str, uri: str) -> None:
    d = Allowlist().check(method, uri)
    assert not d.allowed and d.reason, (method, uri)


def test_query_is_ignored_for_matching() -> None:
    a = Allowlist()
    assert a.check("GET", "/session?directory=/work&roots=true&limit=50").allowed
    assert a.check("GET", f"/session/{SES}/message?limit=100#x").allowed
    # …and cannot smuggle a path in.
    assert not a.check("GET", "/file/content?x=/session").allowed


def test_head_goes_with_get_and_nothing_else() -> None:
    a = Allowlist()
    assert a.check("HEAD", "/assets/index-jmcwmLQ6.js").allowed
    assert a.check("head", "/global/health").allowed  # methods are case-insensitive
    assert not a.check("HEAD", f"/session/{SES}/prompt_async").allowed
    assert not a.check("GET", f"/session/{SES}/prompt_async").allowed


def test_no_websocket_anywhere() -> None:
    a = Allowlist()
    for method, uri in UI_REQUESTS:
        d = a.check(method, uri, websocket=True)
        assert not d.allowed and d.reason == "no WebSocket here", uri


def test_only_model_calls_are_chat_requests() -> None:
    """A prompt and /compact (a summary written by the model) keep a session's place."""
    a = Allowlist()
    chat = [(m, u) for m, u in UI_REQUESTS + CHAT_ACTIONS if a.check(m, u).chat]
    assert chat == [("POST", f"/session/{SES}/prompt_async"), ("POST", f"/session/{SES}/summarize")]


def test_allowed_api_routes_exist_in_the_recorded_opencode() -> None:
    """Renames are caught here against the snapshot, and against the live OpenCode in
    tests/integration/test_gate_opencode.py."""
    snapshot = read_snapshot((ROOT / "lovd" / "web" / "opencode_routes.txt").read_text())
    assert len(snapshot) > 150
    assert Allowlist().api_lines() - snapshot == set()
    # The UI's own pages are not API routes and must not be checked as such.
    assert all(not r.api for r in OPENCODE_ROUTES if r.path.startswith(("/{", "/assets", "/new")))


def test_made_for_the_opencode_that_is_shipped() -> None:
    """Bumping OpenCode in the image build fails here until the allowlist is reviewed
    (and its snapshot replaced) for the new version."""
    build = (ROOT / "packaging" / "images" / "opencode" / "build.sh").read_text()
    m = re.search(r"^OPENCODE_VERSION=\$\{OPENCODE_VERSION:-([0-9.]+)\}", build, re.M)
    assert m is not None
    assert m.group(1) == OPENCODE_VERSION
    header = (ROOT / "lovd" / "web" / "opencode_routes.txt").read_text().splitlines()[0]
    assert f"OpenCode {OPENCODE_VERSION}" in header
