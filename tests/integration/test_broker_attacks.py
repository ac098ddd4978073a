"""The broker attacks of issue 15, replayed against a real ``lovd serve`` (its broker on
its own port, a real session container's credential) in front of a recording fake
provider: what reached the provider, what the ledger says, and lovd's own RSS peak
(VmHWM) and file descriptors under 40 parallel 31 MiB uploads and a flood of half-open
connections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.lovdproc import LovdProc
from tests.unit.test_broker_limits import Provider

KEY = "sk-CANARY-operator-key-integration"


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # kB
    raise AssertionError(field)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _closed(reader: asyncio.StreamReader) -> None:
    """Wait until lovd closes the connection (a reset counts: unread bytes were dropped)."""
    with contextlib.suppress(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 10)


async def test_broker_attacks_against_a_real_lovd(test_image: str, tmp_path: Path) -> None:
    provider = Provider()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", provider.handle)
    fake = TestServer(app)
    await fake.start_server()
    base = f"http://127.0.0.1:{fake.port}"
    p = LovdProc(
        tmp_path,
        image=test_image,
        llm={
            "openai_api_key": KEY,
            "openai_base_url": base + "/openai/v1",
            "anthropic_api_key": KEY,
            "anthropic_base_url": base + "/anthropic/v1",
            "model": "openai/gpt-ok",
            "models": ["anthropic/claude-ok"],
        },
        mcp={"lovdata": {"url": base + "/mcp", "token": KEY}},
        egress={"enforce": False},  # the attacker here is on the host, with the credential
    )
    conf = yaml.safe_load(p.config_path.read_text())
    conf["broker"].update({"read_timeout": 2.0, "max_connections": 300})
    p.config_path.write_text(yaml.safe_dump(conf))
    # This test (and lovd, which inherits it) holds hundreds of sockets.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    sid = ""
    try:
        p.start()
        assert p.proc is not None
        pid = p.proc.pid
        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201, s
        sid = s["id"]
        env_file = next((tmp_path / "run").glob(f"secrets-*/{sid}.env"))
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        cred = env["OPENAI_API_KEY"]
        port = int(env["LOVD_BROKER_URL"].rsplit(":", 1)[1])  # host_gateway:PORT inside
        broker = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {cred}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def post(path: str, **kw: object) -> tuple[int, bytes]:
                async with http.post(
                    URL(broker + path, encoded=True),
                    headers={**auth, **kw.pop("headers", {})},
                    **kw,
                ) as r:  # type: ignore[arg-type]
                    return r.status, await r.read()

            # 3. Another model, with the operator's key: never reaches the provider.
            for path, body in [
                ("/llm/openai/chat/completions", {"model": "gpt-5.5-pro", "messages": []}),
                ("/llm/openai/responses", {"model": "o3-pro", "input": "x"}),
                ("/llm/anthropic/messages", {"model": "claude-opus-4", "max_tokens": 9}),
            ]:
                code, text = await post(path, json=body)
                assert code == 403 and b"not offered" in text, (path, text)
            # 5. Other endpoints, encodings, and headers.
            for path in (
                "/llm/openai/files",
                "/llm/openai/organization/costs",
                "/llm/openai/images/generations",
                "/llm/openai/batches",
                "/llm/openai/fine_tuning/jobs",
                "/llm/anthropic/messages/batches",
                "/mcp/lovdata/%252e%252e/outside",
                "/llm/openai/%2e%2e/x",
            ):
                code, _ = await post(path, json={"model": "gpt-ok"})
                assert code == 404, path
            assert provider.seen == []
            code, _ = await post(
                "/llm/openai/responses",
                headers={"OpenAI-Organization": "org-x", "OpenAI-Project": "p-x"},
                json={"model": "gpt-ok", "input": "x", "stream": True, "max_output_tokens": 700},
            )
            assert code == 200
            code, _ = await post(
                "/llm/anthropic/messages",
                headers={"anthropic-beta": "files-api-2025-04-14"},
                json={"model": "claude-ok", "max_tokens": 300},
            )
            assert code == 200
            sent = [seen["headers"] for seen in provider.seen]
            assert not {"openai-organization", "openai-project", "anthropic-beta"} & (
                set(sent[0]) | set(sent[1])
            )
            # 4. The ledger matches the provider's usage (Responses; Anthropic with cache).
            _, _, shown = p.api("GET", f"/api/sessions/{sid}")
            assert shown["usage"]["input_tokens"] == 2000 + 150_015, shown["usage"]
            assert shown["usage"]["output_tokens"] == 700 + 300, shown["usage"]

            # 5. 40 parallel 31 MiB uploads: lovd's RSS peak stays bounded.
            hwm0, rss0 = _status(pid, "VmHWM"), _status(pid, "VmRSS")

            async def upload() -> object:
                async def body() -> AsyncIterator[bytes]:
                    chunk = b"x" * (1 << 20)
                    for _ in range(31):
                        yield chunk

                try:
                    return (await post("/llm/openai/chat/completions", data=body()))[0]
                except aiohttp.ClientError as e:
                    return type(e).__name__

            results = await asyncio.gather(*(upload() for _ in range(40)))
            hwm1 = _status(pid, "VmHWM")
            print(
                f"lovd RSS {rss0 / 1024:.0f} MB before; peak {hwm0 / 1024:.0f} MB -> "
                f"{hwm1 / 1024:.0f} MB during 40 x 31 MiB uploads ({results[:5]}...)"
            )
            assert (hwm1 - rss0) / 1024 < 200, (rss0, hwm1, results)
            assert len(provider.seen) == 2

            # 5. Half-open connections: lovd's fds stay bounded and come back down.
            fds0 = _fds(pid)
            conns = []
            for i in range(600):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 2:
                    writer.write(b"POST /mcp/lovdata HTTP/1.1\r\nHost: x\r\n")
                conns.append((reader, writer))
            await asyncio.sleep(0.5)
            fds1 = _fds(pid)
            t0 = time.monotonic()
            await asyncio.gather(*(_closed(r) for r, _ in conns))
            took = time.monotonic() - t0
            for _, w in conns:
                w.close()
            await asyncio.sleep(0.5)
            fds2 = _fds(pid)
            print(
                f"lovd fds {fds0} before, {fds1} with 600 half-open connections, "
                f"{fds2} after; all closed by lovd within {took:.1f} s"
            )
            # broker.max_connections, plus some in passing (asyncio accepts a batch before
            # the cap refuses them; upstream connections); without the cap all 600 would
            # stay open.
            assert fds1 <= fds0 + 300 + 150, fds1
            assert fds2 <= fds0 + 5, (fds0, fds2)
            assert took < 2.0 + 2.0 + 3.0, took  # read_timeout + lingering + slack
            code, _ = await post("/mcp/lovdata", json={"jsonrpc": "2.0"})
            assert code == 200  # and the broker still serves
    finally:
        p.stop()
        await fake.close()
        if sid:
            subprocess.run(
                ["podman", "rm", "-f", "-t", "0", f"lovd-{sid}"], capture_output=True, check=False
            )
        subprocess.run(["podman", "unshare", "rm", "-rf", str(tmp_path / "state")], check=False)
