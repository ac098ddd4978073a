"""Every setting's bad values are refused at load, each with a message naming the key.

Two tables: values that are wrong for *any* setting of a type (NaN for a duration, -1 for
a count, a newline in a string, …), generated from the settings themselves so a new key
is covered the day it is added; and the bad values particular to each key. A third
test runs the real command line: exit code 2, one line, no traceback.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lovd import config
from lovd.config import ConfigError


def nested(key: str, value: Any) -> dict[str, Any]:
    """{"a.b": v} as YAML would give it: {"a": {"b": v}}."""
    out: dict[str, Any] = {}
    *sections, leaf = key.split(".")
    cur = out
    for s in sections:
        cur = cur.setdefault(s, {})
    cur[leaf] = value
    return out


def refused(key: str, value: Any) -> str:
    with pytest.raises(ConfigError) as e:
        config.from_mapping(nested(key, value))
    msg = str(e.value)
    assert msg.startswith(f"{key}:"), msg  # names the key first
    assert "\n" not in msg
    return msg


def by_type() -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = []
    for s in config.settings():
        if s.type is float:
            cases += [
                (s.key, math.nan),
                (s.key, math.inf),
                (s.key, -math.inf),
                (s.key, -1.0),
                (s.key, "ten"),
                (s.key, True),
            ]
        elif s.type is int:
            cases += [(s.key, -1), (s.key, 1.5), (s.key, "3"), (s.key, False)]
        elif s.type is bool:
            cases += [(s.key, "yes"), (s.key, 1)]
        elif s.type is str:
            cases += [(s.key, "a\nb"), (s.key, "nul\x00"), (s.key, ["a"]), (s.key, {"x": 1})]
        elif s.type is list:
            cases += [(s.key, "x"), (s.key, [1]), (s.key, ["ok", "new\nline"])]
    return cases


@pytest.mark.parametrize(("key", "value"), by_type(), ids=repr)
def test_wrong_for_any_setting_of_its_type(key: str, value: Any) -> None:
    refused(key, value)


# Bad values particular to each key: (key, value, what the message must say).
BAD: list[tuple[str, Any, str]] = [
    # The ones issue 16 found accepted.
    ("stop_timeout", -3, "0 to 3600 seconds"),
    ("ready_timeout", 0, "from 1 to 3600"),
    ("health.interval", math.nan, "from 1 to 3600"),
    ("health.interval", 0, "from 1 to 3600"),
    ("health.interval", 0.2, "from 1 to 3600"),  # keeps podman ps off the CPU
    ("session_ttl", -1, "0 (never)"),
    ("delete_after", -86400, "0 (never)"),
    ("limits.memory", "lots", "512M or 4G"),
    ("public_url", "not a url", "http:// or https://"),
    # daemon
    ("listen", "/run/lovd/api.sock", "unix:/ABSOLUTE/PATH or tcp:HOST:PORT"),
    ("listen", "unix:relative.sock", "unix:/ABSOLUTE/PATH"),
    ("listen", "tcp:127.0.0.1:99999", "tcp:HOST:PORT"),
    ("listen", "tcp:localhost", "tcp:HOST:PORT"),
    ("state_dir", "var/lib/lovd", "absolute path"),
    ("state_dir", "", "absolute path"),
    ("runtime_dir", "run", "absolute path"),
    ("public_url", "ftp://example.org", "http:// or https://"),
    ("public_url", "https://", "host name"),
    ("public_url", "chat.example.org", "http:// or https://"),
    ("public_url", "https://chat.example.org/?a=1", "no query"),
    ("public_url", "https://user:pw@chat.example.org", "user:password@"),
    ("public_url", "https://chat.example.org:99999", "not a URL"),
    ("log_level", "verbose", "debug, info, warning, error"),
    ("idle_exit", -5, "0 (never)"),
    ("max_body", 10, "1024 to"),
    ("host_id", "my host", "letters, digits"),
    # containers
    ("runner", "docker", "auto, systemd, podman"),
    ("podman.binary", "", "without spaces"),
    ("podman.socket", "podman.sock", "absolute path"),
    ("image", "", "without spaces"),
    ("image", "lovd session", "without spaces"),
    ("container_port", 0, "1 to 65535"),
    ("container_port", 70000, "1 to 65535"),
    ("container_user", "a b", "USER or USER:GROUP"),
    ("health_path", "global/health", "starting with '/'"),
    ("port_range", "a-b", "LOW-HIGH"),
    ("port_range", "80-90", "1024-65535"),
    ("port_range", "30000-20000", "LOW <= HIGH"),
    ("port_range", "20000-70000", "1024-65535"),
    ("userns", "keep-id", "never host or keep-id"),
    ("userns", "host", "never host or keep-id"),
    ("extra_run_args", ["--cap-add=NET_RAW", ""], "must not be empty"),
    ("host_gateway", "gateway.local", "IP address"),
    ("session_network", "", "without spaces"),
    # limits and lifecycle
    ("limits.memory", "-1G", "512M or 4G"),
    ("limits.memory", "1M", "at least 64M"),
    ("limits.memory", "infG", "512M or 4G"),
    ("limits.memory", "4g", "512M or 4G"),  # systemd's MemoryMax= reads upper case only
    ("limits.memory", "2GiB", "512M or 4G"),
    ("limits.cpus", 0, "more than 0"),
    ("limits.cpus", math.nan, "more than 0"),
    ("limits.tasks", 0, "16 to"),
    ("limits.max_running", 0, "1 to 10000"),
    ("limits.max_running", 20000, "1 to 10000"),
    ("warm_pool", -1, "0 to 1000"),
    ("warm_max_age", 0, "more than 0"),
    ("ready_timeout", 0.5, "from 1 to 3600"),
    ("ready_timeout", 7200, "from 1 to 3600"),
    ("stop_timeout", 100000, "0 to 3600"),
    ("idle_timeout", -1, "0 (never)"),
    ("unused_timeout", math.nan, "0 (never)"),
    ("orphan_grace", -1, "from 0 to 86400"),
    ("health.probe_timeout", 0, "more than 0"),
    ("health.failures", 0, "1 to 1000"),
    ("health.restart_attempts", 0, "1 to 1000"),
    ("health.restart_window", 0, "more than 0"),
    ("health.history", 0, "1 to 10000"),
    ("floors.disk_free", "plenty", "not a size"),
    ("floors.memory_free", "-1G", "not a size"),
    # legal research session
    ("mcp.lovdata.url", "lovdata", "http:// or https://"),
    ("mcp.lovdata.token", "two words", "without spaces"),
    ("llm.model", "gpt-4", "provider/model"),
    ("llm.model", "/gpt-4", "provider/model"),
    ("llm.models", ["openai/gpt-4.1", "claude"], "provider/model"),
    ("llm.base_url", "localhost:8000/v1", "http:// or https://"),
    ("llm.api_key", "sk one", "without spaces"),
    ("llm.openai_api_key", "a b", "without spaces"),
    ("llm.anthropic_api_key", "a b", "without spaces"),
    ("llm.google_api_key", "a b", "without spaces"),
    ("llm.openai_base_url", "", "http:// or https://"),
    ("llm.anthropic_base_url", "api.anthropic.com", "http:// or https://"),
    ("llm.google_base_url", "file:///etc/passwd", "http:// or https://"),
    ("llm.max_tokens_per_session", -1, "0 (no cap)"),
    ("llm.max_tokens_per_day", -1, "0 (no cap)"),
    ("llm.deny_tools", ["bash", "rm -rf"], "OpenCode tool names"),
    ("demo", "maybe", "auto, on, off"),
    ("demo_corpus", "corpus.json", "absolute path"),
    ("demo_mcp_port", 65536, "0 (any free port)"),
    ("demo_llm_port", -1, "0 (any free port)"),
    ("demo_listen", "localhost", "IP address"),
    # broker and egress
    ("broker.listen", "18780", "HOST:PORT"),
    ("broker.listen", "localhost:18780", "not an IP address"),
    ("broker.listen", "127.0.0.1:0", "1-65535"),
    ("broker.listen", "127.0.0.1:x", "1-65535"),
    ("egress.allow", ["10.0.0.5:99999"], "port must be 1-65535"),
    ("egress.allow", ["mirror.internal:443"], "not ADDRESS:PORT, ADDRESS or CIDR"),
    ("egress.allow", ["10.0.0.1/8"], "host bits set"),
    ("egress.allow", ["[fd00::1"], "[IPV6]:PORT"),
    # Caddy and the browser path
    ("caddy.admin", "admin.sock", "Caddy's admin address"),
    ("caddy.admin", "unix//", "Caddy's admin address"),
    ("caddy.listen", [], "at least one address"),
    ("caddy.listen", ["80"], "not a Caddy listen address"),
    ("caddy.listen", [":80", ":99999"], "not a Caddy listen address"),
    ("caddy.listen", [":9000-8000"], "not a Caddy listen address"),
    ("caddy.server", "lovd server", "letters, digits"),
    ("caddy.server", "", "letters, digits"),
    ("caddy.auth_socket", "auth.sock", "absolute path"),
    ("caddy.check_interval", 0, "from 0.1 to 3600"),
    ("browser.start_limit", 0, "1 to"),
    ("browser.start_window", 0, "more than 0"),
    ("browser.auth_failures", 0, "1 to"),
    ("browser.auth_failure_window", -60, "more than 0"),
    # PostgreSQL sync
    ("postgres.dsn", "host='unterminated", "not a libpq connection string"),
    ("postgres.pool_size", 1, "2 to 100"),
    ("postgres.batch", 0, "1 to 100000"),
    ("postgres.connect_timeout", 0, "more than 0"),
    ("postgres.timeout", 0, "more than 0"),
    ("postgres.read_timeout", math.inf, "more than 0"),
    ("postgres.max_backoff", 0.1, "from 0.2"),
    ("postgres.heartbeat_interval", 0, "more than 0"),
    ("postgres.host_stale_after", 0, "more than 0"),
    ("postgres.retention", 0, "from 60"),
    ("postgres.upstream", "10.0.0.2", "HOST:PORT"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD, ids=repr)
def test_bad_value_refused_naming_key_and_range(key: str, value: Any, allowed: str) -> None:
    msg = refused(key, value)
    assert allowed in msg, msg


@pytest.mark.parametrize(
    ("data", "allowed"),
    [
        ({"limits": {"max_running": 200}, "port_range": "20000-20099"}, "at most 100"),
        (
            {"postgres": {"heartbeat_interval": 10, "host_stale_after": 5}},
            "more than postgres.heartbeat_interval",
        ),
    ],
)
def test_rules_across_settings(data: dict[str, Any], allowed: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(allowed)):
        config.from_mapping(data)


GOOD: list[tuple[str, Any]] = [
    ("delete_after", 0),
    ("session_ttl", 0),
    ("idle_timeout", 0),
    ("unused_timeout", 0),
    ("idle_exit", 0),
    ("stop_timeout", 0),
    ("orphan_grace", 0),
    ("health.interval", 1),
    ("public_url", "https://chat.example.org/base"),
    ("public_url", "http://[::1]:8080"),
    ("listen", "tcp:127.0.0.1:8080"),
    ("listen", "tcp:[::1]:8080"),
    ("caddy.listen", [":443", "127.0.0.1:8080", "tcp6/[::1]:8443", "unix//run/c.sock"]),
    ("caddy.admin", "localhost:2019"),
    ("caddy.admin", "unix//run/caddy/admin.sock"),
    ("caddy.admin", ""),
    ("egress.allow", ["10.0.0.5:3128", "192.168.0.0/16", "[fd00::1]:80"]),
    ("broker.listen", "[::1]:18780"),
    ("limits.memory", "512M"),
    ("limits.memory", "1.5G"),
    ("floors.disk_free", "0"),
    ("postgres.upstream", "front.internal:8443"),
    ("container_user", ""),
    ("container_user", "1000:1000"),
    ("userns", "auto:size=65536"),
    ("demo_mcp_port", 0),
    ("llm.models", ["openai/gpt-4.1", "anthropic/claude-sonnet-4"]),
    ("postgres.dsn", "host=db.internal dbname=lovd user=lovd"),
]


@pytest.mark.parametrize(("key", "value"), GOOD, ids=repr)
def test_good_values_accepted(key: str, value: Any) -> None:
    config.from_mapping(nested(key, value))


def test_zero_means_never_in_every_timeout_help() -> None:
    """One meaning for 0 among the timeouts that delete or stop: never (the limit is off)."""
    helps = {s.key: s.help for s in config.settings()}
    for key in ("idle_timeout", "unused_timeout", "idle_exit", "session_ttl", "delete_after"):
        assert re.search(r"0: never|\(0: never\)", helps[key]), key
    cfg = config.from_mapping({"session_ttl": 0})
    assert cfg.expires_at(1000.0) == config.NEVER
    assert config.from_mapping({}).expires_at(1000.0) == 1000.0 + 86400


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lovd.conf"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("limits:\n  memory: 2G\nidle_timeout: 5\nlimits:\n  cpus: 2\n", "limits"),
        ("limits:\n  memory: 2G\n  memory: 8G\n", "limits.memory"),
        ("public_url: https://a.example\npublic_url: https://b.example\n", "public_url"),
        ("postgres:\n  dsn: ''\nmcp:\n  lovdata:\n    url: ''\n    url: ''\n", "mcp.lovdata.url"),
        ("limits:\n  memory: 2G\nlimits.memory: 3G\n", "limits.memory"),
    ],
)
def test_duplicate_keys_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: given twice"):
        config.load(str(write(tmp_path, text)))


def test_one_section_is_fine(tmp_path: Path) -> None:
    cfg = config.load(
        str(write(tmp_path, "limits:\n  memory: 2G\n  cpus: 2\nhealth:\n  interval: 10\n"))
    )
    assert (cfg.memory_max, cfg.cpus, cfg.health_interval) == ("2G", 2.0, 10.0)


def lovd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lovd", *argv], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("stop_timeout: -3\n", "stop_timeout"),
        ("ready_timeout: 0\n", "ready_timeout"),
        ("health:\n  interval: .nan\n", "health.interval"),
        ("health:\n  interval: 0\n", "health.interval"),
        ("session_ttl: -1\n", "session_ttl"),
        ("delete_after: -1\n", "delete_after"),
        ("limits:\n  memory: lots\n", "limits.memory"),
        ("public_url: not a url\n", "public_url"),
        ("limits:\n  cpus: 2\nlimits:\n  memory: 2G\n", "limits"),
    ],
)
def test_lovd_refuses_to_start_with_one_line(tmp_path: Path, text: str, key: str) -> None:
    """``lovd serve`` (any command) exits 2 with one line naming the key, no traceback."""
    r = lovd(
        "--config", str(write(tmp_path, text)), "serve", "--listen", f"unix:{tmp_path / 'api.sock'}"
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"lovd: configuration error: {key}: "), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "api.sock").exists()


def test_doctor_reports_every_problem(tmp_path: Path) -> None:
    conf = write(tmp_path, "stop_timeout: -3\nhealth:\n  interval: .nan\npublic_url: x\n")
    r = lovd("--config", str(conf), "doctor")
    assert r.returncode == 2
    for key in ("stop_timeout", "health.interval", "public_url"):
        assert re.search(rf"\[FAIL\] config +{re.escape(key)}: ", r.stdout), r.stdout
    first = lovd("--config", str(conf), "version")
    assert "(and 2 more: lovd doctor lists them all)" in first.stderr


def test_doctor_says_the_settings_are_valid(tmp_path: Path) -> None:
    from lovd.doctor import config_report

    conf = write(tmp_path, "idle_timeout: 0\n")
    [check] = config_report(*config.config_path(str(conf)), [])
    assert (check.name, check.status) == ("config", "ok")
    assert "every setting valid" in check.detail


async def test_zero_delete_after_and_session_ttl_keep_sessions(
    tmp_path: Path, free_ports: list[int]
) -> None:
    """delete_after 0 and session_ttl 0 are "never", like idle_timeout 0: a session stopped
    a year ago is kept, and a new one has no expiry (it was deleted 5 s after stopping)."""
    import time

    from tests.unit.conftest import open_api

    async with open_api(tmp_path, free_ports, delete_after=0, session_ttl=0) as api:
        s = await (await api.client.post("/api/sessions")).json()
        assert s["expires_at"] == "9999-12-31T23:59:59Z"
        await api.sessions.stop(s["id"], "stopped", "test")
        await api.store.update(s["id"], updated_at=time.time() - 365 * 86400)
        assert (await (await api.client.post("/api/cleanup")).json())["removed"] == []
        assert api.store.get(s["id"]) is not None
        assert (api.config.sessions_path / s["id"]).is_dir()
        r = await api.client.get(
            f"/c/{s['id']}", params={"token": s["token"]}, allow_redirects=False
        )
        assert r.status == 303  # never expired: its link still works
