"""A Podman command that hangs (Podman 4.3 can deadlock two of its own commands on its
storage locks) is killed at its deadline and reported, so a start never hangs forever."""

from __future__ import annotations

import asyncio
import time

import pytest

from lovd.errors import LovdError
from lovd.podman import communicate


async def test_a_hung_command_is_killed_and_reported() -> None:
    proc = await asyncio.create_subprocess_exec(
        "sleep", "30", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    t0 = time.monotonic()
    with pytest.raises(LovdError) as e:
        await communicate(proc, None, "podman run", timeout=0.3)
    assert time.monotonic() - t0 < 5
    assert e.value.code == "runner-failed" and "podman run did not finish" in e.value.message
    assert proc.returncode is not None  # killed, its locks released


async def test_a_quick_command_passes_through() -> None:
    proc = await asyncio.create_subprocess_exec(
        "echo", "hi", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, _ = await communicate(proc, None, "echo", timeout=5)
    assert out == b"hi\n"
