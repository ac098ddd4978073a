from __future__ import annotations

from pathlib import Path

import pytest

from lovd import config, daemon
from lovd.daemon import Daemon, StartupError


async def test_refuses_to_run_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon.os, "geteuid", lambda: 0)
    cfg = config.from_mapping({"state_dir": str(tmp_path / "s")})
    with pytest.raises(StartupError, match="must not run as root"):
        await Daemon(cfg).run()
    assert not (tmp_path / "s").exists()  # refused before touching anything


def test_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    live, _ = daemon._bind(f"unix:{path}")
    with pytest.raises(StartupError, match="already listening"):
        daemon._bind(f"unix:{path}")
    live.close()  # the path stays behind, stale
    again, _ = daemon._bind(f"unix:{path}")
    assert again.getsockname() == path
    again.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError, match="not a socket"):
        daemon._bind(f"unix:{tmp_path / 'file'}")


def test_activated_sockets_are_told_apart_by_their_exact_address(tmp_path: Path) -> None:
    api, _ = daemon._bind(f"unix:{tmp_path / 'api.sock'}")
    auth, _ = daemon._bind(f"unix:{tmp_path / 'auth.sock'}")
    broker, _ = daemon._bind("tcp:127.0.0.1:0")
    api_tcp, _ = daemon._bind("tcp:127.0.0.1:0")
    stray, _ = daemon._bind(f"unix:{tmp_path / 'other.sock'}")
    port = broker.getsockname()[1]
    listen = f"unix:{tmp_path / 'api.sock'}"
    where = str(tmp_path / "auth.sock")
    try:
        got = daemon._split_activated([auth, broker, api], listen, where, ("127.0.0.1", port))
        assert got == ([api], auth, broker)
        got = daemon._split_activated([api], listen, where, ("127.0.0.1", port))
        assert got == ([api], None, None)
        tcp_listen = f"tcp:127.0.0.1:{api_tcp.getsockname()[1]}"
        got = daemon._split_activated([api_tcp, broker], tcp_listen, where, ("127.0.0.1", port))
        assert got == ([api_tcp], None, broker)
        # A socket matching no setting is never served as the operator API.
        for unexpected in (stray, api_tcp):
            with pytest.raises(StartupError, match="does not expect"):
                daemon._split_activated([unexpected], listen, where, ("127.0.0.1", port))
    finally:
        for s in (api, auth, broker, api_tcp, stray):
            s.close()
