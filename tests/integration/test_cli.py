"""The operator commands against the real host: doctor and image build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lovd import config, limits
from tests.lovdproc import podman

pytestmark = pytest.mark.podman


def lovd(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    pre = ["--config", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "lovd", *pre, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_doctor_reports_this_host(tmp_path: Path, test_image: str) -> None:
    conf = tmp_path / "lovd.conf"
    conf.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path),
                "image": test_image,
                "runner": "podman",
                "limits": {"enforce": False},
            }
        )
    )
    r = lovd("doctor", "--json", config=conf)
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    for name in (
        "user",
        "podman",
        "runtime",
        "storage",
        "subuid",
        "subgid",
        "network",
        "state-dir",
        "image",
        "limits",
        "user-manager",
    ):
        assert name in checks, name
    for name in ("user", "podman", "storage", "subuid", "subgid", "network", "state-dir", "image"):
        assert checks[name]["status"] == "ok", checks[name]
    first = r

    # The truth about each limit, as the daemon would apply it on this host.
    here = limits.for_runner("podman", "auto")
    got = checks["limits"]
    for phrase in here.describe(config.from_mapping({})):
        assert phrase in got["detail"], got
    assert got["status"] == ("warn" if here.missing else "ok"), got
    assert "pids-limit is applied" not in r.stdout
    conf.write_text(
        yaml.safe_dump({"state_dir": str(tmp_path), "image": test_image, "runner": "podman"})
    )
    r = lovd("doctor", config=conf)
    if here.missing:  # limits.enforce: true (the default) on a host that cannot
        assert r.returncode == 1 and "[FAIL] limits" in r.stdout, r.stdout
        assert "Sessions are refused (503, limits.enforce: true)" in r.stdout
        assert "Delegate=cpu cpuset io memory pids" in r.stdout
    else:
        assert "[ok  ] limits" in r.stdout, r.stdout
    assert first.returncode == 0, first.stdout

    conf.write_text(
        yaml.safe_dump(
            {"state_dir": str(tmp_path / "nope" / "x"), "image": "localhost/no-such-image:1"}
        )
    )
    r = lovd("doctor", config=conf)
    assert r.returncode == 1
    assert "[FAIL] image" in r.stdout and "fix: lovd image build" in r.stdout
    assert "[FAIL] state-dir" in r.stdout and "install -d" in r.stdout


def test_image_build_test_image(podman: str) -> None:
    tag = "localhost/lovd-test-clibuild:latest"
    try:
        r = lovd("image", "build", "--test", "--tag", tag)
        assert r.returncode == 0, r.stderr[-2000:]
        inspect = json.loads(podman_cmd("image", "inspect", tag))[0]
        assert inspect["Config"]["User"].startswith("1000")
    finally:
        podman_cmd("rmi", "-f", tag)


def podman_cmd(*args: str) -> str:
    return podman(*args, check=False)
