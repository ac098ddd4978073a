"""The session image's own HTTP client (OpenCode runs on Bun) against lovd's broker as
``lovd serve`` runs it: calls made one broker idle period apart all arrive. Bun's fetch
keeps idle connections for minutes and may reuse one just as the broker closes it (a
keep-alive broker lost 1 call in 60 this way); the broker's answers close their
connections, so there is none to reuse."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from lovd.broker.limits import CappedSite
from lovd.broker.server import make_runner
from tests.conftest import image_present, need
from tests.integration.test_opencode_image import SESSION_IMAGE
from tests.unit.test_broker import rig

pytestmark = [pytest.mark.opencode, pytest.mark.podman]

IDLE = 0.5  # broker.read_timeout: how long the broker keeps a connection that says nothing
CALLS = 24  # per loop
LOOPS = 4

CLIENT = """
const [url, cred, gap, n, loops] = [process.argv[2], process.argv[3],
  Number(process.argv[4]), Number(process.argv[5]), Number(process.argv[6])];
const statuses = [], errors = [];
async function loop(k) {
  for (let i = 0; i < n; i++) {
    try {
      const r = await fetch(url, {method: "POST", headers: {"Authorization": `Bearer ${cred}`,
        "Content-Type": "application/json"}, body: JSON.stringify({jsonrpc: "2.0", id: i})});
      await r.text();
      statuses.push(r.status);
    } catch (e) { errors.push(`${k}.${i}: ${e}`); }
    // One idle period, give or take 20 ms: where a kept-alive connection is closed.
    await new Promise(r => setTimeout(r, gap * 1000 + (Math.random() - 0.5) * 40));
  }
}
// Parallel loops share Bun's pool: more calls near the boundary in the same time.
await Promise.all(Array.from({length: loops}, (_, k) => loop(k)));
console.log(JSON.stringify({statuses, errors}));
"""


async def test_a_chats_calls_one_idle_period_apart_all_arrive(tmp_path: Path) -> None:
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run lovd image build")
    script = tmp_path / "client.js"
    script.write_text(CLIENT)
    async with rig(tmp_path, broker={"read_timeout": IDLE}) as r:
        _, cred = await r.session()
        connections: list[object] = []  # held, so no two share an id

        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not any(c is request.protocol for c in connections):
                connections.append(request.protocol)
            return await handler(request)

        # As serve_broker runs it, with the connections counted.
        runner = make_runner(r.broker)
        runner.app.middlewares.append(count)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await CappedSite(runner, sock, r.broker.limits.max_connections).start()
        try:
            proc = await asyncio.create_subprocess_exec(
                "podman", "run", "--rm", "--network", "host",
                "-v", f"{script}:/client.js:ro", "-e", "BUN_BE_BUN=1",
                "--entrypoint", "opencode", SESSION_IMAGE,
                "/client.js", f"http://127.0.0.1:{port}/mcp/lovdata", cred, str(IDLE),
                str(CALLS), str(LOOPS),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            await runner.cleanup()
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["errors"] == [], result
    assert result["statuses"] == [200] * CALLS * LOOPS, result
    assert len(r.upstream.seen) == CALLS * LOOPS  # each call reached the MCP upstream
    # Each on a connection of its own: Bun kept none to reuse as the broker closed it.
    # (Kept alive instead, these 96 calls came on 7 connections.)
    assert len(connections) == CALLS * LOOPS
