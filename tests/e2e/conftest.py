"""Session-scoped booted systemd machine with lovd installed by packaging/install.sh.

These tests run as root (they boot a machine and install lovd into it); the rest of
the suite runs as the lovd user. Where no machine can be booted they skip with the
reason, and in CI (CI=true) that skip is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e import machine as mm


def need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def booted_machine() -> Iterator[mm.Machine]:
    reason = mm.unavailable_reason()
    need(reason is None, reason or "")
    with mm.booted() as m:
        yield m


@pytest.fixture(scope="session")
def install_seconds(booted_machine: mm.Machine) -> float:
    return booted_machine.install(fresh_user=booted_machine.leader is not None)


@pytest.fixture(scope="session")
def machine(booted_machine: mm.Machine, install_seconds: float) -> mm.Machine:
    """The machine with lovd installed and lovd.socket enabled."""
    return booted_machine
