"""Session egress against real rootless Podman: the attack, tried from inside a session.

A real lovd (podman runner) starts real sessions; from inside session A we connect to
the broker, to other TCP listeners on the host's loopback and to session B's published
port. Traffic goes only to the host's loopback (10.0.2.2 inside = 127.0.0.1 outside) and to
other sessions; for any other destination the test reads the live rule set instead.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lovd import config as config_mod
from lovd import egress
from lovd.errors import LovdError
from lovd.podman import ContainerSpec, PodmanCLI
from lovd.runner import PodmanRunner
from tests.conftest import need
from tests.lovdproc import LovdProc, containers, podman

pytestmark = pytest.mark.podman

GATEWAY = "10.0.2.2"  # the host's loopback, seen from a session (slirp4netns)


class Banner:
    """A TCP listener on the host's loopback that greets every connection with a token
    and counts them: a connection that got through cannot be mistaken for one that
    did not."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.token = f"lovd-egress-probe-{self.port}"
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(f"{self.token}\n".encode())

    def close(self) -> None:
        self.sock.close()


class UdpSink:
    """A UDP socket on the host's loopback that counts the datagrams it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                self.sock.recvfrom(2048)
            except OSError:
                return
            self.received += 1


@pytest.fixture
def udp_sink() -> Iterator[UdpSink]:
    sink = UdpSink()
    yield sink
    sink.sock.close()


def udp_from(session_id: str, port: int) -> tuple[int, str]:
    """UDP from inside the session to the host's loopback: busybox tftp sends a read
    request (and retries until `timeout` ends it; the sink never answers)."""
    r = subprocess.run(
        ["podman", "exec", f"lovd-{session_id}", "busybox", "timeout", "2",
         "busybox", "tftp", "-g", "-r", "lovd-egress-probe", "-l", "/tmp/lovd-egress-probe",
         GATEWAY, str(port)],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    time.sleep(0.3)  # slirp4netns forwards asynchronously
    return r.returncode, r.stderr


@pytest.fixture
def banners() -> Iterator[list[Banner]]:
    made = [Banner() for _ in range(2)]
    yield made
    for b in made:
        b.close()


def connect_from(session_id: str, port: int, send: bytes = b"") -> tuple[int, str]:
    """TCP from inside the session's container to the host's loopback (busybox nc, as the
    session's own user): exit code and what came back. stdin stays open until nc exits:
    on stdin's EOF nc half-closes the connection, and a server may then drop the request
    unanswered."""
    proc = subprocess.Popen(
        ["podman", "exec", "-i", f"lovd-{session_id}",
         "busybox", "nc", "-w", "3", GATEWAY, str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    killer = threading.Timer(30, proc.kill)
    killer.start()
    try:
        proc.stdin.write(send)
        proc.stdin.flush()
        out = proc.stdout.read()  # until nc exits: the server closed, or no connection
    finally:
        killer.cancel()
        proc.stdin.close()
    return proc.wait(), out.decode(errors="replace")


def live_rules(session_id: str) -> str:
    pid = podman("inspect", "--format", "{{.State.Pid}}", f"lovd-{session_id}").strip()
    nft = egress.nft_path()
    assert nft is not None
    r = subprocess.run(
        ["podman", "unshare", "nsenter", "--target", pid, "--net", nft, "list", "ruleset"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return r.stdout


def expected_listing(conf: config_mod.Config) -> list[str]:
    """What `nft list ruleset` prints for lovd's rules: the rendered file minus its
    comments and the flush."""
    body = egress.render_rules(conf).split("flush ruleset\n", 1)[1]
    return [line.strip() for line in body.splitlines()]


def http_status(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def doctor(p: LovdProc) -> dict[str, dict[str, str]]:
    r = p.cli("doctor", "--json")
    return {c["name"]: c for c in json.loads(r.stdout)}


@pytest.fixture(scope="module")
def nft() -> str:
    path = egress.nft_path()
    need(path is not None, "nft is not installed (apt-get install nftables)")
    assert path is not None
    return path


def cleanup(p: LovdProc) -> None:
    p.stop()
    if (p.tmp / "state" / "lovd.db").exists():
        for name in containers(f"lovd.instance={p.instance_id()}"):
            podman("rm", "-f", "-t", "0", name, check=False)
    subprocess.run(["podman", "unshare", "rm", "-rf", str(p.tmp / "state")], check=False)


def assert_only_broker(
    p: LovdProc, a: dict[str, Any], b: dict[str, Any], allowed: Banner, denied: Banner
) -> None:
    conf = config_mod.load(str(p.config_path))
    # The broker answers (lovd's own, on broker.listen).
    code, out = connect_from(a["id"], conf.broker_port, b"GET / HTTP/1.0\r\n\r\n")
    assert code == 0 and out.startswith("HTTP/1."), (code, out)
    # An egress.allow entry on the host's loopback: reachable. (Also shows the probe
    # would see a connection that got through.)
    before = allowed.accepted
    code, out = connect_from(a["id"], allowed.port)
    assert code == 0 and allowed.token in out, (code, out)
    assert allowed.accepted == before + 1
    # Any other service on the host's loopback: refused before it leaves the container.
    code, out = connect_from(a["id"], denied.port)
    assert code != 0 and denied.token not in out, (code, out)
    assert denied.accepted == 0
    # Another session's published port, and this session's own: refused as well...
    for target in (b, a):
        code, out = connect_from(a["id"], target["port"], b"GET / HTTP/1.0\r\n\r\n")
        assert code != 0 and "HTTP/" not in out, (target["id"], code, out)
        # ...while the host still reaches both (inbound goes through `ct state established`).
        assert http_status(target["port"]) == 401
    # And the rule set in A's network namespace is exactly lovd's.
    listing = live_rules(a["id"])
    print(f"live rule set of session {a['id']}:\n{listing}")
    assert [line.strip() for line in listing.splitlines()] == expected_listing(conf)
    assert "policy drop;" in listing


def test_a_session_reaches_the_broker_and_nothing_else(
    tmp_path: Path, test_image: str, nft: str, banners: list[Banner], udp_sink: UdpSink
) -> None:
    allowed, denied = banners
    p = LovdProc(tmp_path, limits={"max_running": 4},
                 egress={"allow": [f"{GATEWAY}:{allowed.port}"]})  # fmt: skip
    try:
        p.start()
        created = []
        for _ in range(2):
            status, _, s = p.api("POST", "/api/sessions")
            assert status == 201, s
            created.append(s)
        a, b = created
        assert_only_broker(p, a, b, allowed, denied)
        # Not over UDP either (DNS included: nothing but the broker, by address).
        code, err = udp_from(a["id"], udp_sink.port)
        assert code != 0 and "Operation not permitted" in err, (code, err)
        assert udp_sink.received == 0
        checks = doctor(p)
        assert checks["egress"]["status"] == "ok", checks["egress"]
        assert "in force" in checks["egress"]["detail"]
        live = checks["egress-live"]
        assert live["detail"] == "rules present in all 2 running session containers", live

        # The rules live in the containers' namespaces: a crashed and restarted lovd
        # re-adopts the same containers, and they are still fenced in.
        p.kill9()
        p.start()
        _, _, listed = p.api("GET", "/api/sessions")
        assert {s["id"]: s["container_id"] for s in listed["sessions"]} == {
            s["id"]: s["container_id"] for s in created
        }
        assert_only_broker(p, a, b, allowed, denied)
        # And B is fenced in just the same.
        code, out = connect_from(b["id"], denied.port)
        assert code != 0 and denied.token not in out
        code, out = connect_from(b["id"], a["port"], b"GET / HTTP/1.0\r\n\r\n")
        assert code != 0 and "HTTP/" not in out

        # doctor names a session container that runs without the rules.
        rogue = f"lovd-egress-rogue-{p.instance_id()}"
        podman(
            "run",
            "-d",
            "--rm",
            "--name",
            rogue,
            "--label",
            "lovd.session=ffffffffffffffff",
            "--label",
            f"lovd.instance={p.instance_id()}",
            test_image,
        )
        try:
            live = doctor(p)["egress-live"]
            assert live["status"] == "fail" and rogue in live["detail"], live
        finally:
            podman("rm", "-f", "-t", "0", rogue, check=False)
    finally:
        cleanup(p)


def test_demo_mode_is_fenced_in_too(
    tmp_path: Path, test_image: str, nft: str, banners: list[Banner]
) -> None:
    p = LovdProc(tmp_path, demo="on", demo_mcp_port=0, demo_llm_port=0)
    try:
        p.start()
        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201, s
        line = next(ln for ln in p.log_path.read_text().splitlines()
                    if "demo mode: Lovdata MCP stand-in on port" in ln)  # fmt: skip
        words = line.replace(",", " ").split()
        mcp_port = int(words[words.index("stand-in") + 3])
        llm_port = int(words[words.index("LLM") + 3])
        conf = config_mod.load(str(p.config_path))
        code, out = connect_from(s["id"], conf.broker_port, b"GET / HTTP/1.0\r\n\r\n")
        assert code == 0 and out.startswith("HTTP/1."), (code, out)
        # The stand-ins answer on the host's loopback, but only the broker may call them.
        for port in (mcp_port, llm_port):
            assert http_status(port) > 0
            code, out = connect_from(s["id"], port, b"GET / HTTP/1.0\r\n\r\n")
            assert code != 0 and "HTTP/" not in out, (port, code, out)
        assert [ln.strip() for ln in live_rules(s["id"]).splitlines()] == expected_listing(conf)
    finally:
        cleanup(p)


def test_without_enforcement_the_same_probe_gets_through(
    tmp_path: Path, test_image: str, banners: list[Banner], udp_sink: UdpSink
) -> None:
    """The control: egress.enforce false puts no rules in, and the probe that was refused
    above reaches the host's loopback service — and doctor says so."""
    _, denied = banners
    p = LovdProc(tmp_path, egress={"enforce": False})
    try:
        p.start()
        status, _, s = p.api("POST", "/api/sessions")
        assert status == 201, s
        assert "egress.enforce is false" in p.log_path.read_text()
        assert not list((tmp_path / "run").glob("egress*"))
        if egress.nft_path():  # no lovd table in its network namespace
            assert egress.TABLE not in live_rules(s["id"])
        code, out = connect_from(s["id"], denied.port)
        assert code == 0 and denied.token in out and denied.accepted == 1
        udp_from(s["id"], udp_sink.port)
        assert udp_sink.received >= 1
        check = doctor(p)["egress"]
        assert check["status"] == "warn" and "NOT in force" in check["detail"]
    finally:
        cleanup(p)


def test_the_container_does_not_start_when_the_rules_cannot_be_loaded(
    tmp_path: Path, test_image: str
) -> None:
    """Fail closed: the hook finds no nft (its search path is empty here), so the runtime
    refuses to start the container, and the start error says what to do."""
    conf = config_mod.from_mapping({"runtime_dir": str(tmp_path / "run")})
    no_tools = tmp_path / "empty-path"
    no_tools.mkdir()
    hooks = egress.install(conf, search_path=str(no_tools))
    assert hooks is not None
    secret = tmp_path / "secret.env"
    secret.write_text("X=1\n")
    workspace = tmp_path / "work"
    workspace.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    iid = f"egress-test-{port}"
    spec = ContainerSpec(
        session_id="00000000000e9e55",
        instance_id=iid,
        image=test_image,
        host_port=port,
        container_port=4096,
        workspace=workspace,
        secret_file=secret,
        extra_args=["--network", conf.session_network],
        hooks_dir=hooks,
    )
    runner = PodmanRunner(PodmanCLI("podman"), "podman", iid)
    t0 = time.monotonic()
    try:
        with pytest.raises(LovdError) as e:
            asyncio.run(runner.start(spec))
        assert e.value.code == "runner-failed"
        assert "lovd-egress: nft not found: install nftables" in e.value.message, e.value.message
        assert containers(f"lovd.instance={iid}") == {}
        assert time.monotonic() - t0 < 30
    finally:
        for name in containers(f"lovd.instance={iid}"):
            podman("rm", "-f", "-t", "0", name, check=False)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        subprocess.run(["podman", "unshare", "rm", "-rf", str(workspace)], check=False)
