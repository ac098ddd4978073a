"""The credential broker against a real upstream (an aiohttp server in the test) and a
real SQLite store: whose credential opens what, which key goes upstream, streaming,
usage accounting and the caps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from lovd import config, ids
from lovd.broker import upstreams
from lovd.broker.server import Broker, create_broker_app
from lovd.broker.usage import UsageReader, utc_day
from lovd.metrics import Metrics
from lovd.store import Session, Store
from tests.fakes import FakeRunner
from tests.stack import open_stack

CANARY = "sk-CANARY-operator-key-never-in-a-container"


@dataclass
class Upstream:
    """Records what reached it; answers like the provider the path belongs to."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": json.loads(body) if body else None,
            }
        )
        if request.path.endswith("/chat/completions"):
            return await self._openai_stream(request, json.loads(body))
        if request.path.endswith("/messages"):
            return await self._sse(
                request,
                [
                    {
                        "type": "message_start",
                        "message": {"usage": {"input_tokens": 11, "output_tokens": 1}},
                    },
                    {"type": "content_block_delta", "delta": {"text": "Hei"}},
                    {"type": "message_delta", "usage": {"output_tokens": 7}},
                ],
            )
        if ":generateContent" in request.path:
            return web.json_response(
                {
                    "candidates": [],
                    "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 4},
                }
            )
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    async def _openai_stream(
        self, request: web.Request, data: dict[str, Any]
    ) -> web.StreamResponse:
        chunks: list[dict[str, Any]] = [{"choices": [{"delta": {"content": "Første"}}]}]
        if (data.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: {json.dumps(chunks[0])}\n\n".encode())
        await self.release.wait()  # the first token must reach the client before this
        for c in chunks[1:]:
            await resp.write(f"data: {json.dumps(c)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _sse(self, request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode())
        return resp


@dataclass
class Rig:
    client: TestClient  # type: ignore[type-arg]
    store: Store
    broker: Broker
    upstream: Upstream
    metrics: Metrics
    settings: dict[str, Any]

    async def session(
        self, status: str = "running", expires_in: float = 3600
    ) -> tuple[Session, str]:
        secret = ids.new_token()
        now = time.time()
        s = Session(
            ids.new_session_id(),
            status,
            "",
            "",
            20000 + len(self.store.all()),
            "",
            "h",
            now,
            now,
            now + expires_in,
            now,
            broker_hash=ids.hash_token(secret),
        )
        await self.store.insert(s)
        return s, f"{s.id}.{secret}"


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, **settings: Any) -> AsyncIterator[Rig]:
    up = Upstream()
    up_app = web.Application()
    up_app.router.add_route("*", "/{tail:.*}", up.handle)
    up_server = TestServer(up_app)
    await up_server.start_server()
    base = f"http://127.0.0.1:{up_server.port}"
    conf = {
        "state_dir": str(tmp_path),
        "runtime_dir": str(tmp_path / "run"),
        "caddy": {"admin": ""},
        "llm": {
            "openai_api_key": CANARY,
            "openai_base_url": base + "/openai/v1",
            "anthropic_api_key": CANARY + "-anthropic",
            "anthropic_base_url": base + "/anthropic/v1",
            "google_api_key": CANARY + "-google",
            "google_base_url": base + "/google/v1beta",
            "model": "openai/gpt-x",
            "models": ["anthropic/claude-x", "google/g"],
            **settings.pop("llm", {}),
        },
        "mcp": {"lovdata": {"url": base + "/mcp", "token": CANARY + "-mcp"}},
        **settings,
    }
    runner = FakeRunner()
    try:
        async with (
            open_stack(conf, runner=lambda _: runner) as host,
            TestClient(TestServer(create_broker_app(host.broker))) as client,
        ):
            yield Rig(client, host.store, host.broker, up, host.metrics, conf)
    finally:
        await runner.close()
        await up_server.close()


def bearer(cred: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cred}"}


OPENAI_CHAT = "/llm/openai/chat/completions"
CHAT = {
    "model": "gpt-x",
    "stream": True,
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "Hei"}],
}
CLAUDE = {"model": "claude-x", "max_tokens": 20, "stream": True, "messages": []}


async def test_no_wrong_or_dead_credential_reaches_an_upstream(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        live, cred = await r.session()
        _, stopped_cred = await r.session("idle-stopped")
        _, expired_cred = await r.session(expires_in=-1)
        wrong = f"{live.id}.{ids.new_token()}"
        other_secret_on_our_id = f"{live.id}.{stopped_cred.split('.', 1)[1]}"
        for headers in (
            {},
            bearer(""),
            bearer(wrong),
            bearer(stopped_cred),
            bearer(expired_cred),
            bearer(other_secret_on_our_id),
            bearer("../../etc.passwd"),
            {"x-api-key": CANARY},
        ):
            resp = await r.client.post("/llm/openai/chat/completions", json=CHAT, headers=headers)
            assert resp.status == 401, headers
            assert CANARY not in await resp.text()
        assert r.upstream.seen == []
        # The live one passes.
        resp = await r.client.post("/llm/openai/chat/completions", json=CHAT, headers=bearer(cred))
        assert resp.status == 200
        await resp.release()


async def test_the_operator_key_replaces_the_session_credential_upstream(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        _, cred = await r.session()
        r.upstream.release.set()
        resp = await r.client.post(
            "/llm/openai/chat/completions?x=1", json=CHAT, headers=bearer(cred)
        )
        assert resp.status == 200
        await resp.read()
        resp = await r.client.post(
            "/llm/anthropic/messages", json=CLAUDE, headers={"x-api-key": cred}
        )
        await resp.read()
        resp = await r.client.post(
            "/llm/google/models/g:generateContent?key=" + cred,
            json={},
            headers={"x-goog-api-key": cred},
        )
        await resp.read()
        resp = await r.client.post("/mcp/lovdata", json={"jsonrpc": "2.0"}, headers=bearer(cred))
        assert resp.status == 200
        openai, anthropic, google, mcp = r.upstream.seen
        # Query parameters the route does not need are dropped (Google's alt=sse is kept).
        assert openai["path"] == "/openai/v1/chat/completions" and openai["query"] == {}
        assert openai["headers"]["Authorization"] == f"Bearer {CANARY}"
        assert anthropic["headers"]["x-api-key"] == CANARY + "-anthropic"
        assert "Authorization" not in anthropic["headers"]
        assert google["headers"]["x-goog-api-key"] == CANARY + "-google"
        assert "key" not in google["query"]  # the session credential is not passed on
        assert mcp["path"] == "/mcp" and mcp["headers"]["Authorization"] == f"Bearer {CANARY}-mcp"
        for seen in r.upstream.seen:
            assert cred not in json.dumps(seen)


async def test_the_broker_is_not_an_open_proxy(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        _, cred = await r.session()
        for path in (
            "/",
            "/llm/evil/x",
            "/llm/openaiX/chat",
            "/http://example.invalid/",
            "/llm/openai/../../mcp",
        ):
            resp = await r.client.get(path, headers=bearer(cred))
            assert resp.status == 404, path
        assert r.upstream.seen == []


async def test_streams_pass_unbuffered_and_usage_is_counted(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s, cred = await r.session()
        resp = await r.client.post("/llm/openai/chat/completions", json=CHAT, headers=bearer(cred))
        # The first chunk arrives while the upstream is still holding the rest back.
        first = await asyncio.wait_for(resp.content.readline(), 5)
        assert b"F\\u00f8rste" in first
        r.upstream.release.set()
        rest = await resp.read()
        assert b'"prompt_tokens": 30' in rest and rest.endswith(b"data: [DONE]\n\n")
        assert r.upstream.seen[0]["body"]["stream_options"] == {"include_usage": True}
        resp = await r.client.post(
            "/llm/anthropic/messages", json=CLAUDE, headers={"x-api-key": cred}
        )
        await resp.read()
        resp = await r.client.post(
            "/llm/google/models/g:generateContent", json={}, headers={"x-goog-api-key": cred}
        )
        await resp.read()
        resp = await r.client.post("/mcp/lovdata", json={}, headers=bearer(cred))
        await resp.read()
        assert r.broker.usage(s.id) == {
            "llm_requests": 3,
            "input_tokens": 30 + 11 + 5,
            "output_tokens": 12 + 7 + 4,
            "mcp_requests": 1,
            "refused": 0,
        }
        metrics = r.metrics.render().decode()
        assert f'lovd_session_llm_tokens{{kind="input",session="{s.id}"}} 46.0' in metrics
        assert 'lovd_llm_tokens_total{kind="output"} 23.0' in metrics
        await r.broker.flush()
        rows, days = await r.store.load_usage()
        assert rows[s.id] == (3, 46, 23, 1, 0) and sum(days.values()) == 69


async def test_caps_refuse_with_a_message_the_chat_shows(tmp_path: Path) -> None:
    async with rig(tmp_path, llm={"max_tokens_per_session": 80}) as r:
        r.upstream.release.set()
        a, cred_a = await r.session()
        resp = await r.client.post(OPENAI_CHAT, json=CHAT, headers=bearer(cred_a))
        await resp.read()  # 42 tokens: what is left is less than the next call may use
        resp = await r.client.post(OPENAI_CHAT, json=CHAT, headers=bearer(cred_a))
        assert resp.status == 403
        msg = (await resp.json())["error"]["message"]
        assert "80 tokens" in msg and "Start en ny økt" in msg
        resp = await r.client.post(
            "/llm/anthropic/messages", json=CLAUDE, headers={"x-api-key": cred_a}
        )
        assert (await resp.json())["error"]["type"] == "permission_error"  # Anthropic's shape
        # MCP is not an LLM call: still served.
        resp = await r.client.post("/mcp/lovdata", json={}, headers=bearer(cred_a))
        assert resp.status == 200
        assert r.broker.usage(a.id)["refused"] == 2
        # Another session has its own allowance.
        _, cred_b = await r.session()
        resp = await r.client.post(OPENAI_CHAT, json=CHAT, headers=bearer(cred_b))
        assert resp.status == 200
        await resp.read()
        assert len(r.upstream.seen) == 1 + 1 + 1  # refused calls never went upstream


async def test_the_day_cap_counts_every_session_of_the_host(tmp_path: Path) -> None:
    async with rig(tmp_path / "day", llm={"max_tokens_per_day": 130}) as r:
        r.upstream.release.set()
        for _ in range(2):  # 42 tokens each, in two sessions
            _, cred = await r.session()
            resp = await r.client.post(
                "/llm/openai/chat/completions", json=CHAT, headers=bearer(cred)
            )
            assert resp.status == 200
            await resp.read()
        _, cred = await r.session()
        resp = await r.client.post("/llm/openai/chat/completions", json=CHAT, headers=bearer(cred))
        assert resp.status == 403 and "midnatt" in (await resp.json())["error"]["message"]
        assert r.broker.ledger.days[utc_day(time.time())] == 84
        assert len(r.upstream.seen) == 2


async def test_usage_survives_a_restart_of_the_broker(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s, cred = await r.session()
        r.upstream.release.set()
        resp = await r.client.post("/llm/openai/chat/completions", json=CHAT, headers=bearer(cred))
        await resp.read()
        await r.broker.flush()
        runner = FakeRunner()
        async with open_stack(r.settings, runner=lambda _: runner) as again:  # lovd restarted
            assert again.broker.usage(s.id)["input_tokens"] == 30


@pytest.mark.parametrize(
    ("ctype", "chunks", "expected"),
    [
        (
            "text/event-stream",
            [
                b'data: {"usage": {"prompt_tokens": 3, "comp',
                b'letion_tokens": 4}}\n\ndata: [DONE]\n\n',
            ],
            (3, 4),
        ),
        ("application/json", [b'{"usage": {"input_tokens": 8, ', b'"output_tokens": 2}}'], (8, 2)),
        (
            "text/event-stream",
            [
                b"data: not json\n",
                b'data: {"usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 9}}',
            ],
            (1, 9),
        ),
        ("application/json", [b"[1, 2]"], (0, 0)),
    ],
)
def test_usage_reader_handles_split_lines_and_shapes(
    ctype: str, chunks: list[bytes], expected: tuple[int, int]
) -> None:
    reader = UsageReader(ctype)
    for c in chunks:
        reader.feed(c)
    t = reader.finish()
    assert (t.input, t.output) == expected


def test_upstream_repr_never_shows_a_key(tmp_path: Path) -> None:
    cfg = config.from_mapping({"llm": {"openai_api_key": CANARY}})
    table = upstreams.from_config(cfg, {})
    assert CANARY not in repr(table) and CANARY not in str(table)


async def test_a_session_calling_through_the_broker_is_active(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        seen: list[str] = []
        r.broker.on_session_call = seen.append
        s, cred = await r.session()
        r.upstream.release.set()
        resp = await r.client.post(OPENAI_CHAT, json=CHAT, headers=bearer(cred))
        await resp.read()
        resp = await r.client.post("/mcp/lovdata", json={}, headers=bearer(cred))
        await resp.read()
        # A model call is an answer in progress (idle_timeout never cuts it off); MCP
        # traffic alone is not (OpenCode's MCP client keeps its event stream open).
        assert seen == [s.id]


class DropsIdle:
    """An HTTP/1.1 upstream that, like uvicorn or Node after 5 s, drops a keep-alive
    connection once it has been idle too long — here at the moment a request arrives on
    it, the race a client that keeps idle connections longer than the server loses."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.dropped = 0
        self.answered = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        last: float | None = None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if last is not None and time.monotonic() - last > self.idle:
                    self.dropped += 1
                    return
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                body = b'{"jsonrpc": "2.0", "id": 1, "result": {}}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                self.answered += 1
                last = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_an_upstream_that_drops_idle_connections_loses_no_call(tmp_path: Path) -> None:
    """A chat's MCP calls (POSTs: aiohttp never retries them) arrive seconds apart; lovd
    keeps an idle connection for less time than common servers do, so none is reused
    into the server's close (CI once lost a chat's Lovdata call this way)."""
    from lovd.wiring import IDLE_KEEPALIVE_SECONDS

    upstream = DropsIdle(idle=IDLE_KEEPALIVE_SECONDS + 0.5)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with rig(tmp_path, mcp={"lovdata": {"url": f"http://127.0.0.1:{port}/mcp"}}) as r:
            _, cred = await r.session()
            for pause in (0.0, 0.2, IDLE_KEEPALIVE_SECONDS + 0.7, 0.2):
                await asyncio.sleep(pause)
                resp = await r.client.post(
                    "/mcp/lovdata", json={"jsonrpc": "2.0"}, headers=bearer(cred)
                )
                assert resp.status == 200, await resp.text()
                await resp.read()
            assert upstream.answered == 4
            assert upstream.dropped == 0  # lovd closed the idle connection first
    finally:
        server.close()
        await server.wait_closed()


async def test_every_answer_closes_its_connection(tmp_path: Path) -> None:
    """A session's client (Bun's fetch) keeps idle connections for minutes; a call sent
    as the broker closed one would fail. So no answer leaves a connection to reuse:
    streamed or not, refused or failed upstream."""
    async with rig(tmp_path, mcp={"lovdata": {"url": "http://127.0.0.1:9/mcp"}}) as r:
        _, cred = await r.session()
        r.upstream.release.set()
        calls: list[tuple[str, dict[str, str], int]] = [
            (OPENAI_CHAT, bearer(cred), 200),  # streamed (SSE) from the upstream
            ("/llm/anthropic/messages", {"x-api-key": cred}, 200),
            (OPENAI_CHAT, bearer("nobody.x"), 401),
            ("/llm/nowhere", bearer(cred), 404),
            ("/mcp/lovdata", bearer(cred), 502),  # nothing listens on port 9
        ]
        for path, headers, status in calls:
            body = CLAUDE if "anthropic" in path else CHAT
            resp = await r.client.post(path, json=body, headers=headers)
            await resp.read()
            assert resp.status == status, (path, await resp.text())
            assert resp.headers.get("Connection", "").lower() == "close", (path, resp.headers)
