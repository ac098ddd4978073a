"""Run the stand-ins inside an asyncio program (``lovd demo``, tests).

Both bind port 0 by default and report the port they got, so parallel test runs and a
running demo never collide.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from lovd.demo import llm_stub, lovdata_mcp

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 10.0


@dataclass
class StandIn:
    """A running stand-in: where it listens and how to stop it."""

    host: str
    port: int
    stop: Callable[[], Awaitable[None]]
    calls: lovdata_mcp.CallLog | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


async def serve_lovdata_mcp(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    corpus_path: Path | str | None = None,
    calls_log: Path | str | None = None,
    token: str | None = None,
) -> StandIn:
    """Start the Lovdata MCP stand-in under uvicorn; its MCP URL is ``base_url + "/mcp"``."""
    import uvicorn  # deferred: the demo extra is optional for the daemon

    calls = lovdata_mcp.CallLog(Path(calls_log) if calls_log else None)
    app = lovdata_mcp.create_app(corpus_path, calls_log, token=token, calls=calls)
    # MCP clients hold a GET event stream open; don't let it delay shutdown.
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    while not server.started:
        if task.done():
            task.result()  # re-raises the startup error (e.g. port in use)
            raise RuntimeError("uvicorn exited during startup")
        if loop.time() > deadline:
            server.should_exit = True
            raise TimeoutError("Lovdata MCP stand-in did not start")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]

    async def stop() -> None:
        server.should_exit = True
        await task

    logger.info("Lovdata MCP stand-in on %s:%d", host, bound)
    return StandIn(host=host, port=int(bound), stop=stop, calls=calls)


async def serve_llm_stub(host: str = "127.0.0.1", port: int = 0, api_key: str = "") -> StandIn:
    """Start the stub LLM; its OpenAI base URL is ``base_url + "/v1"``. With ``api_key``
    it refuses calls that do not carry it."""
    runner = web.AppRunner(llm_stub.create_app(api_key), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp exposes the bound port only here or via runner.addresses
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port

    async def stop() -> None:
        await runner.cleanup()

    logger.info("stub LLM on %s:%d", host, bound)
    return StandIn(host=host, port=int(bound), stop=stop)
