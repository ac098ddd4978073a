"""packaging/install.sh in a booted machine: it created the user, ids, linger, Podman
config and image, installed and enabled the units; a second run changes nothing that
matters; the API socket admits root, lovd and lovd-api members only; Caddy reaches the
browser path's socket and not the API, also after an upgrade from an install that put it
in lovd-api; the broker's port belongs to lovd-broker.socket, also after an upgrade from
a lovd that bound it itself, and install.sh refuses a broker.listen the socket does not
listen on; lovd.service may reach addresses beyond loopback (the broker's upstreams)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import need
from tests.e2e.machine import REPO, SOCK, Machine

pytestmark = pytest.mark.systemd

AUTH_SOCK = "/run/lovd/auth.sock"
SOCKETS = ("lovd.socket", "lovd-auth.socket", "lovd-broker.socket")
BROKER = "127.0.0.1:18780"  # lovd-broker.socket's ListenStream= and broker.listen's default


def install(m: Machine, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return m.run(
        "env",
        "LOVD_SKIP_APT=1",
        "LOVD_IMAGE=test",
        "bash",
        str(REPO / "packaging/install.sh"),
        timeout=600,
        check=check,
    )


def broker_answer(m: Machine) -> str:
    """HTTP status of a credential-less call to the broker: 401 or 404 come from lovd,
    000 means nothing accepted the connection."""
    r = m.run(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30",
        f"http://{BROKER}/llm/lovd/x",
        check=False,
    )  # fmt: skip
    return r.stdout


def test_install_created_everything(machine: Machine, install_seconds: float) -> None:
    m = machine
    assert install_seconds < 300
    uid = m.uid
    assert m.out("getent", "passwd", "lovd").split(":")[5] == "/var/lib/lovd"
    for group in ("lovd-api", "lovd-web"):
        assert group in m.out("getent", "group", group)
    for f in ("/etc/subuid", "/etc/subgid"):
        line = next(ln for ln in m.out("cat", f).splitlines() if ln.startswith("lovd:"))
        assert int(line.split(":")[2]) >= 65536 * 16, line
    assert m.out("loginctl", "show-user", "lovd", "-p", "Linger", "--value") == "yes"
    assert m.out("systemctl", "is-active", f"user@{uid}.service") == "active"
    for unit in SOCKETS:
        assert m.out("systemctl", "is-enabled", unit) == "enabled", unit
        assert m.out("systemctl", "is-active", unit) == "active", unit
    assert m.systemctl_user("is-active", "podman.socket").stdout.strip() == "active"
    info = m.podman("info", "--format", "{{.Store.GraphDriverName}} {{.Host.OCIRuntime.Name}}")
    assert info.stdout.split()[0] == "overlay"
    assert m.podman("image", "exists", "localhost/lovd-test:latest", check=False).returncode == 0
    dropin = m.out("cat", "/etc/systemd/system/lovd.service.d/10-user-manager.conf")
    assert f"BindPaths=/run/user/{uid}" in dropin
    assert (
        m.run("test", "-f", "/etc/systemd/system/user@.service.d/lovd-delegate.conf").returncode
        == 0
    )
    # The state dir belongs to lovd and is closed to others.
    assert m.out("stat", "-c", "%U:%G %a", "/var/lib/lovd") == "lovd:lovd 750"


def test_install_is_idempotent(machine: Machine) -> None:
    m = machine
    conf = m.out("cat", "/etc/lovd/lovd.conf")
    subuid = m.out("cat", "/etc/subuid")
    install(m)
    assert m.out("cat", "/etc/lovd/lovd.conf") == conf  # an operator's config is kept
    assert m.out("cat", "/etc/subuid") == subuid  # no second range
    for unit in SOCKETS:
        assert m.out("systemctl", "is-active", unit) == "active", unit


def test_socket_permissions(machine: Machine) -> None:
    m = machine
    assert m.out("stat", "-c", "%F %U:%G %a", SOCK) == "socket lovd:lovd-api 660"
    assert m.out("stat", "-c", "%F %U:%G %a", AUTH_SOCK) == "socket lovd:lovd-web 660"
    # root's: systemd binds, chowns and chmods both sockets in it, so lovd must not be
    # able to swap them for links; everyone may pass through to the socket they may use.
    assert m.out("stat", "-c", "%U:%G %a", "/run/lovd") == "root:root 711"


CONNECT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "try:\n s.connect(sys.argv[1]); print('connected')\n"
    "except OSError as e:\n print(e.errno)\n"
)


def test_outsider_gets_eacces_member_connects(machine: Machine) -> None:
    m = machine
    m.sh("id outsider >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin outsider")
    m.sh("id insider >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin -G lovd-api insider")
    for sock in (SOCK, AUTH_SOCK):
        got = m.out("runuser", "-u", "outsider", "--", "python3", "-c", CONNECT, sock)
        assert got == "13", sock  # EACCES
    assert m.out("runuser", "-u", "insider", "--", "python3", "-c", CONNECT, SOCK) == "connected"
    assert m.out("runuser", "-u", "lovd", "--", "python3", "-c", CONNECT, SOCK) == "connected"


@pytest.fixture
def caddy_user(machine: Machine) -> str:
    need(
        machine.run("id", "caddy", check=False).returncode == 0,
        "no caddy user (apt-get install caddy)",
    )
    return "caddy"


def test_caddy_reaches_browser_path_not_operator_api(machine: Machine, caddy_user: str) -> None:
    m = machine
    groups = m.out("id", "-nG", caddy_user).split()
    assert "lovd-web" in groups and "lovd-api" not in groups, groups
    connect = ["runuser", "-u", caddy_user, "--", "python3", "-c", CONNECT]
    assert m.out(*connect, AUTH_SOCK) == "connected"
    assert m.out(*connect, SOCK) == "13"  # EACCES: Caddy never reaches the operator API


def test_install_takes_caddy_out_of_an_older_install(machine: Machine, caddy_user: str) -> None:
    """Earlier versions put Caddy in lovd-api, and auth.sock in lovd-api with it. An
    upgrade removes the membership and re-creates the socket in lovd-web."""
    m = machine
    old = "/run/systemd/system/lovd-auth.socket.d"
    m.run("usermod", "-aG", "lovd-api", caddy_user)
    m.run("mkdir", "-p", old)
    m.run("tee", f"{old}/50-old.conf", input="[Socket]\nSocketGroup=lovd-api\n")
    m.run("systemctl", "daemon-reload")
    m.run("systemctl", "stop", "lovd.service")
    m.run("systemctl", "restart", "lovd-auth.socket")
    assert m.out("stat", "-c", "%G", AUTH_SOCK) == "lovd-api"
    # The new units arrive; the live socket keeps its old group until it is re-created.
    m.run("rm", "-f", f"{old}/50-old.conf")
    m.run("rmdir", old)
    m.run("systemctl", "daemon-reload")
    install(m)
    groups = m.out("id", "-nG", caddy_user).split()
    assert "lovd-web" in groups and "lovd-api" not in groups, groups
    assert m.out("stat", "-c", "%F %U:%G %a", AUTH_SOCK) == "socket lovd:lovd-web 660"
    connect = ["runuser", "-u", caddy_user, "--", "python3", "-c", CONNECT]
    assert m.out(*connect, AUTH_SOCK) == "connected"
    assert m.out(*connect, SOCK) == "13"


def test_install_upgrades_a_lovd_that_bound_the_broker_port(machine: Machine) -> None:
    """Before lovd-broker.socket, lovd bound broker.listen itself: the socket can bind
    only once that lovd is stopped, and from then on systemd holds the port."""
    m = machine
    # The old install: lovd runs and listens on the broker's port itself, the socket not
    # at all (its start is skipped, so lovd.service's Wants= does not pull it in).
    skip = "/run/systemd/system/lovd-broker.socket.d"
    m.run("systemctl", "stop", "lovd.service", "lovd-broker.socket")
    m.run("mkdir", "-p", skip)
    m.run("tee", f"{skip}/50-old.conf", input="[Unit]\nConditionPathExists=/nonexistent\n")
    try:
        m.run("systemctl", "daemon-reload")
        m.run("systemctl", "start", "lovd.service")
        state = m.run("systemctl", "is-active", "lovd-broker.socket", check=False).stdout
        assert state.strip() == "inactive", state
        assert broker_answer(m) in ("401", "404")  # lovd's own listener
    finally:
        m.run("rm", "-f", f"{skip}/50-old.conf")
        m.run("rmdir", skip, check=False)
        m.run("systemctl", "daemon-reload")
    r = install(m, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert m.out("systemctl", "is-active", "lovd-broker.socket") == "active"
    # lovd gone, the port still answers: systemd accepted and started lovd again.
    m.run("systemctl", "stop", "lovd.service")
    assert broker_answer(m) in ("401", "404")
    assert m.out("systemctl", "is-active", "lovd.service") == "active"


def test_install_refuses_a_broker_listen_the_socket_does_not_serve(machine: Machine) -> None:
    """lovd tells the sockets systemd passes it apart by address: a broker.listen that
    lovd-broker.socket does not listen on would leave lovd taking the socket on
    127.0.0.1:18780 for something else. install.sh refuses, and says what to change."""
    m = machine
    conf = m.out("cat", "/etc/lovd/lovd.conf")
    m.run("tee", "/etc/lovd/lovd.conf", input=conf + '\nbroker:\n  listen: "127.0.0.1:18781"\n')
    try:
        r = install(m, check=False)
    finally:
        m.run("tee", "/etc/lovd/lovd.conf", input=conf + "\n")
    assert r.returncode != 0
    assert "lovd-broker.socket listens on '127.0.0.1:18780'" in r.stderr, r.stderr[-3000:]
    assert "broker.listen in /etc/lovd/lovd.conf is '127.0.0.1:18781'" in r.stderr
    for unit in SOCKETS:  # the running install is left as it was
        assert m.out("systemctl", "is-active", unit) == "active", unit


# Connects to PROBE_ADDR (put on lo, so no packet leaves the machine): nothing listens
# there, so "refused" means the connection was let out; EPERM means an IP firewall
# (IPAddressDeny=) dropped it.
PROBE_ADDR = "192.0.2.10"  # TEST-NET-1
PROBE = f"""import socket, sys
try:
    socket.create_connection(("{PROBE_ADDR}", 9), timeout=5)
except ConnectionRefusedError:
    print("reached")
    sys.exit(0)
except OSError as e:
    print("blocked:", e)
    sys.exit(1)
"""


@pytest.fixture
def probe(machine: Machine) -> Iterator[str]:
    m = machine
    if m.leader is None:
        pytest.skip("not adding addresses to this host's loopback")
    path = "/usr/local/lib/lovd-egress-probe.py"
    m.run("tee", path, input=PROBE)
    m.run("ip", "addr", "add", f"{PROBE_ADDR}/32", "dev", "lo")
    try:
        yield path
    finally:
        m.run("ip", "addr", "del", f"{PROBE_ADDR}/32", "dev", "lo", check=False)
        m.run("rm", "-f", path, check=False)


def test_lovd_service_may_reach_beyond_loopback(machine: Machine, probe: str) -> None:
    """The credential broker inside lovd.service dials the LLM providers and the Lovdata
    MCP server: the unit must not fence lovd to loopback."""
    m = machine
    # Control: the same probe under the old fence is blocked, so the probe tells the two
    # apart on this machine (systemd's IP firewall needs cgroup v2 BPF).
    fenced = m.run(
        "systemd-run",
        "--wait",
        "--pipe",
        "--quiet",
        "-p",
        "IPAddressDeny=any",
        "-p",
        "IPAddressAllow=localhost",
        "python3",
        probe,
        check=False,
    )
    need(fenced.returncode == 1, f"systemd's IP firewall does not work here: {fenced.stdout}")
    dropin = "/run/systemd/system/lovd.service.d/50-egress-probe.conf"
    m.run("mkdir", "-p", "/run/systemd/system/lovd.service.d")
    m.run("tee", dropin, input=f"[Service]\nExecStartPre=/usr/bin/python3 {probe}\n")
    try:
        m.run("systemctl", "daemon-reload")
        r = m.run("systemctl", "restart", "lovd.service", check=False)
        out = m.out("journalctl", "-u", "lovd.service", "-n", "50", "--no-pager", "-o", "cat")
        assert r.returncode == 0 and "reached" in out, out[-2000:]
    finally:
        m.run("rm", "-f", dropin)
        m.run("systemctl", "daemon-reload")
        m.run("systemctl", "reset-failed", "lovd.service", check=False)
        m.run("systemctl", "restart", "lovd.service")
