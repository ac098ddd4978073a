"""The credential broker: session containers call the LLM providers and the Lovdata MCP
server through lovd, which adds the operator's credentials on the way out.

Why: everything inside a session container is readable by whoever uses the session
(OpenCode serves its config, files and environment to its user). So a container holds
only a per-session credential, ``<session id>.<secret>``, that

- is worthless outside lovd (the broker listens on the host's loopback, reached by
  sessions at ``host_gateway``; the upstreams never see it),
- is new at every start of the session's container (lovd stores only its hash) and
  dies when the session stops, is deleted or expires.

The broker passes request and response bodies through unchanged (streams unbuffered, no
read timeout), with one exception: a streamed OpenAI-style chat request is asked to
include usage in its last chunk, so tokens can be counted. Usage per session and per UTC
day is kept in a :class:`~lovd.broker.usage.Ledger`; the caps
(``llm.max_tokens_per_session``, ``llm.max_tokens_per_day``) are answered with an error in
the provider's own format, so the chat shows its message.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from lovd import ids
from lovd.broker import upstreams
from lovd.broker.upstreams import Upstream
from lovd.broker.usage import Ledger, UsageReader
from lovd.config import Config
from lovd.metrics import Metrics
from lovd.session.model import Session
from lovd.store import Store

log = logging.getLogger(__name__)

# States whose container may hold a valid credential (a warm container's OpenCode
# connects to the MCP server while it boots).
LIVE_STATES = frozenset({"warm", "starting", "running"})
MAX_REQUEST_BODY = 32 * 1024 * 1024  # long conversations with attachments
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    }
)
# No read timeout: an answer may think for minutes and an MCP event stream stays open.
_UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30)


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Broker:
    def __init__(
        self,
        *,
        store: Store,
        upstreams: dict[str, Upstream],
        http: aiohttp.ClientSession,
        ledger: Ledger,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        on_request: Callable[[], None] | None = None,
        on_session_call: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.upstreams = upstreams
        self.http = http
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.on_request = on_request or (lambda: None)
        # A session calling its model is answering: that is activity (an answer must
        # never be cut off by idle_timeout).
        self.on_session_call = on_session_call or (lambda sid: None)
        metrics.track_usage(self.usage_by_session)

    @classmethod
    async def from_config(
        cls,
        config: Config,
        *,
        store: Store,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        demo_urls: dict[str, str],
        on_request: Callable[[], None] | None = None,
        on_session_call: Callable[[str], None] | None = None,
    ) -> Broker:
        """The broker for ``config`` (and demo mode's stand-ins), with its usage loaded."""
        broker = cls(
            store=store,
            upstreams=upstreams.from_config(config, demo_urls),
            http=http,
            ledger=Ledger(config.max_tokens_per_session, config.max_tokens_per_day),
            metrics=metrics,
            on_request=on_request,
            on_session_call=on_session_call,
        )
        await broker.load()
        return broker

    # --- usage: persistence and reporting ---

    async def load(self) -> None:
        rows, days = await self.store.load_usage()
        for sid, r in rows.items():
            u = self.ledger.of(sid)
            u.llm_requests, u.input_tokens, u.output_tokens, u.mcp_requests, u.refused = r[:5]
        self.ledger.days.update(days)
        self.ledger.dirty.clear()

    async def flush(self) -> None:
        rows, days = self.ledger.take_dirty()
        await self.store.save_usage(
            {
                sid: (u.llm_requests, u.input_tokens, u.output_tokens, u.mcp_requests, u.refused)
                for sid, u in rows.items()
            },
            days,
        )
        for sid in [s for s in self.ledger.sessions if self.store.get(s) is None]:
            self.ledger.forget(sid)

    def usage(self, sid: str) -> dict[str, int]:
        u = self.ledger.sessions.get(sid)
        return u.as_dict() if u is not None else Ledger().of(sid).as_dict()

    def usage_by_session(self) -> dict[str, dict[str, int]]:
        return {
            sid: u.as_dict()
            for sid, u in self.ledger.sessions.items()
            if self.store.get(sid) is not None
        }

    # --- requests ---

    def verify(self, credential: str) -> Session:
        """The live session a credential belongs to, or Refusal (401)."""
        sid, _, secret = credential.partition(".")
        s = self.store.get(sid) if ids.is_valid(sid) else None
        if s is None or not s.broker_hash or s.status not in LIVE_STATES:
            ids.token_matches(secret, "0" * 64)  # the same work either way
            raise Refusal(401, "no valid lovd session credential")
        if not ids.token_matches(secret, s.broker_hash):
            raise Refusal(401, "no valid lovd session credential")
        if s.expires_at <= self.clock():
            raise Refusal(401, "this session has expired")
        return s

    def route(self, path: str) -> tuple[Upstream, str]:
        for prefix, up in self.upstreams.items():
            if path == prefix or path.startswith(prefix + "/"):
                tail = path[len(prefix) :]
                if any(seg in (".", "..") for seg in tail.split("/")):
                    break
                return up, tail
        raise Refusal(404, f"the broker offers nothing at {path}")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.on_request()
        try:
            up, tail = self.route(request.path)
        except Refusal as e:
            return _error(None, e.status, e.message)
        try:
            session = self.verify(_credential(request))
        except Refusal as e:
            self.metrics.broker_requests.labels(up.prefix, str(e.status)).inc()
            log.info("broker refused a call to %s: %s", up.prefix, e.message)
            return _error(up, e.status, e.message)
        sid = session.id
        if up.llm:
            # Only model calls: OpenCode's MCP client talks to the broker on its own (its
            # event stream) and would keep an abandoned session awake forever.
            self.on_session_call(sid)
            why = self.ledger.refusal(sid, self.clock())
            if why:
                self.ledger.count_refused(sid)
                self.metrics.broker_requests.labels(up.prefix, "403").inc()
                log.info("broker: token cap reached", extra={"SESSION_ID": sid})
                return _error(up, 403, why)
        else:
            self.ledger.count_mcp(sid)
        return await self._forward(request, up, tail, sid)

    async def _forward(
        self, request: web.Request, up: Upstream, tail: str, sid: str
    ) -> web.StreamResponse:
        body = await request.read()
        if up.llm and body:
            body = _ask_for_usage(body)
        headers = CIMultiDict(
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() not in _CREDENTIAL_HEADERS
        )
        if up.key_value:
            headers[up.key_header] = up.key_value
        headers["Accept-Encoding"] = "identity"  # usage is read from the body as it passes
        query = [(k, v) for k, v in request.query.items() if k != "key"]
        url = up.base_url + tail
        reader = UsageReader("")
        resp: web.StreamResponse | None = None
        status = "502"
        try:
            async with self.http.request(
                request.method,
                url,
                params=query,
                data=body or None,
                headers=headers,
                allow_redirects=False,
                timeout=_UPSTREAM_TIMEOUT,
            ) as r:
                status = str(r.status)
                resp = web.StreamResponse(status=r.status, reason=r.reason)
                for k, v in r.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        resp.headers.add(k, v)
                reader = UsageReader(r.headers.get("Content-Type", ""))
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                    reader.feed(chunk)
                await resp.write_eof()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            if resp is None or not resp.prepared:
                log.warning(
                    "broker: %s unreachable: %s", up.base_url, e, extra={"SESSION_ID": sid}
                )
                return _error(up, 502, f"the upstream service could not be reached ({e!r})")
            # Mid-stream (upstream dropped or the session went away): the stream just ends.
            log.debug("broker: stream from %s ended early: %r", up.prefix, e)
        finally:
            self.metrics.broker_requests.labels(up.prefix, status).inc()
            if up.llm:
                tokens = reader.finish()
                self.ledger.count_llm(sid, tokens, self.clock())
                self.metrics.llm_tokens.labels("input").inc(tokens.input)
                self.metrics.llm_tokens.labels("output").inc(tokens.output)
        return resp


def _credential(request: web.Request) -> str:
    for name in _CREDENTIAL_HEADERS:
        value = request.headers.get(name, "")
        if value:
            return value.removeprefix("Bearer ").strip()
    return request.query.get("key", "")


def _ask_for_usage(body: bytes) -> bytes:
    """A streamed OpenAI-style chat request reports usage only when asked to."""
    if b'"stream"' not in body or b"stream_options" in body:
        return body
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict) and data.get("stream") is True and "messages" in data:
        data["stream_options"] = {"include_usage": True}
        return json.dumps(data).encode()
    return body


def _error(up: Upstream | None, status: int, message: str) -> web.Response:
    """An error in the caller's provider's own format, so its SDK shows ``message``."""
    body: dict[str, Any]
    if up is not None and up.prefix == "/llm/anthropic":
        body = {"type": "error", "error": {"type": "permission_error", "message": message}}
    elif up is not None and up.prefix == "/llm/google":
        body = {"error": {"code": status, "message": message, "status": "PERMISSION_DENIED"}}
    else:
        body = {"error": {"message": message, "type": "lovd_broker", "code": status}}
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


def create_broker_app(broker: Broker) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BODY)
    app.router.add_route("*", "/{tail:.*}", broker.handle)
    return app


def bind(config: Config) -> socket.socket:
    """The broker's listening socket (when systemd did not pass lovd-broker.socket)."""
    try:
        return socket.create_server((config.broker_host, config.broker_port), backlog=512)
    except OSError as e:
        raise OSError(
            e.errno,
            f"broker.listen: cannot listen on {config.broker_listen}: {e.strerror} "
            "(another lovd? pick another port)",
        ) from e


async def serve_broker(broker: Broker, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(
        create_broker_app(broker), access_log=None, handle_signals=False, shutdown_timeout=1
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    log.info(
        "credential broker on %s for %s",
        sock.getsockname(),
        ", ".join(sorted(broker.upstreams)) or "no upstreams (nothing configured)",
    )
    return runner
