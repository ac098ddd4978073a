"""The broker's allowlists, models, usage accounting and resource limits, each tried as
an attack: a real broker (served the way lovd serves it, on its own listening socket)
in front of a recording fake provider on loopback that answers in each provider's own
format (streamed and not) and records everything that reaches it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from lovd import config, ids
from lovd.broker import upstreams
from lovd.broker.limits import CappedSite
from lovd.broker.server import Broker, make_runner
from lovd.store import Session, Store
from tests.fakes import FakeRunner
from tests.stack import open_stack
from tests.waiting import until

KEY = "sk-CANARY-operator-key"


@dataclass
class Provider:
    """Answers like OpenAI (chat, responses), Anthropic and Google; records every call."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    report_usage: bool = True
    delay: float = 0.0
    hold: asyncio.Event | None = None
    pause: asyncio.Event | None = None  # held after a stream's first event

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.seen.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "query": list(request.query.items()),
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )
        if isinstance(body, dict) and body.get("fail"):
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        if self.hold is not None:
            await self.hold.wait()
        await asyncio.sleep(self.delay)
        path = request.path
        if path.endswith("/chat/completions"):
            return await self.chat(request, body)
        if path.endswith("/responses"):
            return await self.responses(request, body)
        if path.endswith("/messages"):
            return await self.messages(request, body)
        if ":generateContent" in path or ":streamGenerateContent" in path:
            return await self.google(request, body)
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    def out(self, body: dict[str, Any], *names: str) -> int:
        """Spend the whole output bound (the worst case the broker must allow for)."""
        return int(next(body[n] for n in names if body.get(n)))

    async def chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        usage = {
            "prompt_tokens": 1200,
            "completion_tokens": self.out(body, "max_completion_tokens", "max_tokens"),
            "completion_tokens_details": {"reasoning_tokens": 100},
        }
        if not body.get("stream"):
            return web.json_response(
                {
                    "choices": [{"message": {"content": "Hei"}}],
                    **({"usage": usage} if self.report_usage else {}),
                }
            )
        chunks: list[dict[str, Any]] = [{"choices": [{"delta": {"content": "Hei"}}], "usage": None}]
        if (body.get("stream_options") or {}).get("include_usage") and self.report_usage:
            chunks.append({"choices": [], "usage": usage})
        return await self.sse(request, [("", c) for c in chunks] + [("", "[DONE]")])

    async def responses(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        usage = {
            "input_tokens": 2000,
            "input_tokens_details": {"cached_tokens": 1500},
            "output_tokens": self.out(body, "max_output_tokens"),
            "output_tokens_details": {"reasoning_tokens": 900},
        }
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        if not body.get("stream"):
            return web.json_response(
                {
                    "object": "response",
                    "output": [],
                    **({"usage": usage} if self.report_usage else {}),
                }
            )
        events = [
            (
                "response.created",
                {"type": "response.created", "response": {"status": "in_progress", "usage": None}},
            ),
            (
                "response.output_text.delta",
                {"type": "response.output_text.delta", "delta": "usage: 1 token"},
            ),
            (
                "response.completed",
                {
                    "type": "response.completed",
                    "response": {
                        "status": "completed",
                        **({"usage": usage} if self.report_usage else {}),
                    },
                },
            ),
        ]
        return await self.sse(request, events)

    async def messages(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        start = {
            "input_tokens": 15,
            "cache_creation_input_tokens": 100_000,
            "cache_read_input_tokens": 50_000,
            "output_tokens": 1,
        }
        out = self.out(body, "max_tokens")
        if not body.get("stream"):
            return web.json_response(
                {"type": "message", "content": [], "usage": {**start, "output_tokens": out}}
            )
        return await self.sse(
            request,
            [
                ("message_start", {"type": "message_start", "message": {"usage": start}}),
                ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "Hei"}}),
                ("message_delta", {"type": "message_delta", "usage": {"output_tokens": out}}),
                ("message_stop", {"type": "message_stop"}),
            ],
        )

    async def google(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        out = body["generationConfig"]["maxOutputTokens"]
        meta = {
            "promptTokenCount": 3000,
            "candidatesTokenCount": out - 30_000,
            "thoughtsTokenCount": 30_000,
            "toolUsePromptTokenCount": 40,
        }
        if ":generateContent" in request.path:  # without a total: the parts must add up
            return web.json_response({"candidates": [], "usageMetadata": meta})
        meta["totalTokenCount"] = sum(meta.values())
        partial = {"promptTokenCount": 3000, "candidatesTokenCount": 1}
        return await self.sse(
            request,
            [
                ("", {"candidates": [], "usageMetadata": partial}),
                ("", {"candidates": [], "usageMetadata": meta}),
            ],
        )

    async def sse(self, request: web.Request, events: list[tuple[str, Any]]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, (name, data) in enumerate(events):
            head = f"event: {name}\n" if name else ""
            text = data if isinstance(data, str) else json.dumps(data)
            await resp.write(f"{head}data: {text}\n\n".encode())
            if i == 0 and self.pause is not None:
                await self.pause.wait()
        return resp


@dataclass
class Rig:
    url: str
    store: Store
    broker: Broker
    provider: Provider
    runner: web.AppRunner
    site: CappedSite
    http: aiohttp.ClientSession

    async def credential(self) -> tuple[str, str]:
        secret = ids.new_token()
        now = time.time()
        s = Session(
            ids.new_session_id(),
            "running",
            "",
            "",
            20000 + len(self.store.all()),
            "",
            "h",
            now,
            now,
            now + 3600,
            now,
            broker_hash=ids.hash_token(secret),
        )
        await self.store.insert(s)
        return s.id, f"{s.id}.{secret}"

    async def call(self, method: str, path: str, cred: str, **kw: Any) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {cred}", **kw.pop("headers", {})}
        async with self.http.request(method, self.url + path, headers=headers, **kw) as r:
            return r.status, await r.read()


MODELS = ["openai/gpt-ok", "anthropic/claude-ok", "google/gemini-ok", "lovd/legal-stub"]


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, **settings: Any) -> AsyncIterator[Rig]:
    provider = Provider()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", provider.handle)
    up = TestServer(app)
    await up.start_server()
    base = f"http://127.0.0.1:{up.port}"
    llm = {
        "openai_api_key": KEY,
        "openai_base_url": base + "/openai/v1",
        "anthropic_api_key": KEY,
        "anthropic_base_url": base + "/anthropic/v1",
        "google_api_key": KEY,
        "google_base_url": base + "/google/v1beta",
        "base_url": base + "/lovd/v1",
        "api_key": KEY,
        "model": MODELS[0],
        "models": MODELS[1:],
        **settings.pop("llm", {}),
    }
    conf = {
        "state_dir": str(tmp_path),
        "runtime_dir": str(tmp_path / "run"),
        "caddy": {"admin": ""},
        "llm": llm,
        "mcp": {"lovdata": {"url": base + "/mcp", "token": KEY}},
        **settings,
    }
    fake = FakeRunner()
    try:
        async with open_stack(conf, runner=lambda _: fake) as host:
            broker = host.broker
            sock = socket.create_server(("127.0.0.1", 0))
            runner = make_runner(broker)
            await runner.setup()
            site = CappedSite(runner, sock, broker.limits.max_connections)
            await site.start()
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            try:
                yield Rig(
                    f"http://127.0.0.1:{sock.getsockname()[1]}",
                    host.store,
                    broker,
                    provider,
                    runner,
                    site,
                    http,
                )
            finally:
                await http.close()
                await runner.cleanup()
    finally:
        await fake.close()
        await up.close()


def chat(model: str = "gpt-ok", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hei"}], **extra}


# --- models -----------------------------------------------------------------------------


async def test_an_unconfigured_model_never_reaches_the_provider(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        _, cred = await r.credential()
        attempts = [
            ("/llm/openai/chat/completions", chat("gpt-5.5-pro", stream=True)),
            ("/llm/openai/chat/completions", chat("o3-pro")),
            ("/llm/openai/responses", {"model": "gpt-5.5-pro", "input": "Hei"}),
            ("/llm/openai/chat/completions", chat("claude-ok")),  # another provider's
            ("/llm/openai/chat/completions", {"messages": []}),  # no model at all
            ("/llm/openai/chat/completions", chat(["gpt-ok"])),  # type: ignore[arg-type]
            ("/llm/anthropic/messages", {"model": "claude-opus-4", "max_tokens": 5}),
            ("/llm/google/models/gemini-2.5-pro:generateContent", {"contents": []}),
            (
                "/llm/google/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
                {"contents": [], "model": "gemini-ok"},
            ),  # the path's model is the one used
            ("/llm/lovd/chat/completions", chat("gpt-ok")),
        ]
        for path, body in attempts:
            status, text = await r.call("POST", path, cred, json=body)
            assert status == 403, (path, status, text)
            assert b"not offered" in text and KEY.encode() not in text
        # Bodies the broker cannot read are refused too (it could not check the model).
        for raw in (b"{not json", b'["gpt-ok"]', b"\xff\xfe", b""):
            status, text = await r.call(
                "POST",
                "/llm/openai/chat/completions",
                cred,
                data=raw,
                headers={"Content-Type": "application/json"},
            )
            assert status == 400, (raw, text)
        assert r.provider.seen == []
        # The configured ones pass, in each provider's place.
        for path, body in [
            ("/llm/openai/chat/completions", chat()),
            ("/llm/openai/responses", {"model": "gpt-ok", "input": "Hei"}),
            ("/llm/anthropic/messages", {"model": "claude-ok", "max_tokens": 9}),
            ("/llm/google/models/gemini-ok:generateContent", {"contents": []}),
            ("/llm/lovd/chat/completions", chat("legal-stub")),
        ]:
            status, text = await r.call("POST", path, cred, json=body)
            assert status == 200, (path, text)
        assert len(r.provider.seen) == 5


async def test_hosted_tools_never_reach_the_provider(tmp_path: Path) -> None:
    """Web search, code execution, remote MCP servers… run on the provider's side with
    the operator's account: only function tools pass."""
    async with rig(tmp_path) as r:
        _, cred = await r.credential()
        fn = {"type": "function", "function": {"name": "lovdata_search", "parameters": {}}}
        attempts = [
            (
                "/llm/openai/responses",
                {"model": "gpt-ok", "input": "x", "tools": [{"type": "web_search"}]},
            ),
            (
                "/llm/openai/responses",
                {
                    "model": "gpt-ok",
                    "input": "x",
                    "tools": [
                        {"type": "mcp", "server_label": "x", "server_url": "https://evil.example"}
                    ],
                },
            ),
            (
                "/llm/openai/responses",
                {"model": "gpt-ok", "input": "x", "tools": [{"type": "image_generation"}]},
            ),
            ("/llm/openai/chat/completions", chat(tools=[fn, {"type": "web_search"}])),
            (
                "/llm/anthropic/messages",
                {
                    "model": "claude-ok",
                    "max_tokens": 5,
                    "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                },
            ),
            (
                "/llm/anthropic/messages",
                {
                    "model": "claude-ok",
                    "max_tokens": 5,
                    "tools": [{"type": "code_execution_20250522", "name": "code_execution"}],
                },
            ),
            (
                "/llm/google/models/gemini-ok:generateContent",
                {"contents": [], "tools": [{"googleSearch": {}}]},
            ),
            (
                "/llm/google/models/gemini-ok:generateContent",
                {"contents": [], "tools": [{"functionDeclarations": [], "codeExecution": {}}]},
            ),
        ]
        for path, body in attempts:
            status, text = await r.call("POST", path, cred, json=body)
            assert status == 403 and b"provider's side" in text, (path, text)
        assert r.provider.seen == []
        for path, body in [  # the function tools OpenCode sends pass
            ("/llm/openai/chat/completions", chat(tools=[fn])),
            (
                "/llm/openai/responses",
                {
                    "model": "gpt-ok",
                    "input": "x",
                    "tools": [{"type": "function", "name": "lovdata_search", "parameters": {}}],
                },
            ),
            (
                "/llm/anthropic/messages",
                {
                    "model": "claude-ok",
                    "max_tokens": 5,
                    "tools": [{"name": "lovdata_search", "input_schema": {}}],
                },
            ),
            (
                "/llm/google/models/gemini-ok:generateContent",
                {"contents": [], "tools": [{"functionDeclarations": [{"name": "lovdata_search"}]}]},
            ),
        ]:
            status, text = await r.call("POST", path, cred, json=body)
            assert status == 200, (path, text)


def test_demo_mode_allows_its_stub_model(tmp_path: Path) -> None:
    cfg = config.from_mapping({"state_dir": str(tmp_path)})
    table = upstreams.from_config(
        cfg,
        {
            "llm": "http://127.0.0.1:1/v1",
            "mcp": "http://127.0.0.1:2/mcp",
            "model": "lovd/legal-stub",
        },
    )
    assert table["/llm/lovd"].models == frozenset({"legal-stub"})


# --- usage ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        # OpenAI Chat Completions, streamed (include_usage asked for by the broker)...
        ("/llm/openai/chat/completions", chat(stream=True, max_completion_tokens=700), (1200, 700)),
        # ...and a stream whose client said include_usage: false.
        (
            "/llm/openai/chat/completions",
            chat(stream=True, max_tokens=300, stream_options={"include_usage": False}),
            (1200, 300),
        ),
        ("/llm/openai/chat/completions", chat(max_tokens=50), (1200, 50)),
        # OpenAI Responses: response.usage in response.completed; top-level when plain.
        (
            "/llm/openai/responses",
            {"model": "gpt-ok", "input": "Hei", "stream": True, "max_output_tokens": 3000},
            (2000, 3000),
        ),
        (
            "/llm/openai/responses",
            {"model": "gpt-ok", "input": "Hei", "max_output_tokens": 40},
            (2000, 40),
        ),
        # Anthropic: cache writes and reads are input.
        (
            "/llm/anthropic/messages",
            {"model": "claude-ok", "max_tokens": 250, "stream": True},
            (150_015, 250),
        ),
        ("/llm/anthropic/messages", {"model": "claude-ok", "max_tokens": 60}, (150_015, 60)),
        # Google: thinking tokens are output, tool-use prompt tokens input.
        (
            "/llm/google/models/gemini-ok:streamGenerateContent?alt=sse",
            {"contents": [], "generationConfig": {"maxOutputTokens": 33_000}},
            (3040, 33_000),
        ),
        (
            "/llm/google/models/gemini-ok:generateContent",
            {"contents": [], "generationConfig": {"maxOutputTokens": 31_000}},
            (3040, 31_000),
        ),
        ("/llm/lovd/chat/completions", chat("legal-stub", stream=True, max_tokens=80), (1200, 80)),
    ],
)
async def test_the_ledger_matches_the_providers_usage(
    tmp_path: Path, path: str, body: dict[str, Any], expected: tuple[int, int]
) -> None:
    async with rig(tmp_path) as r:
        sid, cred = await r.credential()
        status, text = await r.call("POST", path, cred, json=body)
        assert status == 200, text
        usage = r.broker.usage(sid)
        assert (usage["input_tokens"], usage["output_tokens"]) == expected, text
        assert r.broker.ledger.held == {} and r.broker.ledger.held_days == {}
        if body.get("stream") and "chat/completions" in path:
            sent = r.provider.seen[0]["body"]["stream_options"]
            assert sent["include_usage"] is True


async def test_an_output_bound_is_set_when_the_request_has_none(tmp_path: Path) -> None:
    async with rig(tmp_path, llm={"max_output_tokens": 1234}) as r:
        _, cred = await r.credential()
        for path, body in [
            ("/llm/openai/chat/completions", chat()),
            ("/llm/openai/responses", {"model": "gpt-ok", "input": "Hei"}),
            ("/llm/google/models/gemini-ok:generateContent", {"contents": []}),
            ("/llm/lovd/chat/completions", chat("legal-stub")),
        ]:
            status, _ = await r.call("POST", path, cred, json=body)
            assert status == 200
        sent = [s["body"] for s in r.provider.seen]
        assert sent[0]["max_completion_tokens"] == 1234
        assert sent[1]["max_output_tokens"] == 1234
        assert sent[2]["generationConfig"]["maxOutputTokens"] == 1234
        assert sent[3]["max_tokens"] == 1234  # OpenAI-compatible servers know this one
        for bad in (0, -5, "lots", True, 1.5):
            status, text = await r.call(
                "POST", "/llm/openai/chat/completions", cred, json=chat(max_tokens=bad)
            )
            assert status == 400 and b"max_tokens" in text
        assert len(r.provider.seen) == 4


async def test_a_response_without_readable_usage_costs_its_reservation(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.provider.report_usage = False
        sid, cred = await r.credential()
        body = json.dumps(chat(max_tokens=500)).encode()
        status, _ = await r.call(
            "POST",
            "/llm/openai/chat/completions",
            cred,
            data=body,
            headers={"Content-Type": "application/json"},
        )
        assert status == 200
        usage = r.broker.usage(sid)
        assert usage["output_tokens"] == 500 and usage["input_tokens"] == len(body) // 3 + 1
        # An upstream refusal (no answer) costs nothing.
        status, _ = await r.call(
            "POST", "/llm/openai/chat/completions", cred, json=chat(max_tokens=500, fail=True)
        )
        assert status == 400 and r.broker.usage(sid)["output_tokens"] == 500
        assert len(r.provider.seen) == 2


async def test_a_stream_cut_off_by_its_caller_costs_its_reservation(tmp_path: Path) -> None:
    """Anthropic names the input in its first event, the output only at the end: a
    caller that hangs up mid-answer must not get the answer's tokens for free."""
    async with rig(tmp_path) as r:
        r.provider.pause = asyncio.Event()
        sid, cred = await r.credential()
        body = {"model": "claude-ok", "max_tokens": 4000, "stream": True}
        async with r.http.post(
            r.url + "/llm/anthropic/messages", json=body, headers={"x-api-key": cred}
        ) as resp:
            assert b"message_start" in await resp.content.readline()
        r.provider.pause.set()  # the rest comes after the caller has gone
        await until(lambda: r.broker.usage(sid)["llm_requests"] > 0, 2, "the usage recorded")
        usage = r.broker.usage(sid)
        assert usage["input_tokens"] == 150_015 and usage["output_tokens"] == 4000, usage


async def test_parallel_calls_stop_at_the_cap(tmp_path: Path) -> None:
    cap, bound = 5000, 1000
    async with rig(tmp_path, llm={"max_tokens_per_session": cap}) as r:
        r.provider.delay = 0.05
        sid, cred = await r.credential()

        async def one() -> int:
            status, _ = await r.call(
                "POST",
                "/llm/anthropic/messages",
                cred,
                json={"model": "claude-ok", "max_tokens": bound, "stream": True},
            )
            return status

        r.provider.messages = _plain_anthropic(r.provider)  # type: ignore[method-assign]
        statuses = await asyncio.gather(*(one() for _ in range(10)))
        spent = r.broker.usage(sid)
        total = spent["input_tokens"] + spent["output_tokens"]
        assert total <= cap + bound, (total, statuses)
        assert statuses.count(200) == len(r.provider.seen) and 403 in statuses
        assert spent["refused"] == statuses.count(403)


def _plain_anthropic(p: Provider) -> Any:
    """Anthropic answers that spend their whole bound with a small input."""

    async def messages(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await p.sse(
            request,
            [
                (
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {"usage": {"input_tokens": 20, "output_tokens": 1}},
                    },
                ),
                (
                    "message_delta",
                    {"type": "message_delta", "usage": {"output_tokens": body["max_tokens"]}},
                ),
            ],
        )

    return messages


# --- paths, query, headers --------------------------------------------------------------


async def test_only_allowlisted_paths_reach_an_upstream(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        _, cred = await r.credential()
        refused = [
            ("GET", "/llm/openai/files"),
            ("POST", "/llm/openai/files"),
            ("GET", "/llm/openai/organization/costs"),
            ("POST", "/llm/openai/images/generations"),
            ("POST", "/llm/openai/batches"),
            ("POST", "/llm/openai/fine_tuning/jobs"),
            ("GET", "/llm/openai/models"),
            ("GET", "/llm/openai/responses"),
            ("DELETE", "/llm/openai/responses"),
            ("GET", "/llm/openai/chat/completions"),
            ("POST", "/llm/openai/chat/completions/"),
            ("POST", "/llm/openai//chat/completions"),
            ("POST", "/llm/openai/./chat/completions"),
            ("POST", "/llm/openai/%2e%2e/x"),
            ("POST", "/llm/openai/%2E%2E/x"),
            ("POST", "/llm/openai/chat%2fcompletions"),
            ("POST", "/llm/openai/chat%2Fcompletions"),
            ("POST", "/llm/openai/chat/completions%00"),
            ("POST", "/llm/openai/chat\\completions"),
            ("POST", "/llm/lovd/responses"),
            ("POST", "/llm/lovd/embeddings"),
            ("POST", "/llm/anthropic/messages/batches"),
            ("POST", "/llm/anthropic/messages/count_tokens"),
            ("GET", "/llm/anthropic/files"),
            ("GET", "/llm/google/files"),
            ("POST", "/llm/google/files"),
            ("GET", "/llm/google/models"),
            ("POST", "/llm/google/models/gemini-ok:countTokens"),
            ("POST", "/llm/google/models/gemini-ok:generateContent/x"),
            ("POST", "/llm/google/models/../files:generateContent"),
            ("POST", "/llm/google/tunedModels/x:generateContent"),
            ("GET", "/mcp/lovdata/%252e%252e/outside"),
            ("GET", "/mcp/lovdata/%2e%2e/outside"),
            ("GET", "/mcp/lovdata/../outside"),
            ("POST", "/mcp/lovdata/"),
            ("POST", "/mcp/lovdata/x"),
            ("PUT", "/mcp/lovdata"),
            ("PATCH", "/mcp/lovdata"),
            ("GET", "/mcp/lovdataX"),
            ("GET", "/llm/openaiX/chat/completions"),
            ("GET", "/"),
            ("GET", "/llm"),
        ]
        for method, path in refused:
            async with r.http.request(
                method,
                URL(r.url + path, encoded=True),
                json=chat(),
                headers={"Authorization": f"Bearer {cred}"},
                allow_redirects=False,
            ) as resp:
                assert resp.status in (403, 404), (method, path, resp.status)
        # Raw, so no client library tidies the path first.
        for raw in (
            b"/llm/openai/%2e%2e/%2e%2e/mcp",
            b"/mcp/lovdata/%252e%252e/outside",
            b"/llm/openai/..%2f..%2fx",
            b"/llm/openai/chat/completions/..",
            b"//llm/openai/chat/completions",
            b"/llm/openai/chat/./completions",
        ):
            line = await _raw_request(r.url, b"POST " + raw, cred)
            assert line.split()[1] in (b"400", b"403", b"404"), (raw, line)
        assert r.provider.seen == []
        # The MCP endpoint itself: POST, GET (event stream) and DELETE.
        for method in ("POST", "GET", "DELETE"):
            status, _ = await r.call(method, "/mcp/lovdata", cred)
            assert status == 200
        assert [s["path"] for s in r.provider.seen] == ["/mcp"] * 3


async def _raw_request(url: str, start: bytes, cred: str) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(chat()).encode()
    writer.write(
        start
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + cred.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return line


async def test_only_allowlisted_headers_and_query_go_upstream(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        _, cred = await r.credential()
        sneaky = {
            "OpenAI-Organization": "org-other",
            "OpenAI-Project": "proj-other",
            "anthropic-beta": "mcp-client-2025-04-04,files-api-2025-04-14",
            "X-Forwarded-For": "1.2.3.4",
            "Cookie": "a=b",
            "OpenAI-Beta": "assistants=v2",
            "anthropic-version": "2023-06-01",
            "User-Agent": "ai-sdk/test",
            "mcp-session-id": "m1",
            "mcp-protocol-version": "2025-06-18",
        }
        for path, body in [
            ("/llm/openai/responses?key=" + cred + "&api-version=1", {"model": "gpt-ok"}),
            ("/llm/anthropic/messages?beta=true", {"model": "claude-ok", "max_tokens": 3}),
            (
                "/llm/google/models/gemini-ok:streamGenerateContent?alt=sse&key=x&alt=json",
                {"contents": []},
            ),
            ("/mcp/lovdata?session=1", {"jsonrpc": "2.0"}),
        ]:
            status, _ = await r.call("POST", path, cred, json=body, headers=sneaky)
            assert status == 200
        for seen in r.provider.seen:
            names = set(seen["headers"])
            for bad in (
                "openai-organization",
                "openai-project",
                "anthropic-beta",
                "x-forwarded-for",
                "cookie",
                "openai-beta",
            ):
                assert bad not in names, (seen["path"], bad)
            assert seen["headers"]["user-agent"] == "ai-sdk/test"
            assert cred not in json.dumps(seen)
        openai, anthropic, google, mcp = r.provider.seen
        assert openai["query"] == [] and anthropic["query"] == [] and mcp["query"] == []
        assert google["query"] == [("alt", "sse")]
        assert anthropic["headers"]["anthropic-version"] == "2023-06-01"
        assert mcp["headers"]["mcp-session-id"] == "m1"
        assert openai["headers"]["authorization"] == f"Bearer {KEY}"
        assert anthropic["headers"]["x-api-key"] == KEY
        assert google["headers"]["x-goog-api-key"] == KEY


# --- resources --------------------------------------------------------------------------


async def test_bodies_are_capped_as_they_arrive(tmp_path: Path) -> None:
    async with rig(tmp_path, broker={"max_body": "64K"}) as r:
        _, cred = await r.credential()
        big = chat(pad="x" * 70_000)
        status, text = await r.call("POST", "/llm/openai/chat/completions", cred, json=big)
        assert status == 413 and b"broker.max_body" in text  # by Content-Length

        async def chunked() -> AsyncIterator[bytes]:
            yield b'{"model": "gpt-ok", "pad": "'
            for _ in range(100):
                yield b"x" * 1024
            yield b'"}'

        status, text = await r.call("POST", "/llm/openai/chat/completions", cred, data=chunked())
        assert status == 413
        status, _ = await r.call("POST", "/mcp/lovdata", cred, data=chunked())
        assert status == 413
        assert r.provider.seen == []
        assert r.broker.gates.body_bytes == 0 and r.broker.gates.session_bytes == {}


async def test_parallel_big_posts_keep_memory_bounded(tmp_path: Path) -> None:
    """40 parallel 31 MiB uploads from one session: lovd holds at most its budgets."""
    async with rig(tmp_path, broker={"max_body": "1M"}) as r:
        _, cred = await r.credential()

        async def upload() -> int | str:
            async def body() -> AsyncIterator[bytes]:
                chunk = b"x" * (256 << 10)
                for _ in range(31 * 4):
                    yield chunk

            try:
                status, _ = await r.call("POST", "/llm/openai/chat/completions", cred, data=body())
                return status
            except aiohttp.ClientError as e:  # the broker stopped reading and hung up
                return type(e).__name__

        tracemalloc.start()
        try:
            results = await asyncio.gather(*(upload() for _ in range(40)))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        print(f"40 parallel 31 MiB POSTs: traced peak {peak / 2**20:.1f} MiB")
        # Without the cap checked as bodies arrive this peaks at 40 x 31 MiB.
        assert peak < 48 << 20, (peak, results)
        statuses = {x for x in results if isinstance(x, int)}
        assert statuses <= {413, 429, 503}, results
        assert r.provider.seen == []
        assert r.broker.gates.body_bytes == 0 and r.broker.gates.requests == {}


async def test_a_session_has_a_limited_number_of_requests_in_flight(tmp_path: Path) -> None:
    async with rig(tmp_path, broker={"session_requests": 3}) as r:
        r.provider.hold = asyncio.Event()
        _, cred = await r.credential()
        _, other = await r.credential()
        held = [
            asyncio.create_task(r.call("POST", "/mcp/lovdata", cred, json={})) for _ in range(3)
        ]
        await until(lambda: len(r.provider.seen) >= 3, 5, "3 calls at the provider")
        status, text = await asyncio.wait_for(r.call("POST", "/mcp/lovdata", cred, json={}), 5)
        assert status == 429 and b"in flight" in text
        assert len(r.provider.seen) == 3
        other_call = asyncio.create_task(r.call("POST", "/mcp/lovdata", other, json={}))
        # another session is not held back
        await until(lambda: len(r.provider.seen) >= 4, 5, "the other session's call")
        r.provider.hold.set()
        assert [s for s, _ in await asyncio.gather(*held, other_call)] == [200] * 4
        assert r.broker.gates.requests == {}


async def test_llm_calls_of_a_session_run_two_at_a_time(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.provider.hold = asyncio.Event()
        _, cred = await r.credential()
        calls = [
            asyncio.create_task(
                r.call("POST", "/llm/openai/chat/completions", cred, json=chat(max_tokens=5))
            )
            for _ in range(5)
        ]
        await until(lambda: len(r.provider.seen) >= 2, 5, "2 calls at the provider")
        await asyncio.sleep(0.2)  # time for a third to arrive, were it let through
        assert len(r.provider.seen) == 2  # the other three wait their turn
        r.provider.hold.set()
        assert [s for s, _ in await asyncio.gather(*calls)] == [200] * 5


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_half_open_and_slow_connections_are_closed(tmp_path: Path) -> None:
    async with rig(tmp_path, broker={"read_timeout": 1.0, "max_connections": 50}) as r:
        _, cred = await r.credential()
        host, port = r.url.removeprefix("http://").split(":")
        base_fds = _fds()
        conns = []
        for i in range(120):
            reader, writer = await asyncio.open_connection(host, int(port))
            if i % 3 == 1:  # a request head that never ends
                writer.write(b"POST /llm/openai/chat/completions HTTP/1.1\r\nHost: x\r\n")
            elif i % 3 == 2:  # a body that never ends
                writer.write(
                    b"POST /mcp/lovdata HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + cred.encode()
                    + b"\r\nContent-Length: 1000\r\n\r\n{"
                )
            conns.append((reader, writer))
        await asyncio.sleep(0.2)
        # Never more open than max_connections; the rest were answered 503 and closed.
        assert len(r.runner.server.connections) <= 50  # type: ignore[union-attr]
        t0 = time.monotonic()
        firsts = await asyncio.gather(*(asyncio.wait_for(rd.read(), 5) for rd, _ in conns))
        took = time.monotonic() - t0
        # read_timeout, + lingering for the 408s, + slack for a loaded test host
        assert took < 1.0 + 2.0 + 3.0, took
        assert sum(b"503" in f.split(b"\r\n")[0] for f in firsts) >= 120 - 50
        assert any(f.startswith(b"HTTP/1.1 408") for f in firsts), firsts
        for _, w in conns:
            w.close()
        server = r.runner.server
        assert server is not None
        await until(
            lambda: not server.connections and _fds() <= base_fds + 2,
            2,
            "every connection and its file descriptor closed",
        )
        assert len(server.connections) == 0
        assert _fds() <= base_fds + 2
        assert r.provider.seen == []
        # And the broker still answers.
        status, _ = await r.call("POST", "/mcp/lovdata", cred, json={})
        assert status == 200
