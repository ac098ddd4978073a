"""Chat requests whose body could change what the agent may do go through lovd.

The allowlist (web/allowlist.py) decides on method and path, but some allowed requests
carry settings in their body that OpenCode (1.18.33) acts on with the container's own
rights:

- ``POST /session/{id}/prompt_async`` accepts ``tools`` (``{"bash": true}`` becomes a
  session-level "allow" for bash, overriding ``permission: {bash: deny}``), ``system``
  (replaces the agent's instructions), ``format``, any ``model`` of any provider (paid
  with the operator's key), any ``agent``, and parts that start sub-agents or make the
  server read a file: a file part with a ``file://`` URL is read from the container's
  disk and copied into the chat database (``/usr/bin/node``: +507 MB;
  ``/run/secrets/lovd.env``: the container's password, shown in the chat), a
  ``source: {"type": "resource"}`` reads an MCP resource, an ``http(s)`` URL is
  fetched on the server side by the model SDK;
- ``POST /session`` accepts ``permission`` (a whole rule set), ``metadata`` and
  ``workspaceID``;
- the UI's own "/" commands on a chat: ``/undo`` and its redo (``POST
  /session/{id}/revert`` ``{messageID, partID?}``, ``/unrevert`` with no body),
  ``/compact`` (``POST /session/{id}/summarize`` ``{providerID, modelID, auto?}``: a
  model call, so only a model the service offers) and ``/fork`` (``POST
  /session/{id}/fork`` ``{messageID?}``). OpenCode only compares those ids with the
  chat's own messages (revert, fork) and copies the chat into a new one in the same
  container (fork); a summary is written by its hidden ``compaction`` agent, which has
  no tools, with the model named in the body -- so that model is checked here.

forward_auth never sees a body. So for these routes the gate answers Caddy with
lovd's own public socket as the upstream, and this module receives the request, keeps
only what the chat UI sends -- every field and every value checked, default deny --
and forwards it to the session's container with the container's password. Everything
else streams from the browser to the container as before. The one thing lovd adds: a
new chat's title, "Ny samtale" until its first question (chattitle.py).

What the 1.18.33 web UI sends (read from its bundle): text parts ``{id, type, text}``;
an attached file (image, PDF, or text) as ``{id, type: "file", mime, url:
"data:<mime>;base64,...", filename}`` with mime image/png|jpeg|gif|webp,
application/pdf or text/plain; the model ``{providerID, modelID}``, the agent, the
model variant, and a message id.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from yarl import URL

from lovd.errors import LovdError
from lovd.session.model import Session
from lovd.web.chattitle import ChatTitles, titled

log = logging.getLogger(__name__)

# A question with an attached file: the largest attachment, base64 (4/3), and the rest.
MAX_FILE = 5 * 1024 * 1024
MAX_BODY = MAX_FILE * 4 // 3 + 256 * 1024
# The "/" commands' bodies are a few ids: anything larger is not from the UI.
MAX_SMALL_BODY = 4096
MAX_TEXT = 256 * 1024  # characters in one text part
MAX_PARTS = 32
# The agent a session offers (config_opencode/opencode.jsonc "default_agent").
LEGAL_AGENT = "juridisk"
# What the 1.18.33 web UI sends (its SDK's PromptInput / session create), nothing more.
PROMPT_FIELDS = frozenset({"parts", "messageID", "model", "agent", "variant", "noReply"})
SESSION_FIELDS = frozenset({"title", "parentID", "agent", "model"})
# The bodies of the chat actions the UI's "/" menu offers (1.18.33's /doc schemas, which
# OpenCode also validates with additionalProperties: false), by the route's last segment.
ACTION_FIELDS = {
    "revert": frozenset({"messageID", "partID"}),
    "unrevert": frozenset(),
    "summarize": frozenset({"providerID", "modelID", "auto"}),
    "fork": frozenset({"messageID"}),
}
REQUIRED = {"revert": ("messageID",), "summarize": ("providerID", "modelID")}
FIELDS = {"prompt": PROMPT_FIELDS, "session": SESSION_FIELDS, **ACTION_FIELDS}
# The route (last path segment) each kind of checked request comes on.
KINDS = {"prompt_async": "prompt", **{k: k for k in ACTION_FIELDS}}
# Requests that add to the chat database: refused once the disk quota is reached.
WRITES = frozenset({"prompt", "summarize", "fork"})
# The session's project: the container's working directory, where every chat is. OpenCode
# takes another from ``?directory=`` or ``x-opencode-directory`` (and a remote workspace
# from ``?workspace=`` / ``x-opencode-workspace``); a revert run elsewhere would snapshot
# and diff that directory, so the actions run only here.
WORKDIR = "/work"
PART_TYPES = frozenset({"text", "file"})
PART_FIELDS = {
    "text": frozenset({"id", "type", "text"}),
    "file": frozenset({"id", "type", "mime", "url", "filename"}),
}
MODEL_FIELDS = frozenset({"providerID", "modelID"})
# The attachments the UI offers (its file picker and paste handler).
FILE_MIMES = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf", "text/plain"}
)
# OpenCode's reasoning-effort variants (providers' "effort" values).
VARIANTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})
_ID = {
    "messageID": re.compile(r"msg_[A-Za-z0-9]{1,60}"),
    "parentID": re.compile(r"ses_[A-Za-z0-9]{1,60}"),
    "id": re.compile(r"prt_[A-Za-z0-9]{1,60}"),
    "partID": re.compile(r"prt_[A-Za-z0-9]{1,60}"),
}
_DATA_URL = re.compile(r"data:([a-z0-9.+/-]+);base64,([A-Za-z0-9+/]*={0,2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DROP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "authorization",
        "cookie",
        "te",
        "upgrade",
    }
)


@dataclass(frozen=True)
class Rules:
    """What a session's chat may ask for: its models ("provider/model") and agent."""

    models: frozenset[str]
    agent: str = LEGAL_AGENT


def _refuse(field: str, why: str) -> LovdError:
    return LovdError("forbidden", f"{field}: {why}", extra={"field": field})


def _fields(where: str, value: dict[str, Any], allowed: frozenset[str]) -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        names = ", ".join(f"{where}{k}" for k in extra)
        raise _refuse(
            f"{where}{extra[0]}",
            f"{names} not available in this service (only {', '.join(sorted(allowed))})",
        )


def _string(field: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise _refuse(field, "must be a string")
    if len(value) > limit:
        raise _refuse(field, f"at most {limit} characters")
    return value


def _ident(field: str, value: Any) -> None:
    key = field.rsplit(".", 1)[-1]
    if not isinstance(value, str) or not _ID[key].fullmatch(value):
        raise _refuse(field, f"not an OpenCode id ({_ID[key].pattern})")


def _model(field: str, value: Any, rules: Rules) -> None:
    if not isinstance(value, dict):
        raise _refuse(field, "must be an object {providerID, modelID}")
    _fields(f"{field}.", value, MODEL_FIELDS)
    _model_name(field, value.get("providerID"), value.get("modelID"), rules)


def _model_name(field: str, provider: Any, model: Any, rules: Rules) -> None:
    name = f"{provider}/{model}"
    if not isinstance(provider, str) or not isinstance(model, str) or name not in rules.models:
        if not rules.models:
            raise _refuse(field, f"{name}: no model is configured (the operator sets llm.model)")
        allowed = ", ".join(sorted(rules.models))
        raise _refuse(field, f"{name} is not available in this service (only {allowed})")


def _agent(field: str, value: Any, rules: Rules) -> None:
    if value != rules.agent:
        raise _refuse(field, f"{value!r} is not available in this service (only {rules.agent!r})")


def _file(where: str, part: dict[str, Any]) -> None:
    mime = part.get("mime")
    if not isinstance(mime, str) or mime not in FILE_MIMES:
        raise _refuse(
            f"{where}.mime",
            f"{mime!r}: only images (PNG, JPEG, GIF, WebP), PDF and plain text can be attached",
        )
    url = part.get("url")
    if not isinstance(url, str) or not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else "none"
        raise _refuse(
            f"{where}.url",
            f"{scheme!r} URLs are not available in this service (attach the file itself: "
            "only data: URLs)",
        )
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise _refuse(f"{where}.url", "must be data:<mime>;base64,<data>")
    if m.group(1) != mime:
        raise _refuse(f"{where}.url", f"its type {m.group(1)!r} is not the part's mime {mime!r}")
    data = m.group(2)
    if len(data) * 3 // 4 - data.count("=") > MAX_FILE:
        raise _refuse(f"{where}.url", f"an attached file may be at most {MAX_FILE // 2**20} MB")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _refuse(f"{where}.url", "not valid base64") from e
    if "filename" in part:
        name = _string(f"{where}.filename", part["filename"], 255)
        if _CONTROL.search(name):
            raise _refuse(f"{where}.filename", "contains control characters")


def _parts(parts: Any) -> None:
    if not isinstance(parts, list):
        raise LovdError("bad-request", "parts must be a list")
    if len(parts) > MAX_PARTS:
        raise _refuse("parts", f"at most {MAX_PARTS} parts in one message")
    for i, part in enumerate(parts):
        where = f"parts[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or kind not in PART_TYPES:
            raise _refuse(
                f"{where}.type",
                f"message parts of type {kind!r} are not available in this service "
                f"(only {', '.join(sorted(PART_TYPES))})",
            )
        _fields(f"{where}.", part, PART_FIELDS[kind])
        if "id" in part:
            _ident(f"{where}.id", part["id"])
        if kind == "text":
            _string(f"{where}.text", part.get("text"), MAX_TEXT)
        else:
            _file(where, part)


def kind_of(path: str) -> str:
    """Which checked request a path is: ``session`` (``POST /session``), ``prompt`` or
    one of the "/" commands' actions (``POST /session/{id}/<action>``)."""
    if path == "/session":
        return "session"
    parts = path.split("/")
    if len(parts) == 4 and parts[1] == "session" and parts[3] in KINDS:
        return KINDS[parts[3]]
    raise LovdError("not-found", f"there is nothing at {path}")


def check_place(query: Iterable[tuple[str, str]], headers: Iterable[tuple[str, str]]) -> None:
    """Refuse a "/" action aimed at another directory or workspace than the chat's own
    (what the UI sends: ``x-opencode-directory: %2Fwork``, or nothing). Every copy of a
    repeated name is checked (a server may read the last)."""
    places = [(k, v) for k, v in query] + [
        (k.lower().removeprefix("x-opencode-"), v)
        for k, v in headers
        if k.lower() in ("x-opencode-directory", "x-opencode-workspace")
    ]
    for name, value in places:
        if name != "directory":
            raise _refuse(name, "not available in this service (a chat has one folder)")
        if unquote(value) != WORKDIR:
            raise _refuse("directory", f"{value[:100]!r}: the chat's folder is {WORKDIR}")


def check(kind: str, body: Any, rules: Rules) -> None:
    """Raise ``forbidden`` (naming the field) when the body asks for more than the chat
    UI does: every field and every value is checked, anything else is refused."""
    if not isinstance(body, dict):
        raise LovdError("bad-request", "the request body must be a JSON object")
    allowed = FIELDS[kind]
    extra = sorted(set(body) - allowed)
    if extra:
        only = ", ".join(sorted(allowed)) or "nothing"
        raise _refuse(
            extra[0],
            f"{', '.join(extra)}: not available in this service (this request may set only {only})",
        )
    for key in REQUIRED.get(kind, ()):
        if key not in body:
            raise _refuse(key, "required")
    for key, value in body.items():
        if key == "model":
            _model("model", value, rules)
        elif key == "agent":
            _agent("agent", value, rules)
        elif key == "variant":
            if value is not None and (not isinstance(value, str) or value not in VARIANTS):
                raise _refuse("variant", f"{value!r} is not a model variant this service offers")
        elif key in ("noReply", "auto"):
            if not isinstance(value, bool):
                raise _refuse(key, "must be true or false")
        elif key in ("messageID", "parentID", "partID"):
            _ident(key, value)
        elif key == "title":
            _string("title", value, 1024)
    if kind == "prompt":
        _parts(body.get("parts"))
    elif kind == "summarize":
        # The model the summary is written with (OpenCode's compaction agent).
        _model_name("modelID", body["providerID"], body["modelID"], rules)


class BodyCheck:
    """The handler behind the checked routes (on lovd's public socket)."""

    def __init__(
        self,
        *,
        session_of: Callable[[web.Request], Session],
        password_header: Callable[[str], str],
        http: aiohttp.ClientSession,
        rules: Rules,
        disk_refusal: Callable[[str], Awaitable[str]] | None = None,
        disk_grew: Callable[[str, int], None] | None = None,
    ) -> None:
        self.session_of = session_of
        self.password_header = password_header
        self.http = http
        self.rules = rules
        # The per-session disk quota (lovd/session/quota.py): why a prompt is refused
        # ("" when it may go), and how much a forwarded prompt may have added.
        self.disk_refusal = disk_refusal
        self.disk_grew = disk_grew
        # A new chat is "Ny samtale" until its first question (chattitle.py).
        self.titles = ChatTitles(http=http, password_header=password_header)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``session_of`` authenticates the cookie again: this socket is reachable by
        anything that can reach the landing page, not only through forward_auth."""
        s = self.session_of(request)
        if not s.serving:
            raise LovdError("unavailable", "the session is not running; reload the page")
        kind = kind_of(request.path)
        raw = await _read(request, MAX_BODY if kind in ("prompt", "session") else MAX_SMALL_BODY)
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise LovdError("invalid-json", "the request body is not valid JSON") from e
        try:
            check(kind, body, self.rules)
            if kind in ACTION_FIELDS:
                check_place(request.query.items(), request.headers.items())
        except LovdError as e:
            log.info("refused a %s request body: %s", kind, e.message, extra={"SESSION_ID": s.id})
            # "data.message" is where OpenCode's web UI looks for an error's text (its
            # toast shows it instead of "Request failed").
            e.extra.setdefault("data", {"message": e.message})
            raise
        if kind in WRITES and self.disk_refusal is not None:
            why = await self.disk_refusal(s.id)
            if why:
                log.info("refused a %s: disk quota reached", kind, extra={"SESSION_ID": s.id})
                raise LovdError("quota-exceeded", why, extra={"data": {"message": why}})
        if kind == "session":
            body = titled(body)  # what lovd adds is its own title, never a setting
        elif kind == "prompt":
            # /session/{id}/prompt_async: the id's characters were checked by the gate.
            await self.titles.before_prompt(s.id, s.port, request.path.split("/")[2])
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS}
        headers = {k: v for k, v in headers.items() if not k.lower().startswith("x-lovd-")}
        headers["Authorization"] = self.password_header(s.id)
        # The query exactly as sent (OpenCode reads ?directory=…), not re-encoded.
        url = URL(f"http://127.0.0.1:{s.port}{request.raw_path}", encoded=True)
        try:
            # What was checked is what is sent: the parsed body, serialised again.
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
            if kind == "prompt" and self.disk_grew is not None:
                # Counted before the next measurement, so a burst of prompts cannot
                # overshoot the quota by more than the last one; three times, as OpenCode
                # stores an attachment about three times over (its tables and SQLite's
                # WAL; measured in tests/integration/test_chat_bodies.py).
                self.disk_grew(s.id, 3 * len(payload))
            async with self.http.post(url, data=payload, headers=headers) as r:
                data = await r.read()
                out = web.Response(status=r.status, body=data)
                for name in ("Content-Type", "Cache-Control"):
                    if name in r.headers:
                        out.headers[name] = r.headers[name]
                return out
        except (aiohttp.ClientError, TimeoutError) as e:
            raise LovdError("unavailable", "the session did not answer; try again") from e


async def _read(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The whole body, refused once it passes ``limit`` (``read(n)`` alone may stop at
    the first chunk)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise LovdError("body-too-large", f"this chat request may be at most {limit} bytes")
        chunks.append(chunk)
