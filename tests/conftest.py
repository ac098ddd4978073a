"""Shared test plumbing.

Tests that cannot run on a machine skip with the reason. In CI (CI=true) such a
skip is a failure: CI machines are set up to run everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"


def need(condition: bool, reason: str) -> None:
    """Skip (fail in CI) unless ``condition``."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def podman_usable() -> tuple[bool, str]:
    if os.geteuid() == 0:
        return False, "rootless Podman tests run as the unprivileged lovd user, not root"
    if not shutil.which("podman"):
        return False, "podman is not installed (packaging/setup-host.sh installs it)"
    r = subprocess.run(
        ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        return False, f"podman info failed as this user: {r.stderr.strip()[-200:]}"
    return True, ""


def image_present(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], check=False).returncode == 0


@pytest.fixture(scope="session")
def podman() -> str:
    ok, reason = podman_usable()
    need(ok, reason)
    return "podman"


TEST_IMAGE = "localhost/lovd-test:latest"


@pytest.fixture(scope="session")
def test_image(podman: str) -> str:
    need(image_present(TEST_IMAGE), f"{TEST_IMAGE} missing: run 'lovd image build --test'")
    return TEST_IMAGE
