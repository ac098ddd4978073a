"""Session egress: the rule set lovd renders, the hook files, the argv, and the hook's own
shell logic (run for real by /bin/sh, with stand-in nsenter/nft at the process boundary).
The rules loaded into real network namespaces are tested in tests/integration/test_egress.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lovd import config, doctor, egress
from lovd.errors import LovdError
from lovd.podman import ContainerSpec, run_argv
from tests.unit.conftest import open_api


def cfg(tmp_path: Path, **settings: Any) -> config.Config:
    return config.from_mapping({"runtime_dir": str(tmp_path / "run"), **settings})


def unchecked(tmp_path: Path, **attrs: Any) -> config.Config:
    """A config with values load refuses: egress.py checks them again on its own."""
    return dataclasses.replace(cfg(tmp_path), **attrs)


def test_default_rules_allow_the_broker_only(tmp_path: Path) -> None:
    assert egress.render_rules(cfg(tmp_path)) == (
        "# lovd session egress rules (generated from lovd.conf; see lovd/egress.py).\n"
        "# The namespace is the container's own and new: nothing in it but these rules.\n"
        "# (flush, not create-then-delete of the table: deleting a table costs ~12 ms.)\n"
        "flush ruleset\n"
        "table inet lovd_egress {\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy drop;\n"
        '\t\toif "lo" accept\n'
        "\t\tct state established,related accept\n"
        "\t\tip daddr 10.0.2.2 tcp dport 18780 accept\n"
        "\t\tmeta l4proto tcp reject with tcp reset\n"
        "\t\treject with icmpx admin-prohibited\n"
        "\t}\n"
        "}\n"
    )


def rule_lines(c: config.Config) -> list[str]:
    text = egress.render_rules(c)
    body = text.split("policy drop;\n", 1)[1].split("\t}", 1)[0]
    return [line.strip() for line in body.splitlines()]


def test_rules_follow_the_config(tmp_path: Path) -> None:
    c = cfg(
        tmp_path,
        broker={"listen": "127.0.0.1:19999"},
        egress={
            "allow": [
                "10.0.2.2:18782",
                "192.0.2.0/24",
                "198.51.100.7",
                "203.0.113.0/28:8443",
                "[2001:db8::1]:443",
                "2001:db8:1::/48",
                " 2001:db8::2 ",
            ]
        },
    )
    assert rule_lines(c) == [
        'oif "lo" accept',
        "ct state established,related accept",
        "ip daddr 10.0.2.2 tcp dport 19999 accept",
        "ip daddr 10.0.2.2 meta l4proto { tcp, udp } th dport 18782 accept",
        "ip daddr 192.0.2.0/24 accept",
        "ip daddr 198.51.100.7 accept",
        "ip daddr 203.0.113.0/28 meta l4proto { tcp, udp } th dport 8443 accept",
        "ip6 daddr 2001:db8::1 meta l4proto { tcp, udp } th dport 443 accept",
        "ip6 daddr 2001:db8:1::/48 accept",
        "ip6 daddr 2001:db8::2 accept",
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx admin-prohibited",
    ]


def test_ipv6_gateway(tmp_path: Path) -> None:
    c = cfg(tmp_path, host_gateway="fd00::2")
    assert "ip6 daddr fd00::2 tcp dport 18780 accept" in rule_lines(c)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("mirror.example.com:443", "host names are not resolved"),
        ("mirror.example.com", "host names are not resolved"),
        ("10.0.0.1:0", "port must be 1-65535"),
        ("10.0.0.1:70000", "port must be 1-65535"),
        ("10.0.0.1:http", "port must be 1-65535"),
        ("10.1.2.3/16", "host bits set (meant 10.1.0.0/16?)"),
        ("[2001:db8::1", "expected [IPV6]:PORT"),
        ("[2001:db8::1]443", "expected [IPV6]:PORT"),
        ("", "is not ADDRESS:PORT"),
        ("10.0.0.1; flush ruleset", "is not ADDRESS:PORT"),  # nothing reaches nft unparsed
    ],
)
def test_bad_allow_entries_name_the_key(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as refused:  # at load: lovd does not start
        cfg(tmp_path, egress={"allow": [entry]})
    assert str(refused.value).startswith("egress.allow: ") and message in str(refused.value)
    with pytest.raises(egress.EgressError) as e:
        egress.render_rules(unchecked(tmp_path, egress_allow=[entry]))
    assert str(e.value).startswith("egress.allow: ") and message in str(e.value)


def test_bad_gateway(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"host_gateway: 'host\.containers\.internal'"):
        cfg(tmp_path, host_gateway="host.containers.internal")
    with pytest.raises(egress.EgressError, match=r"host_gateway: 'host\.containers\.internal'"):
        egress.render_rules(unchecked(tmp_path, host_gateway="host.containers.internal"))


def test_install_writes_hook_script_and_rules(tmp_path: Path) -> None:
    c = cfg(tmp_path, egress={"allow": ["192.0.2.1:80"]})
    hooks = egress.install(c)
    d = tmp_path / "run" / "egress-18780"
    assert hooks == d / "hooks.d"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(hooks.stat().st_mode) == 0o700
    assert sorted(p.name for p in hooks.iterdir()) == ["lovd-egress.json"]  # no temp files
    assert (d / "rules.nft").read_text() == egress.render_rules(c)
    assert (d / "hook.sh").read_text() == egress.HOOK_SCRIPT
    hook = json.loads((hooks / "lovd-egress.json").read_text())
    assert hook == {
        "version": "1.0.0",
        "hook": {
            "path": "/bin/sh",
            "args": ["sh", str(d / "hook.sh"), str(d / "rules.nft")],
            "env": [f"PATH={egress.HOOK_SEARCH_PATH}"],
            "timeout": 10,
        },
        "when": {"always": True},
        "stages": ["createRuntime"],
    }


def test_enforce_off_removes_the_hook(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    egress.install(cfg(tmp_path))
    off = cfg(tmp_path, egress={"enforce": False})
    assert egress.install(off) is None
    assert not (tmp_path / "run" / "egress-18780").exists()
    assert "egress.enforce is false" in caplog.text
    assert egress.ensure(off) is None


def test_ensure_restores_a_deleted_hook(tmp_path: Path) -> None:
    # Podman runs a container without complaint when --hooks-dir does not exist.
    c = cfg(tmp_path)
    hooks = egress.install(c)
    assert hooks is not None
    (hooks / "lovd-egress.json").unlink()
    (tmp_path / "run" / "egress-18780" / "rules.nft").write_text("flush ruleset\n")
    assert egress.ensure(c) == hooks
    assert (hooks / "lovd-egress.json").is_file()
    assert (tmp_path / "run" / "egress-18780" / "rules.nft").read_text() == egress.render_rules(c)


def test_ensure_failure_is_a_start_error(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(LovdError) as e:
        egress.ensure(cfg(tmp_path))
    assert e.value.code == "runner-failed" and "egress" in e.value.message


def spec(tmp_path: Path, hooks_dir: Path | None) -> ContainerSpec:
    return ContainerSpec(
        session_id="0123456789abcdef",
        instance_id="i",
        image="img",
        host_port=20000,
        container_port=4096,
        workspace=tmp_path,
        hooks_dir=hooks_dir,
    )


def test_hooks_dir_is_a_global_flag_before_run(tmp_path: Path) -> None:
    argv = run_argv("podman", spec(tmp_path, tmp_path / "hooks.d"))
    assert argv[:4] == ["podman", "--hooks-dir", str(tmp_path / "hooks.d"), "run"]
    argv = run_argv("podman", spec(tmp_path, None))
    assert argv[1] == "run" and "--hooks-dir" not in argv


async def test_sessions_start_with_the_hook(tmp_path: Path, free_ports: list[int]) -> None:
    ports = free_ports
    async with open_api(tmp_path, ports, runtime_dir=str(tmp_path / "run")) as api:
        r = await api.client.post("/api/sessions")
        assert r.status == 201
        assert api.runner.starts[-1].hooks_dir == tmp_path / "run" / "egress-18780" / "hooks.d"
        assert (tmp_path / "run" / "egress-18780" / "hooks.d" / "lovd-egress.json").is_file()
    async with open_api(
        tmp_path / "off", ports, runtime_dir=str(tmp_path / "run2"), egress={"enforce": False}
    ) as api:
        r = await api.client.post("/api/sessions")
        assert r.status == 201
        assert api.runner.starts[-1].hooks_dir is None


# --- the hook script itself -------------------------------------------------------------

STUB = """#!/bin/sh
printf '%s\\n' "$0 $*" >> "$STUB_LOG"
[ -z "${STUB_FAIL:-}" ] || { printf 'line one\\nline two\\n' >&2; exit 1; }
"""


def run_hook(
    tmp_path: Path, state: str, *, tools: tuple[str, ...] = ("nsenter", "nft"), **env: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        (bin_dir / tool).write_text(STUB)
        (bin_dir / tool).chmod(0o755)
    tr = shutil.which("tr")  # the hook's one other tool, only on its error path
    assert tr is not None
    (bin_dir / "tr").unlink(missing_ok=True)
    (bin_dir / "tr").symlink_to(tr)
    rules = tmp_path / "rules.nft"
    rules.write_text("table inet lovd_egress\n")
    script = tmp_path / "hook.sh"
    script.write_text(egress.HOOK_SCRIPT)
    return subprocess.run(
        ["/bin/sh", str(script), str(rules)],
        input=state,
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "STUB_LOG": str(tmp_path / "log"), **env},
        check=False,
        timeout=10,
    )


STATE = (
    '{"ociVersion":"1.0.2-dev","id":"89b5","status":"creating","pid":4242,'
    '"bundle":"/b","annotations":{"x":"\\"pid\\":1"}}'
)


def test_hook_loads_rules_into_the_containers_netns(tmp_path: Path) -> None:
    r = run_hook(tmp_path, STATE)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "log").read_text().splitlines()
    assert log == [f"{tmp_path}/bin/nsenter --target 4242 --net nft -f {tmp_path}/rules.nft"]


def test_hook_fails_closed_without_nft(tmp_path: Path) -> None:
    r = run_hook(tmp_path, STATE, tools=("nsenter",))
    assert r.returncode == 1
    # One line: it ends up as the last line of podman's error, which lovd reports.
    assert r.stderr == (
        "lovd-egress: nft not found: install nftables (apt-get install nftables) "
        "or set egress.enforce: false\n"
    )


def test_hook_fails_closed_when_nft_fails(tmp_path: Path) -> None:
    r = run_hook(tmp_path, STATE, STUB_FAIL="1")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1
    assert "could not load" in r.stderr and "line one line two" in r.stderr


@pytest.mark.parametrize("state", ["", "{}", '{"pid":0}', '{"pid":1}', '{"pid":"x"}'])
def test_hook_fails_closed_without_a_pid(tmp_path: Path, state: str) -> None:
    r = run_hook(tmp_path, state)
    assert r.returncode == 1 and "no container pid" in r.stderr
    assert not (tmp_path / "log").exists()


# --- doctor -------------------------------------------------------------------------------


async def test_doctor_warns_when_off(tmp_path: Path) -> None:
    [check] = await doctor.egress_checks(cfg(tmp_path, egress={"enforce": False}), podman_ok=True)
    assert check.status == "warn" and "NOT in force" in check.detail
    assert "egress.enforce: true" in check.fix


async def test_doctor_fails_without_nft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(egress, "HOOK_SEARCH_PATH", str(tmp_path))
    [check] = await doctor.egress_checks(cfg(tmp_path), podman_ok=True)
    assert check.status == "fail" and "nft not found" in check.detail
    assert check.fix == "apt-get install nftables"


async def test_doctor_fails_on_bad_allow(tmp_path: Path) -> None:
    [check] = await doctor.egress_checks(
        unchecked(tmp_path, egress_allow=["pypi.org:443"]), podman_ok=True
    )
    assert check.status == "fail" and "egress.allow: 'pypi.org:443'" in check.detail


def test_hook_script_runs_in_posix_sh(tmp_path: Path) -> None:
    # dash is /bin/sh on Debian; the script must not depend on bash.
    script = tmp_path / "hook.sh"
    script.write_text(egress.HOOK_SCRIPT)
    assert subprocess.run(["/bin/sh", "-n", str(script)], check=False).returncode == 0


def test_a_start_without_nft_is_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the runner reports (systemd-run only says 'exit 1'), lovd says why."""
    from lovd import config as config_mod
    from lovd.errors import LovdError

    cfg = config_mod.from_mapping({"state_dir": str(tmp_path), "runtime_dir": str(tmp_path / "x")})
    monkeypatch.setattr(egress, "HOOK_SEARCH_PATH", str(tmp_path / "empty"))
    with pytest.raises(LovdError, match="install nftables"):
        egress.ensure(cfg)
    paths = {"state_dir": str(tmp_path), "runtime_dir": str(tmp_path / "r")}
    off = config_mod.from_mapping({**paths, "egress": {"enforce": False}})
    assert egress.ensure(off) is None


def test_two_lovds_sharing_a_runtime_dir_keep_their_own_rules(tmp_path: Path) -> None:
    """Two instances (their broker ports differ) never load each other's rules: a session
    allowed only the other instance's broker could not reach its own."""
    from lovd import config as config_mod

    base = {"state_dir": str(tmp_path), "runtime_dir": str(tmp_path / "r")}
    a = config_mod.from_mapping({**base, "broker": {"listen": "127.0.0.1:18780"}})
    b = config_mod.from_mapping({**base, "broker": {"listen": "127.0.0.1:18781"}})
    assert egress.directory(a) != egress.directory(b)
    egress.install(a)
    egress.install(b)
    assert "18780" in (egress.directory(a) / "rules.nft").read_text()
    assert "18781" in (egress.directory(b) / "rules.nft").read_text()
