"""The credential broker: session containers call the LLM providers and the Lovdata MCP
server through lovd, which adds the operator's credentials on the way out.

Why: everything inside a session container is readable by whoever uses the session
(OpenCode serves its config, files and environment to its user). So a container holds
only a per-session credential, ``<session id>.<secret>``, that

- is worthless outside lovd (the broker listens on the host's loopback, reached by
  sessions at ``host_gateway``; the upstreams never see it),
- is new at every start of the session's container (lovd stores only its hash) and
  dies when the session stops, is deleted or expires.

The credential opens the allowlisted routes only (:mod:`lovd.broker.rules`: method +
exact path per provider and for MCP, the query parameters and headers those need), and
only for the configured models. Request bodies are read against a size cap, a memory
budget and a timeout (:mod:`lovd.broker.limits`). An LLM request goes upstream with an
output bound (the client's, else ``llm.max_output_tokens``) and, when streamed as a chat
completion, asking for usage in its last chunk; responses pass through unchanged
(streams unbuffered, no read timeout). What a call may cost is reserved against the caps
(``llm.max_tokens_per_session``, ``llm.max_tokens_per_day``) before it goes, and replaced
by the usage the provider reports (:class:`~lovd.broker.usage.Ledger`). Every refusal is
an error in the provider's own format, so the chat shows its message.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from lovd import ids
from lovd.broker import rules, upstreams
from lovd.broker.limits import CappedSite, Gates, Limits
from lovd.broker.rules import Refusal, Route
from lovd.broker.upstreams import Upstream
from lovd.broker.usage import Ledger, Reservation, Tokens, UsageReader
from lovd.config import Config, parse_size
from lovd.metrics import Metrics
from lovd.session.model import Session
from lovd.store import Store

log = logging.getLogger(__name__)

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


class Broker:
    def __init__(
        self,
        *,
        store: Store,
        upstreams: dict[str, Upstream],
        http: aiohttp.ClientSession,
        ledger: Ledger,
        metrics: Metrics,
        limits: Limits | None = None,
        max_output_tokens: int = 16384,
        clock: Callable[[], float] = time.time,
        on_request: Callable[[], None] | None = None,
        on_session_call: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.upstreams = upstreams
        self.http = http
        self.ledger = ledger
        self.metrics = metrics
        self.limits = limits or Limits.defaults()
        self.gates = Gates(self.limits)
        self.max_output_tokens = max_output_tokens
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
            limits=limits_from_config(config),
            max_output_tokens=config.max_output_tokens,
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
        if s is None or not s.broker_hash or not s.broker_live:
            ids.token_matches(secret, "0" * 64)  # the same work either way
            raise Refusal(401, "no valid lovd session credential")
        if not ids.token_matches(secret, s.broker_hash):
            raise Refusal(401, "no valid lovd session credential")
        if s.expires_at <= self.clock():
            raise Refusal(401, "this session has expired")
        return s

    def route(self, request: web.Request) -> tuple[Upstream, Route]:
        """The upstream and allowlisted route a request is for, or Refusal (404)."""
        path = request.raw_path.partition("?")[0]
        for prefix, up in self.upstreams.items():
            if path == prefix or path.startswith(prefix + "/"):
                route = rules.match(up.kind, request.method, path[len(prefix) :])
                if route is None:
                    raise Refusal(404, f"the broker offers no {request.method} {path}")
                return up, route
        raise Refusal(404, f"the broker offers nothing at {path}")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = await self._answer(request)
        if not resp.prepared:  # a streamed answer was marked before it started
            resp.force_close()
        return resp

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.on_request()
        try:
            up, route = self.route(request)
        except Refusal as e:
            self.metrics.broker_requests.labels("none", str(e.status)).inc()
            return _error(None, e.status, e.message)
        try:
            sid = self.verify(_credential(request)).id
            self.gates.enter(sid)
            try:
                return await self._admitted(request, up, route, sid)
            finally:
                self.gates.leave(sid)
        except Refusal as e:
            self.metrics.broker_requests.labels(up.prefix, str(e.status)).inc()
            log.info("broker refused a call to %s: %s", up.prefix, e.message)
            return _error(up, e.status, e.message)
        except ConnectionError as e:
            # The caller went away while sending its body: no one to answer, and not an
            # error of lovd's (a session could otherwise fill the log with tracebacks).
            log.debug("broker: caller of %s went away: %r", up.prefix, e)
            return web.Response(status=400)

    async def _admitted(
        self, request: web.Request, up: Upstream, route: Route, sid: str
    ) -> web.StreamResponse:
        body, taken = await self.gates.read_body(request, sid)
        try:
            if not up.llm:
                self.ledger.count_mcp(sid)
                return await self._forward(request, up, route, body, sid, None)
            call = rules.prepare(up.kind, route, body, up.models, self.max_output_tokens)
            del body  # the prepared copy is what goes upstream
            # Only model calls: OpenCode's MCP client talks to the broker on its own (its
            # event stream) and would keep an abandoned session awake forever.
            self.on_session_call(sid)
            slots = self.gates.llm_slots(sid)
            try:
                async with slots:
                    held = self.ledger.reserve(
                        sid, call.input_estimate, call.max_output, self.clock()
                    )
                    if isinstance(held, str):
                        self.ledger.count_refused(sid)
                        log.info("broker: token cap reached", extra={"SESSION_ID": sid})
                        raise Refusal(403, held)
                    return await self._forward(request, up, route, call.body, sid, held)
            finally:
                self.gates.llm_done(sid)
        finally:
            self.gates.release(sid, taken)

    async def _forward(
        self,
        request: web.Request,
        up: Upstream,
        route: Route,
        body: bytes,
        sid: str,
        held: Reservation | None,
    ) -> web.StreamResponse:
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() in rules.FORWARD_HEADERS
        )
        if up.key_value:
            headers[up.key_header] = up.key_value
        headers["Accept-Encoding"] = "identity"  # usage is read from the body as it passes
        query = rules.query(route, list(request.query.items()))
        # The tail passed rules.match (no encoding, no dot segments): nothing to normalise.
        url = URL(up.base_url + request.raw_path.partition("?")[0][len(up.prefix) :], encoded=True)
        reader = UsageReader("")
        resp: web.StreamResponse | None = None
        status = "502"
        complete = False
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
                resp.force_close()
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                    reader.feed(chunk)
                await resp.write_eof()
                complete = True
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            if resp is None or not resp.prepared:
                log.warning("broker: %s unreachable: %s", up.base_url, e, extra={"SESSION_ID": sid})
                return _error(up, 502, f"the upstream service could not be reached ({e!r})")
            # Mid-stream (upstream dropped or the session went away): the stream just ends.
            log.debug("broker: stream from %s ended early: %r", up.prefix, e)
        finally:
            self.metrics.broker_requests.labels(up.prefix, status).inc()
            if held is not None:
                tokens = reader.finish()
                if not tokens.found and not status.startswith("2"):
                    # Refused or failed upstream before any answer (or never sent): no cost.
                    tokens = Tokens(found=True)
                counted = self.ledger.settle(held, tokens, self.clock(), complete=complete)
                self.metrics.llm_tokens.labels("input").inc(counted.input)
                self.metrics.llm_tokens.labels("output").inc(counted.output)
        return resp


def _credential(request: web.Request) -> str:
    for name in _CREDENTIAL_HEADERS:
        value = request.headers.get(name, "")
        if value:
            return value.removeprefix("Bearer ").strip()
    return request.query.get("key", "")


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
}


def _error(up: Upstream | None, status: int, message: str) -> web.Response:
    """An error in the caller's provider's own format, so its SDK shows ``message``."""
    body: dict[str, Any]
    kind = up.kind if up is not None else ""
    if kind == "anthropic":
        kind_of = _ANTHROPIC_TYPES.get(status, "api_error")
        body = {"type": "error", "error": {"type": kind_of, "message": message}}
    elif kind == "google":
        body = {
            "error": {
                "code": status,
                "message": message,
                "status": _GOOGLE_STATUS.get(status, "UNAVAILABLE"),
            }
        }
    else:
        body = {"error": {"message": message, "type": "lovd_broker", "code": status}}
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


def limits_from_config(c: Config) -> Limits:
    return Limits(
        max_body=parse_size(c.broker_max_body),
        body_memory=parse_size(c.broker_body_memory),
        session_requests=c.broker_session_requests,
        session_llm=c.broker_session_concurrency,
        read_timeout=c.broker_read_timeout,
        max_connections=c.broker_max_connections,
    )


def create_broker_app(broker: Broker) -> web.Application:
    # Bodies are read by Gates.read_body, against broker.max_body as they arrive (aiohttp
    # refuses a body of exactly client_max_size bytes, hence the + 1).
    app = web.Application(client_max_size=broker.limits.max_body + 1)
    app.router.add_route("*", "/{tail:.*}", broker.handle)
    return app


# Every answer says "Connection: close" (Broker.handle): a session's client keeps idle
# connections longer than the broker would (Bun's fetch: 5 min), so a POST could be sent
# just as the broker closed an idle one and fail with "socket closed unexpectedly"
# (measured with the session image's Bun: 1 in 60 calls made one keep-alive period
# apart). A fresh connection per call costs a local TCP handshake and leaves no idle
# connections to count against broker.max_connections.
def make_runner(broker: Broker) -> web.AppRunner:
    return web.AppRunner(
        create_broker_app(broker),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1,
        # A connection must bring a whole request head within read_timeout of opening:
        # aiohttp closes it otherwise, so half-open or trickling connections do not
        # pile up.
        keepalive_timeout=broker.limits.read_timeout,
        # A refused request's unread body is drained at most this long, then dropped.
        lingering_time=2.0,
    )


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
    runner = make_runner(broker)
    await runner.setup()
    await CappedSite(runner, sock, broker.limits.max_connections).start()
    log.info(
        "credential broker on %s for %s",
        sock.getsockname(),
        ", ".join(sorted(broker.upstreams)) or "no upstreams (nothing configured)",
    )
    return runner
