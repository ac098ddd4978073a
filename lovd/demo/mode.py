"""Demo mode: run the Lovdata MCP and LLM stand-ins inside lovd and point sessions at them.

Demo mode lets the whole flow be tried with no API keys and no internet. ``auto``
turns it on only when the operator configured neither a Lovdata MCP URL nor any
LLM key or model, so a configured production host never talks to a stand-in.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lovd.config import Config

log = logging.getLogger(__name__)

DEMO_MODEL = "lovd/legal-stub"


def enabled(c: Config) -> bool:
    if c.demo != "auto":
        return c.demo == "on"
    configured = (
        c.mcp_lovdata_url,
        c.model,
        c.llm_base_url,
        c.openai_api_key,
        c.anthropic_api_key,
        c.google_api_key,
    )
    return not any(configured)


@dataclass
class Demo:
    urls: dict[str, str] = field(default_factory=dict)
    stops: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for stop in reversed(self.stops):
            await stop()
        self.stops.clear()


async def start(c: Config) -> Demo:
    """Start the stand-ins when demo mode is on; ``urls`` is what sessions are given."""
    demo = Demo()
    if not enabled(c):
        return demo
    try:
        from lovd.demo.serve import serve_llm_stub, serve_lovdata_mcp
    except ImportError as e:
        raise RuntimeError(
            "demo mode needs the demo extra (pip install 'lovd[demo]'); "
            "or configure mcp.lovdata.url and an LLM and set demo: off"
        ) from e
    mcp = await serve_lovdata_mcp(c.demo_listen, c.demo_mcp_port, corpus_path=c.demo_corpus or None)
    demo.stops.append(mcp.stop)
    llm = await serve_llm_stub(c.demo_listen, c.demo_llm_port)
    demo.stops.append(llm.stop)
    # The broker calls them on the host; sessions only ever see the broker.
    host = "127.0.0.1" if c.demo_listen in ("", "0.0.0.0", "::") else c.demo_listen  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    demo.urls = {
        "mcp": f"http://{host}:{mcp.port}/mcp",
        "llm": f"http://{host}:{llm.port}/v1",
        "model": DEMO_MODEL,
    }
    log.info("demo mode: Lovdata MCP stand-in on port %d, stub LLM on port %d", mcp.port, llm.port)
    return demo
