"""The per-session disk quota (lovd/session/quota.py), its settings in the container's
environment and doctor's line. The quota against a real session (a chat that fills its
workspace gets the message; nothing is lost) is in tests/integration/test_chat_bodies.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lovd import config
from lovd.config import ConfigError
from lovd.doctor import disk_quota_check
from lovd.session.launcher import SessionEnv
from lovd.session.quota import DiskQuota, Unreadable, message, walk_size


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _fill(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(os.urandom(size))  # allocated for real: st_blocks counts it


def test_walk_counts_allocated_bytes_not_apparent_size(tmp_path: Path) -> None:
    _fill(tmp_path / ".lovd/share/opencode/opencode.db", 300_000)
    with (tmp_path / "sparse").open("wb") as f:
        f.truncate(10 * 2**30)  # 10 GiB apparent, nothing allocated
    (tmp_path / "link").symlink_to("/usr")  # not followed
    size = walk_size(tmp_path)
    assert 300_000 <= size < 400_000


@pytest.mark.skipif(os.getuid() == 0, reason="root reads every directory")
def test_an_unreadable_directory_is_reported(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        with pytest.raises(Unreadable):
            walk_size(tmp_path)
    finally:
        locked.chmod(0o700)


async def test_prompts_are_refused_once_the_workspace_is_full(tmp_path: Path) -> None:
    clock = Clock()
    q = DiskQuota(1_000_000, workspace=lambda sid: tmp_path / sid, ttl=5, clock=clock)
    _fill(tmp_path / "a/db", 400_000)
    _fill(tmp_path / "b/db", 400_000)
    assert await q.refusal("a") == ""
    # What lovd forwarded counts at once, before the next measurement.
    q.grew("a", 700_000)
    why = await q.refusal("a")
    assert why == message(1_000_000)
    assert "Denne økten har brukt opp lagringsplassen" in why and "used up its storage" in why
    # Another visitor's session is unaffected.
    assert await q.refusal("b") == ""
    # The measurement is cached, then taken again (the estimate was only an estimate).
    clock.t = 6
    assert await q.refusal("a") == ""
    _fill(tmp_path / "a/db", 700_000)
    assert await q.refusal("a") == ""  # cached for ttl seconds
    clock.t = 12
    assert await q.refusal("a") != ""
    assert (tmp_path / "a/db").stat().st_size == 1_100_000  # nothing was removed


async def test_no_quota_and_unmeasurable_workspaces(tmp_path: Path) -> None:
    off = DiskQuota(0, workspace=lambda sid: tmp_path / sid)
    assert await off.refusal("a") == ""

    async def fails(path: Path) -> int:
        raise OSError("podman unshare failed")

    q = DiskQuota(10, workspace=lambda sid: tmp_path / sid, fallback=fails)
    _fill(tmp_path / "a/x", 4096)
    assert await q.refusal("a") != ""
    # A workspace lovd cannot measure is not locked out (the per-file limit still holds).
    q2 = DiskQuota(10, workspace=lambda sid: Path("/nonexistent") / sid, fallback=fails)
    assert await q2.refusal("a") == ""


async def test_fallback_measures_what_lovd_cannot_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(path: Path) -> int:
        raise Unreadable(str(path))

    monkeypatch.setattr("lovd.session.quota.walk_size", unreadable)
    asked: list[Path] = []

    async def du(path: Path) -> int:
        asked.append(path)
        return 5_000

    q = DiskQuota(4_000, workspace=lambda sid: tmp_path / sid, fallback=du)
    assert await q.refusal("s1") != ""
    assert asked == [tmp_path / "s1"]


def _config(tmp_path: Path, **values: object) -> config.Config:
    return config.from_mapping({"state_dir": str(tmp_path), **values})


def test_the_container_gets_the_models_and_the_per_file_limit(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        llm={"model": "openai/gpt-4o-mini", "models": ["anthropic/x"]},
        limits={"disk": "512M"},
    )
    env = SessionEnv(cfg, b"k" * 32).build("0123456789abcdef", "cred")
    assert env["LOVD_MODELS"] == "anthropic/x,openai/gpt-4o-mini"
    assert env["LOVD_FILE_MAX_KB"] == str(512 * 1024)
    demo = SessionEnv(
        _config(tmp_path, limits={"disk": "0"}), b"k" * 32, {"model": "lovd/legal-stub"}
    ).build("0123456789abcdef", "cred")
    assert demo["LOVD_MODELS"] == "lovd/legal-stub" and demo["LOVD_FILE_MAX_KB"] == ""


def test_limits_disk_is_validated_and_doctor_names_the_quota(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"limits\.disk"):
        _config(tmp_path, limits={"disk": "lots"})
    on = disk_quota_check(_config(tmp_path, limits={"disk": "2G"}))
    assert on.status == "ok" and "2G" in on.detail and "RLIMIT_FSIZE" in on.detail
    off = disk_quota_check(_config(tmp_path, limits={"disk": "0"}))
    assert off.status == "warn" and "limits.disk" in off.fix
