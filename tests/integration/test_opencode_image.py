"""The real OpenCode session image against the demo stand-ins, with real rootless Podman.

Runs the container the way lovd does (secret file, --read-only, --cap-drop=all,
--userns=auto, --init) and drives OpenCode's HTTP API: a Norwegian legal question must
make the stub model call a Lovdata tool on the MCP stand-in and come back with the
lovdata.no URL of the provision it cites.

Build the image first: packaging/images/opencode/build.sh (as the user running the tests).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lovd.demo.serve import StandIn, serve_llm_stub, serve_lovdata_mcp
from tests.conftest import ROOT, image_present, need
from tests.lovdproc import LovdProc
from tests.waiting import until

pytestmark = [pytest.mark.opencode, pytest.mark.podman]

SESSION_IMAGE = os.environ.get("LOVD_SESSION_IMAGE", "localhost/lovd-session:latest")
QUESTION = "Hva sier arbeidsmiljøloven om oppsigelse?"
AML_URL = re.compile(r"https://lovdata\.no/lov/2005-06-17-62/§15-\d+")
# These tests run the image on Podman's default network, where containers reach the host
# as host.containers.internal (the host's own IP, not its loopback), so the stand-ins
# bind every address. lovd's demo mode does it differently (test_demo_mode_through_lovd).
STANDIN_HOST = "0.0.0.0"


@dataclass
class Session:
    name: str
    port: int
    password: str
    mcp: StandIn
    ready_seconds: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return basic_auth(self.password)


def basic_auth(password: str) -> dict[str, str]:
    token = base64.b64encode(f"opencode:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), input=input_text, capture_output=True, text=True, check=False, timeout=120
    )


@pytest.fixture(scope="module")
def session_image() -> str:
    if os.geteuid() == 0:
        need(False, "rootless Podman tests run as the unprivileged lovd user, not root")
    need(
        image_present(SESSION_IMAGE),
        f"{SESSION_IMAGE} missing: run packaging/images/opencode/build.sh as this user",
    )
    return SESSION_IMAGE


@pytest.fixture
def secret_file(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    path = tmp_path / "lovd.env"
    yield path, {}
    path.unlink(missing_ok=True)


def write_env(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    path.chmod(0o600)


def container_settings(name: str) -> dict[str, str]:
    """What lovd gave a session container (/run/secrets/lovd.env, read from inside)."""
    env = run("podman", "exec", name, "cat", "/run/secrets/lovd.env").stdout
    return dict(line.split("=", 1) for line in env.splitlines())


async def wait_ready(url: str, auth: dict[str, str], deadline: float) -> None:
    # OpenCode can hang a request made just after its port opens: short timeouts, retry.
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def healthy() -> bool:
            try:
                async with http.get(url + "/global/health", headers=auth) as resp:
                    return resp.status == 200 and bool((await resp.json()).get("healthy"))
            except (aiohttp.ClientError, TimeoutError):
                return False

        await until(healthy, deadline - time.monotonic(), f"{url} ready", step=0.05)


@pytest.fixture
async def session(session_image: str, tmp_path: Path) -> AsyncIterator[Session]:
    mcp_token = secrets.token_urlsafe(16)
    mcp = await serve_lovdata_mcp(STANDIN_HOST, 0, token=mcp_token)
    llm = await serve_llm_stub(STANDIN_HOST, 0)
    name = f"lovd-it-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(32)
    env_file = tmp_path / "lovd.env"
    write_env(
        env_file,
        {
            "OPENCODE_SERVER_PASSWORD": password,
            "LOVD_SESSION_ID": name,
            "LOVDATA_MCP_URL": f"http://host.containers.internal:{mcp.port}/mcp",
            "LOVDATA_MCP_TOKEN": mcp_token,
            "LOVD_SEQUENTIAL_THINKING": "1",
            "LOVD_MODEL": "lovd/legal-stub",
            "LOVD_LLM_BASE_URL": f"http://host.containers.internal:{llm.port}/v1",
            "LOVD_LLM_API_KEY": "demo",
            "OPENAI_API_KEY": "",
            "ANTHROPIC_API_KEY": "",
            "GOOGLE_GENERATIVE_AI_API_KEY": "",
            "LOVD_PERMISSIONS_DENY": "bash,edit,webfetch",
        },
    )
    created = run("podman", "secret", "create", name, str(env_file))
    env_file.unlink()
    assert created.returncode == 0, created.stderr
    workspace = tmp_path / "ws"
    workspace.mkdir()
    port = free_port()
    started = time.monotonic()
    try:
        result = run(
            "podman", "run", "-d", "--rm", "--name", name, "--init", "--userns=auto",
            "--cap-drop=all", "--security-opt=no-new-privileges", "--read-only",
            "--tmpfs", "/tmp", "--tmpfs", "/run/secrets",
            "--secret", f"{name},type=mount,target=/run/secrets/lovd.env,mode=0400,uid=1000",
            "-v", f"{workspace}:/work:U", "-p", f"127.0.0.1:{port}:4096",
            "--label", f"lovd.session={name}", session_image,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        auth = basic_auth(password)
        try:
            await wait_ready(f"http://127.0.0.1:{port}", auth, time.monotonic() + 30)
        except AssertionError:  # tests/waiting.py: not ready in time
            logs = run("podman", "logs", name)
            pytest.fail(f"OpenCode did not become ready:\n{logs.stdout}\n{logs.stderr}")
        ready = time.monotonic() - started
        yield Session(name, port, password, mcp, ready)
    finally:
        run("podman", "rm", "-f", "-t", "0", name)
        run("podman", "secret", "rm", name)
        await llm.stop()
        await mcp.stop()


async def test_legal_question_round_trip(session: Session) -> None:
    print(f"create→ready {session.ready_seconds:.2f} s")
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(timeout=timeout, headers=session.auth) as http:
        async with http.get(session.url + "/mcp") as resp:
            status = await resp.json()
        assert status["lovdata"]["status"] == "connected", status
        assert status["sequential-thinking"]["status"] == "connected", status

        async with http.get(session.url + "/skill") as resp:
            skills = await resp.json()
        assert "norwegian-legal-queries" in {s["name"] for s in skills}

        async with http.post(session.url + "/session", json={}) as resp:
            assert resp.status == 200
            sid = (await resp.json())["id"]
        body = {"parts": [{"type": "text", "text": QUESTION}]}
        async with http.post(f"{session.url}/session/{sid}/message", json=body) as resp:
            assert resp.status == 200
            reply = await resp.json()

        async with http.get(session.mcp.base_url.replace("0.0.0.0", "127.0.0.1") + "/calls") as r:
            calls = await r.json()
    tools = [c["tool"] for c in calls]
    assert "search_provisions_fulltext" in tools, calls
    text = "\n".join(p.get("text", "") for p in reply["parts"] if p["type"] == "text")
    cited = AML_URL.findall(text)
    assert cited, text
    assert "https://lovdata.no/lov/2005-06-17-62/§15-7" in cited


async def test_secrets_stay_out_of_argv_and_inspect(session: Session) -> None:
    inspect = run("podman", "inspect", session.name)
    assert inspect.returncode == 0, inspect.stderr
    assert session.password not in inspect.stdout
    top = run("podman", "top", session.name, "args")
    assert "opencode serve" in top.stdout
    assert session.password not in top.stdout
    config = json.loads(inspect.stdout)[0]["Config"]
    assert config["User"] == "1000:1000"


async def test_denied_tools_and_unprivileged_user(session: Session) -> None:
    out = run("podman", "exec", session.name, "sh", "-c", "id -u; cat /proc/1/status")
    assert out.stdout.splitlines()[0] == "1000"
    assert re.search(r"^CapEff:\s+0+$", out.stdout, re.M), out.stdout
    async with (
        aiohttp.ClientSession(headers=session.auth) as http,
        http.get(session.url + "/config") as resp,
    ):
        cfg = await resp.json()
    assert cfg["permission"]["bash"] == "deny"
    assert cfg["permission"]["edit"] == "deny"
    assert cfg["permission"]["webfetch"] == "deny"
    async with aiohttp.ClientSession() as http, http.get(session.url + "/global/health") as resp:
        assert resp.status == 401  # no password, no access


async def test_stop_is_fast(session: Session) -> None:
    started = time.monotonic()
    result = run("podman", "stop", "-t", "10", session.name)
    elapsed = time.monotonic() - started
    print(f"stop {elapsed:.2f} s")
    assert result.returncode == 0, result.stderr
    assert elapsed < 2.0


def _keys(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return set()
    out: set[str] = set()
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        out.add(path)
        out |= _keys(value, path)
    return out


def test_every_config_key_is_understood_by_opencode(session_image: str, tmp_path: Path) -> None:
    # OpenCode drops keys it does not know without an error; compare what it resolved
    # with the template, key by key.
    raw = (ROOT / "config_opencode" / "opencode.jsonc").read_text(encoding="utf-8")
    template = json.loads(
        "\n".join(line for line in raw.splitlines() if not line.lstrip().startswith("//"))
    )
    result = run(
        "podman", "run", "--rm", "--read-only", "--cap-drop=all",
        "-e", "LOVDATA_MCP_URL=http://127.0.0.1:9/mcp", "-e", "LOVD_MODEL=lovd/legal-stub",
        session_image, "opencode", "debug", "config",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    missing = _keys(template) - _keys(resolved)
    assert not missing, f"keys OpenCode ignored: {sorted(missing)}"
    assert resolved["model"] == "lovd/legal-stub"


async def test_demo_mode_through_lovd(session_image: str, tmp_path: Path) -> None:
    """lovd's own demo wiring: stand-ins on the host's loopback only, behind the broker;
    the session reaches the broker (only) at 10.0.2.2 and the chat works through it."""
    p = LovdProc(tmp_path, image=session_image, demo="on", demo_mcp_port=0, demo_llm_port=0)
    p.start()
    name = ""
    try:
        found = re.search(r"Lovdata MCP stand-in on port (\d+)", p.log_path.read_text())
        assert found, p.log_path.read_text()
        mcp_port = int(found.group(1))
        listening = run("ss", "-Hltn", f"sport = :{mcp_port}").stdout.split()
        assert f"127.0.0.1:{mcp_port}" in listening, listening  # not on the network

        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201 and s["status"] == "running", s
        name = f"lovd-{s['id']}"
        inspect = json.loads(run("podman", "inspect", name).stdout)[0]
        assert inspect["HostConfig"]["NetworkMode"].startswith("slirp4netns"), inspect["HostConfig"]
        settings = container_settings(name)
        broker_port = yaml.safe_load(p.config_path.read_text())["broker"]["listen"].split(":")[1]
        assert settings["LOVDATA_MCP_URL"] == f"http://10.0.2.2:{broker_port}/mcp/lovdata"
        assert settings["LOVDATA_MCP_TOKEN"].startswith(s["id"] + ".")  # its broker credential
        url = f"http://127.0.0.1:{s['port']}"
        auth = basic_auth(settings["OPENCODE_SERVER_PASSWORD"])
        timeout = aiohttp.ClientTimeout(total=90)
        async with aiohttp.ClientSession(timeout=timeout, headers=auth) as http:
            async with http.get(url + "/mcp") as resp:
                mcp_status = await resp.json()
            assert mcp_status["lovdata"]["status"] == "connected", mcp_status
            async with http.post(url + "/session", json={}) as resp:
                oc_session = (await resp.json())["id"]
            body = {"parts": [{"type": "text", "text": QUESTION}]}
            async with http.post(f"{url}/session/{oc_session}/message", json=body) as resp:
                assert resp.status == 200
                reply = await resp.json()
            # What lovd's idle policy reads (Launcher.busy): chat id -> {"type": ...}.
            async with http.get(url + "/session/status") as resp:
                status_map = await resp.json()
            assert isinstance(status_map, dict), status_map
            assert all(v.get("type") in ("idle", "busy", "retry") for v in status_map.values())
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{mcp_port}/calls") as resp,
        ):
            calls = await resp.json()
        assert "search_provisions_fulltext" in [c["tool"] for c in calls], calls
        text = "\n".join(part.get("text", "") for part in reply["parts"] if part["type"] == "text")
        assert AML_URL.findall(text), text
        status, _, shown = p.api("GET", f"/api/sessions/{s['id']}")
        usage = shown["usage"]
        assert usage["llm_requests"] >= 2 and usage["mcp_requests"] >= 1, usage
        assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0, usage
    finally:
        p.stop()
        if name:
            run("podman", "rm", "-f", "-t", "0", name)
        run("podman", "unshare", "rm", "-rf", str(tmp_path / "state"))


async def test_token_cap_shows_its_message_in_the_chat(session_image: str, tmp_path: Path) -> None:
    """The broker's refusal (llm.max_tokens_per_session) reaches the person as a message
    in the real OpenCode chat, not as a hang or a generic failure."""
    p = LovdProc(
        tmp_path,
        image=session_image,
        demo="on",
        demo_mcp_port=0,
        demo_llm_port=0,
        llm={"max_tokens_per_session": 1},
    )
    p.start()
    name = ""
    try:
        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201 and s["status"] == "running", s
        name = f"lovd-{s['id']}"
        settings = container_settings(name)
        url = f"http://127.0.0.1:{s['port']}"
        auth = basic_auth(settings["OPENCODE_SERVER_PASSWORD"])
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=90), headers=auth
        ) as http:
            async with http.post(url + "/session", json={}) as resp:
                oc_session = (await resp.json())["id"]
            body = {"parts": [{"type": "text", "text": QUESTION}]}
            # Every call reserves its output bound and input estimate before it goes:
            # with a cap of 1 token the first one is refused already.
            async with http.post(f"{url}/session/{oc_session}/message", json=body) as resp:
                assert resp.status == 200
                reply = await resp.json()
        shown = json.dumps(reply, ensure_ascii=False)
        assert "Start en ny økt" in shown, shown[:2000]
        _, _, after = p.api("GET", f"/api/sessions/{s['id']}")
        assert after["usage"]["refused"] >= 1 and after["usage"]["input_tokens"] == 0
    finally:
        p.stop()
        if name:
            run("podman", "rm", "-f", "-t", "0", name)
        run("podman", "unshare", "rm", "-rf", str(tmp_path / "state"))


async def test_a_removed_container_keeps_the_chat(session_image: str, tmp_path: Path) -> None:
    """What an OOM kill or a reboot does (podman rm -f): the session stays through cleanup
    passes, the browser's next request wakes it, and OpenCode lists the chat made before."""
    from tests.lovdproc import cookie_of, forward_auth

    p = LovdProc(
        tmp_path,
        image=session_image,
        demo="on",
        demo_mcp_port=0,
        demo_llm_port=0,
        health={"interval": 1.0},
    )
    p.start()
    name = ""
    try:
        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201 and s["status"] == "running", s
        name = f"lovd-{s['id']}"
        cookie = cookie_of(p, s)  # the browser that opened the session's link

        async def chats() -> list[dict[str, Any]]:
            password = container_settings(name)["OPENCODE_SERVER_PASSWORD"]
            url = f"http://127.0.0.1:{s['port']}"
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=30), headers=basic_auth(password)
                ) as http,
                http.get(url + "/session") as resp,
            ):
                return list(await resp.json())

        password = container_settings(name)["OPENCODE_SERVER_PASSWORD"]
        async with (
            aiohttp.ClientSession(headers=basic_auth(password)) as http,
            http.post(
                f"http://127.0.0.1:{s['port']}/session", json={"title": "Oppsigelse"}
            ) as resp,
        ):
            chat = (await resp.json())["id"]
        run("podman", "rm", "-f", "-t", "0", name)
        for _ in range(100):
            if p.api("GET", f"/api/sessions/{s['id']}")[2]["status"] != "running":
                break
            await asyncio.sleep(0.2)
        gone = p.api("GET", f"/api/sessions/{s['id']}")[2]
        assert gone["status"] in ("stopped", "failed") and gone["reason"], gone
        for _ in range(3):
            assert s["id"] not in p.api("POST", "/api/cleanup")[2]["removed"]
        status, _, _ = await asyncio.to_thread(forward_auth, p, s["id"], cookie)
        assert status == 204  # held while it woke, then allowed
        listed = await chats()
        assert chat in [c["id"] for c in listed], listed  # the chat history came back
    finally:
        p.stop()
        if name:
            run("podman", "rm", "-f", "-t", "0", name)
        run("podman", "unshare", "rm", "-rf", str(tmp_path / "state"))
