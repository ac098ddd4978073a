"""Floors in-process: memory and disk below their floors refuse new sessions and warm
containers (not wakes of existing ones), and recover by themselves."""

from __future__ import annotations

from pathlib import Path

from lovd.config import parse_size
from tests.unit.conftest import open_api


async def test_low_memory_refuses_new_sessions_and_the_pool(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(
        tmp_path, free_ports, warm_pool=1, floors={"memory_free": "512M", "disk_free": "0"}
    ) as a:
        floors = a.sessions.admission.floors
        s = await (await a.client.post("/api/sessions")).json()
        floors.memory = lambda: 100 * 1024 * 1024  # 100 MiB available
        r = await a.client.post("/api/sessions")
        body = await r.json()
        assert r.status == 503 and "floors.memory_free is 512 MiB" in body["detail"]
        assert int(r.headers["Retry-After"]) > 0
        assert a.sessions.warm_wanted() == 0  # nor does the pool start containers
        health_ok, detail = floors.summary()
        assert not health_ok and "memory 100 MiB available" in detail
        await a.sessions.stop(s["id"], "idle-stopped", "idle")
        assert (await a.sessions.wake(s["id"])).status == "running"  # its own place back
        floors.memory = lambda: 8 * 1024**3
        assert (await a.client.post("/api/sessions")).status == 201  # by itself


def test_sizes() -> None:
    assert parse_size("1G") == 1024**3 and parse_size("512M") == 512 * 1024**2
    assert parse_size("0") == 0 and parse_size("1.5k") == 1536 and parse_size("2GiB") == 2 * 1024**3


def test_an_unreadable_value_never_refuses(tmp_path: Path) -> None:
    """A sandbox that hides /proc/meminfo (ProcSubset=pid) or a missing state_dir must
    not turn every create into a 500: the floor is reported as not checked."""
    from lovd import config
    from lovd.session.admission import Floors

    def hidden() -> int:
        raise FileNotFoundError("/proc/meminfo")

    f = Floors(config.from_mapping({"state_dir": str(tmp_path / "missing")}), memory=hidden)
    assert f.problems() == []
    ok, detail = f.summary()
    assert ok and "disk unknown" in detail and "memory unknown" in detail
