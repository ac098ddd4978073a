"""What a hostile visitor puts in a chat request body, tried for real (issue 15, 1-3).

A real lovd (``lovd serve``) with Caddy in front and a real OpenCode 1.18.33 session
container, from the session's browser side (a valid cookie, through Caddy):

- a file part ``file:///usr/bin/node`` (OpenCode reads it and copies it into the chat
  database: +507 MB before) grows nothing, and ``file:///run/secrets/lovd.env`` (the
  container's password and broker credential, shown in the chat before) never shows
  up in any message; http(s) URLs and ``source`` parts are refused too;
- a model or agent the operator did not allow is refused (403 problem+json naming the
  field), and OpenCode's own ``GET /provider`` lists only the allowed models;
- the disk quota: a chat that fills its workspace with attachments gets the quota's
  message (Norwegian and English) and keeps its history; another visitor's session
  goes on.

Each attack is first replayed straight at the container (with its own password, as
lovd's gate is not there) to show it is real, so a pass here is not a hollow one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lovd.demo.serve import serve_llm_stub, serve_lovdata_mcp
from lovd.session.quota import walk_size
from tests.conftest import image_present, need
from tests.integration.caddy_harness import CaddyProc, caddy_binary, free_port
from tests.lovdproc import LovdProc, cookie_of

pytestmark = [pytest.mark.caddy, pytest.mark.opencode]

SESSION_IMAGE = "localhost/lovd-session:latest"
ALLOWED = {"lovd/legal-stub", "openai/gpt-4o-mini"}
QUOTA = 24 * 2**20


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


def du(path: Path) -> int:
    """Allocated bytes of a workspace (its files belong to the container's uids)."""
    out = run("podman", "unshare", "du", "-s", "-B1", str(path))
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[0])


async def settled(path: Path) -> int:
    """The workspace's size once OpenCode has stopped writing (the last answer, its
    title) -- so what the attacks add is not hidden in that noise."""
    last = -1
    for _ in range(20):
        now = du(path)
        if now == last:
            return now
        last = now
        await asyncio.sleep(1)
    return last


def _file(url: str, mime: str = "application/octet-stream", **more: Any) -> dict[str, Any]:
    return {
        "noReply": True,
        "parts": [{"type": "file", "mime": mime, "filename": "n", "url": url, **more}],
    }


async def _texts(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return json.dumps(await r.json())


async def test_chat_bodies_cannot_read_files_pick_models_or_fill_the_disk(
    podman: str, tmp_path: Path
) -> None:
    need(caddy_binary() is not None, "caddy is not installed (apt-get install caddy)")
    need(image_present(SESSION_IMAGE), f"{SESSION_IMAGE} missing: run 'lovd image build'")
    llm = await serve_llm_stub("127.0.0.1", 0, api_key="stub-key")
    mcp = await serve_lovdata_mcp("127.0.0.1", 0, token="mcp-key")
    caddy_dir = Path(tmp_path / "caddy")
    caddy_dir.mkdir()
    caddy = CaddyProc(caddy_dir)
    await caddy.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    p = LovdProc(
        tmp_path / "lovd",
        image=SESSION_IMAGE,
        ready_timeout=90,
        public_url=base,
        limits={"disk": f"{QUOTA // 2**20}M"},
        llm={
            "model": "lovd/legal-stub",
            "models": ["openai/gpt-4o-mini"],
            "base_url": f"{llm.base_url}/v1",
            "api_key": "stub-key",
            "openai_api_key": "sk-not-used",
        },
        mcp={"lovdata": {"url": f"{mcp.base_url}/mcp", "token": "mcp-key"}},
        caddy={
            "admin": caddy.admin_address,
            "listen": [f"127.0.0.1:{port}"],
            "auth_socket": str(caddy_dir / "auth.sock"),
            "check_interval": 0.5,
        },
    )
    names: list[str] = []
    try:
        await asyncio.to_thread(p.start)
        status, _, s = await asyncio.to_thread(p.api, "POST", "/api/sessions")
        assert status == 201 and s["status"] == "running", s
        names.append(f"lovd-{s['id']}")
        workspace = tmp_path / "lovd" / "state" / "sessions" / s["id"]
        secret = await asyncio.to_thread(cookie_of, p, s)  # the link, used as a browser does
        cookie = {"Cookie": f"lovd_session={s['id']}.{secret}"}
        env = run("podman", "exec", names[0], "cat", "/run/secrets/lovd.env").stdout
        secrets = dict(x.split("=", 1) for x in env.splitlines())
        password = secrets["OPENCODE_SERVER_PASSWORD"]
        container = f"http://127.0.0.1:{s['port']}"
        direct_auth = {"Authorization": aiohttp.encode_basic_auth("opencode", password)}
        timeout = aiohttp.ClientTimeout(total=120)
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=cookie) as http,
            aiohttp.ClientSession(timeout=timeout, headers=direct_auth) as direct,
        ):
            for _ in range(100):  # until lovd's server is in Caddy
                ok = await http.get(base + "/global/health")
                if ok.status == 200:
                    break
                await asyncio.sleep(0.1)
            assert ok.status == 200, await ok.text()

            # 0. The attack is real: straight at OpenCode, a file:// part puts the
            #    container's secrets into the chat.
            async with direct.post(container + "/session", json={}) as r:
                scratch = (await r.json())["id"]
            async with direct.post(
                f"{container}/session/{scratch}/prompt_async",
                json=_file("file:///run/secrets/lovd.env"),
            ) as r:
                assert r.status < 300, await r.text()
            shown = ""
            for _ in range(100):
                shown = await _texts(direct, f"{container}/session/{scratch}/message")
                if "OPENCODE_SERVER_PASSWORD" in shown or password in shown:
                    break
                await asyncio.sleep(0.1)
            decoded = shown + "".join(
                base64.b64decode(u.split(",", 1)[1]).decode(errors="replace")
                for u in re.findall(r'"url": "(data:[^"]+)"', shown)
            )
            assert password in decoded, "OpenCode no longer reads file:// parts: update this test"

            # 1. Through Caddy and lovd: a chat as the UI makes it, with an attachment.
            async with http.post(base + "/session", json={}) as r:
                assert r.status == 200, await r.text()
                oc = (await r.json())["id"]
            pdf = base64.b64encode(b"%PDF-1.4 oppsigelsesbrev").decode()
            body = {
                "agent": "juridisk",
                "model": {"providerID": "lovd", "modelID": "legal-stub"},
                "parts": [
                    {"type": "text", "text": "Hva sier arbeidsmiljøloven om oppsigelse?"},
                    {
                        "type": "file",
                        "mime": "application/pdf",
                        "filename": "brev.pdf",
                        "url": f"data:application/pdf;base64,{pdf}",
                    },
                ],
            }
            async with http.post(f"{base}/session/{oc}/prompt_async", json=body) as r:
                assert r.status < 300, await r.text()
            for _ in range(600):
                seen = await _texts(http, f"{base}/session/{oc}/message")
                if "lovdata.no" in seen:
                    break
                await asyncio.sleep(0.1)
            assert "lovdata.no" in seen and "brev.pdf" in seen

            # 2. Attacks through Caddy: refused, naming the field; nothing reaches OpenCode.
            before = await settled(workspace)
            # lovd measures it itself, cheaply (no podman unshare): OpenCode's files are
            # readable by lovd's user although they belong to the container's uids.
            assert abs(walk_size(workspace) - before) < 256 * 1024, (walk_size(workspace), before)
            attacks: list[tuple[dict[str, Any], str]] = [
                (_file("file:///usr/bin/node"), "parts[0]"),
                (_file("file:///run/secrets/lovd.env", "text/plain"), "parts[0].url"),
                (_file("file:///run/secrets/", "application/x-directory"), "parts[0]"),
                (_file("http://127.0.0.1:1/x.png", "image/png"), "parts[0].url"),
                (
                    _file(
                        f"data:text/plain;base64,{pdf}",
                        "text/plain",
                        source={
                            "type": "file",
                            "path": "/run/secrets/lovd.env",
                            "text": {"value": "", "start": 0, "end": 0},
                        },
                    ),
                    "parts[0].source",
                ),
                (
                    _file(
                        f"data:text/plain;base64,{pdf}",
                        "text/plain",
                        source={
                            "type": "resource",
                            "clientName": "lovdata",
                            "uri": "file:///etc/passwd",
                        },
                    ),
                    "parts[0].source",
                ),
                (
                    {
                        "parts": [{"type": "text", "text": "x"}],
                        "model": {"providerID": "openai", "modelID": "gpt-5.5-pro"},
                    },
                    "model",
                ),
                (
                    {
                        "parts": [{"type": "text", "text": "x"}],
                        "model": {"providerID": "anthropic", "modelID": "claude-opus-4-1"},
                    },
                    "model",
                ),
                ({"parts": [{"type": "text", "text": "x"}], "agent": "build"}, "agent"),
                ({"parts": [{"type": "text", "text": "x"}], "variant": "turbo"}, "variant"),
            ]
            for data, field in attacks:
                async with http.post(f"{base}/session/{oc}/prompt_async", json=data) as r:
                    problem = await r.json(content_type=None)
                    assert r.status == 403, (data, r.status, problem)
                    assert r.content_type == "application/problem+json"
                    assert problem["field"].startswith(field), (field, problem)
                    assert problem["field"] in problem["detail"]
                    assert problem["data"]["message"] == problem["detail"]  # the UI's toast
            async with http.post(base + "/session", json={"agent": "build"}) as r:
                assert r.status == 403 and (await r.json())["field"] == "agent"
            after = await settled(workspace)
            print(f"workspace before the attacks {before} B, after {after} B")
            # OpenCode's own bookkeeping after an answer (title, summary) writes a few
            # hundred KB; /usr/bin/node alone would be 94 MiB (24 MiB with the per-file cap).
            assert after - before < 1024 * 1024, (before, after)
            for chat in (oc,):
                text = await _texts(http, f"{base}/session/{chat}/message")
                assert password not in text and "/run/secrets" not in text
                assert "OPENCODE_SERVER_PASSWORD" not in text and "gpt-5.5-pro" not in text
            assert "/run/secrets" not in await _texts(http, f"{base}/session")

            # 3. OpenCode itself lists only the allowed models.
            async with http.get(base + "/provider") as r:
                assert r.status == 200, await r.text()
                providers = await r.json()
            listed = {f"{pr['id']}/{m}" for pr in providers["all"] for m in pr["models"]}
            assert listed == ALLOWED, listed

            # 4. The disk quota: attachments until the workspace is full. Each prompt
            #    carries 4 MiB (5.3 MiB of base64, stored as such).
            used = du(workspace)
            blob = base64.b64encode(os.urandom(4 * 2**20)).decode()
            attach = _file(f"data:application/pdf;base64,{blob}", "application/pdf")
            refused: dict[str, Any] = {}
            sent = 0
            for _ in range(QUOTA // (4 * 2**20) + 3):
                async with http.post(f"{base}/session/{oc}/prompt_async", json=attach) as r:
                    if r.status == 507:
                        refused = await r.json(content_type=None)
                        break
                    assert r.status < 300, await r.text()
                    sent += 1
            print(f"workspace {used} B at the start; {sent} attachments sent before the quota")
            assert refused, "the quota never stopped the chat"
            assert "lagringsplassen" in refused["detail"] and "storage" in refused["detail"]
            assert refused["data"]["message"] == refused["detail"]
            assert 1 <= sent <= QUOTA // (4 * 2**20)
            print(f"workspace when refused: {du(workspace)} B (quota {QUOTA} B)")
            # The history is still there and readable; the quota deleted nothing.
            history = await _texts(http, f"{base}/session/{oc}/message")
            assert "lovdata.no" in history and "brev.pdf" in history
            # Another visitor's session is unaffected.
            status, _, s2 = await asyncio.to_thread(p.api, "POST", "/api/sessions")
            assert status == 201, s2
            names.append(f"lovd-{s2['id']}")
            secret2 = await asyncio.to_thread(cookie_of, p, s2)
            other = {"Cookie": f"lovd_session={s2['id']}.{secret2}"}
            async with aiohttp.ClientSession(timeout=timeout, headers=other) as http2:
                for _ in range(100):
                    ok = await http2.get(base + "/global/health")
                    if ok.status == 200:
                        break
                    await asyncio.sleep(0.1)
                async with http2.post(base + "/session", json={}) as r:
                    oc2 = (await r.json())["id"]
                async with http2.post(f"{base}/session/{oc2}/prompt_async", json=attach) as r:
                    assert r.status == 204, await r.text()

            # 5. The per-file backstop, straight at OpenCode (no gate): file:///usr/bin/node
            #    (94 MiB) cannot make any file of the workspace outgrow the quota.
            grown = du(workspace)
            async with direct.post(
                f"{container}/session/{scratch}/prompt_async", json=_file("file:///usr/bin/node")
            ) as r:
                assert r.status < 300, await r.text()
            await asyncio.sleep(5)
            files = run(
                "podman", "unshare", "find", str(workspace), "-type", "f", "-printf", "%s %P\n"
            ).stdout.splitlines()
            sizes = sorted(((int(n), f) for n, f in (x.split(" ", 1) for x in files)), reverse=True)
            print(
                f"direct file:///usr/bin/node: workspace {grown} -> {du(workspace)} B; "
                f"largest files {sizes[:4]}"
            )
            assert sizes[0][0] <= QUOTA
            async with direct.get(container + "/global/health") as r:
                assert r.status == 200  # OpenCode got EFBIG, it was not killed
            # ... and the chat's history is still readable through the gate.
            history = await _texts(http, f"{base}/session/{oc}/message")
            assert "lovdata.no" in history and "brev.pdf" in history
    finally:
        p.stop()
        for name in names:
            run("podman", "rm", "-f", "-t", "0", name)
        run("podman", "unshare", "rm", "-rf", str(tmp_path / "lovd" / "state"))
        await caddy.stop()
        await llm.stop()
        await mcp.stop()
