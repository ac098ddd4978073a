from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lovd import config
from lovd.caddy import CaddyManager
from lovd.config import ConfigError
from tests.conftest import ROOT


def test_defaults_match_the_original_system() -> None:
    c = config.from_mapping({})
    assert (c.memory_max, c.cpus, c.max_running) == ("4G", 1.0, 3)
    assert (c.health_interval, c.restart_attempts) == (30.0, 3)
    assert c.idle_timeout == 3600.0
    assert c.listen == "unix:/run/lovd/api.sock"


def test_nested_yaml_maps_to_dotted_keys() -> None:
    c = config.from_mapping(yaml.safe_load("limits:\n  memory: 2G\n  max_running: 5\n"))
    assert c.memory_max == "2G" and c.max_running == 5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nosuch": 1}, "unknown setting 'nosuch'"),
        ({"limits": {"nosuch": 1}}, "unknown setting 'limits.nosuch'"),
        ({"limits": {"max_running": "three"}}, "limits.max_running: expected int"),
        ({"limits": {"max_running": 0}}, "limits.max_running: 0 is out of range"),
        ({"runner": "docker"}, "runner: 'docker': must be one of auto, systemd, podman"),
        ({"port_range": "a-b"}, "port_range"),
        ({"watchdog": "yes"}, "watchdog: expected bool"),
        ({"extra_run_args": "--privileged"}, "extra_run_args: expected a list"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.from_mapping(data)


def test_example_documents_every_key() -> None:
    example = yaml.safe_load((ROOT / "lovd.conf.example").read_text())
    documented = dict(config._flatten(example))
    keys = {s.key for s in config.settings()}
    assert keys == set(documented), (
        f"undocumented: {sorted(keys - set(documented))}; unknown: {sorted(set(documented) - keys)}"
    )
    # The example's values are the defaults, so copying it changes nothing.
    assert config.from_mapping(example) == config.from_mapping({})
    text = (ROOT / "lovd.conf.example").read_text()
    for s in config.settings():
        leaf = s.key.rsplit(".", 1)[-1]
        assert re.search(rf"#.*\n\s*{re.escape(leaf)}:", text), f"{s.key} has no comment"


def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "lovd.conf"
    bad.write_text("limits:\n  memory: [1, 2]\n")
    r = subprocess.run(
        [sys.executable, "-m", "lovd", "--config", str(bad), "version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert "limits.memory" in r.stderr and "Traceback" not in r.stderr


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "absent.conf"))


def test_example_is_generated_from_the_settings() -> None:
    assert (ROOT / "lovd.conf.example").read_text() == config.render_example(), (
        "regenerate with: python -m lovd.config > lovd.conf.example"
    )


@pytest.mark.parametrize(
    ("conf", "tls", "hosts"),
    [
        ({}, False, []),
        ({"caddy": {"tls": True}}, True, []),
        # Names and addresses in public_url are matched; a loaded certificate for them
        # keeps Caddy from managing one.
        ({"caddy": {"tls": True}, "public_url": "https://10.0.0.5"}, True, ["10.0.0.5"]),
        ({"caddy": {"tls": True}, "public_url": "https://127.0.0.1:8443"}, True, []),
        (
            {"caddy": {"tls": True}, "public_url": "https://chat.example.org"},
            True,
            ["chat.example.org"],
        ),
    ],
)
async def test_caddy_tls_reaches_lovds_server(
    conf: dict[str, object], tls: bool, hosts: list[str]
) -> None:
    """caddy.tls (default off): lovd's server speaks TLS with the certificates Caddy has
    loaded; without a public name still no ACME and no redirect server."""
    c = config.from_mapping(conf)
    assert c.caddy_tls is tls
    manager = CaddyManager.from_config(c, "/run/lovd/auth.sock", host_key=b"k" * 32)
    assert manager is not None
    try:
        server = manager.desired
    finally:
        await manager.close()
    assert ("tls_connection_policies" in server) is tls
    if tls:
        assert server["tls_connection_policies"] == [{}]
    # A name: Caddy's automatic HTTPS (a certificate unless one is loaded, the redirect);
    # none (localhost, 127.0.0.1): no ACME, no redirect server.
    assert ("automatic_https" in server) is not hosts
    assert server["routes"][0].get("match", [{}])[0].get("host", []) == hosts
