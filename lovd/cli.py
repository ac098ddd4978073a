"""The ``lovd`` command: serve, session, cleanup, doctor, image, demo, version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

import aiohttp

from lovd import __version__
from lovd import config as config_mod
from lovd.config import Config, ConfigError

EXIT_USAGE = 2


def _socket_path(args: argparse.Namespace, cfg: Config | None) -> str:
    if args.socket:
        return str(args.socket)
    env = os.environ.get("LOVD_SOCKET")
    if env:
        return env
    listen = cfg.listen if cfg else "unix:/run/lovd/api.sock"
    if not listen.startswith("unix:"):
        raise SystemExit("lovd: the API is not on a unix socket; pass --socket PATH")
    return listen[len("unix:") :]


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


async def _call(sock: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=sock), timeout=timeout
    ) as http:
        try:
            async with http.request(method, f"http://lovd{path}", json=body) as r:
                text = await r.text()
                data = json.loads(text) if text and "json" in r.content_type else text
                if r.status >= 400:
                    raise ApiError(r.status, data)
                return r.status, data
        except aiohttp.ClientConnectorError as e:
            raise SystemExit(
                f"lovd: cannot connect to {sock}: {e.os_error.strerror if e.os_error else e}. "
                "Is lovd running (systemctl start lovd, or lovd serve)? "
                "Do you have access to the socket (group lovd)?"
            ) from e


def _api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    sock = _socket_path(args, args.cfg)
    try:
        _, data = asyncio.run(_call(sock, method, path, body))
    except ApiError as e:
        detail = e.body.get("detail") if isinstance(e.body, dict) else e.body
        print(f"lovd: {detail} (HTTP {e.status})", file=sys.stderr)
        raise SystemExit(1) from e
    return data


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    widths = [max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    for r in rows:
        lines.append(
            "  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True))
        )
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    from lovd import log
    from lovd.daemon import Daemon
    from lovd.wiring import StartupError

    cfg: Config = args.cfg
    log.setup(cfg.log_level)
    listen = args.listen
    if listen and not listen.startswith(("unix:", "tcp:")):
        print("lovd: --listen expects unix:PATH or tcp:HOST:PORT", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(Daemon(cfg, listen_override=listen).run())
    except StartupError as e:
        print(f"lovd: {e}", file=sys.stderr)
        return 1


def cmd_session(args: argparse.Namespace) -> int:
    sub = args.session_cmd
    if sub == "create":
        data = _api(args, "POST", "/api/sessions", {"wait": not args.no_wait})
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(f"session {data['id']} {data['status']}")
            print(f"  open: {data['url']}")
            print(
                "  (the link works once and is shown only now; lovd session link ID makes "
                "a new one)"
            )
        return 0
    if sub == "link":
        data = _api(args, "POST", f"/api/sessions/{args.id}/link")
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(data["url"])
            print("  (works once; the session's earlier link no longer works)", file=sys.stderr)
        return 0
    if sub == "list":
        data = _api(args, "GET", "/api/sessions?scope=all" if args.all_hosts else "/api/sessions")
        if args.json:
            print(json.dumps(data, indent=2))
        elif args.all_hosts:
            for r in data["sessions"]:
                r["host"] = r["host_id"] + ("" if r["host_alive"] else " (no heartbeat)")
            print(_table(data["sessions"], ["id", "host", "status", "created_at", "reason"]))
            if data.get("sync") == "off":
                print("(PostgreSQL sync is off, postgres.dsn unset: this host's sessions only)")
            for h in data["hosts"]:
                if not h["alive"]:
                    print(f"host {h['host_id']}: no heartbeat for {h['heartbeat_age']:.0f} s")
        else:
            print(_table(data["sessions"], ["id", "status", "port", "created_at", "reason"]))
        return 0
    if sub == "show":
        data = _api(args, "GET", f"/api/sessions/{args.id}?history=1")
        health = _api(args, "GET", f"/api/sessions/{args.id}/health")
        if args.json:
            print(json.dumps({**data, "health": health}, indent=2))
        else:
            for k, v in data.items():
                if k not in ("events", "health"):
                    print(f"{k:14} {v}")
            cls = f", {health['failure_class']}" if health["failure_class"] else ""
            print(
                f"{'health':14} {health['consecutive_failures']} failed probes in a row, "
                f"{health['restarts_in_window']}/{health['restart_attempts']} restarts in "
                f"{health['restart_window']:g} s{cls}"
            )
            print("events:")
            for e in reversed(data.get("events", [])[:10]):
                print(f"  {e['at']} {e['kind']} {e['detail']}")
            print("probes:")
            for h in reversed(health["history"][:10]):
                print(f"  {h['at']} {'ok  ' if h['ok'] else 'FAIL'} {h['detail']}")
        return 0
    if sub == "stop":
        for sid in args.ids:
            data = _api(args, "POST", f"/api/sessions/{sid}/stop")
            print(
                f"session {data['id']} {data['status']} (workspace kept; wakes on its next request)"
            )
        return 0
    if sub == "rm":
        for sid in args.ids:
            _api(args, "DELETE", f"/api/sessions/{sid}")
            print(f"deleted {sid}")
        return 0
    raise AssertionError(sub)


def cmd_cleanup(args: argparse.Namespace) -> int:
    data = _api(args, "POST", "/api/cleanup")
    if args.json:
        print(json.dumps(data))
    else:
        print(f"deleted {len(data['removed'])} sessions")
        for d in data.get("deleted", []):
            print(f"  {d['id']}: {d['reason']}")
    return 0


def _lovd_running(args: argparse.Namespace, cfg: Config) -> bool:
    """Whether a lovd serves this config. Under systemd ask systemd: connecting to a
    socket-activated socket would start lovd (which would restore on its own)."""
    import shutil
    import socket
    import subprocess

    if shutil.which("systemctl") and os.path.isdir("/run/systemd/system"):
        units = ["lovd.service", "lovd.socket"]
        r = subprocess.run(["systemctl", "is-active", "--quiet", *units], check=False)
        # is-active --quiet is 0 if any is active; 1+ otherwise (or when unknown).
        if r.returncode == 0:
            return True
    with contextlib.suppress(OSError, SystemExit), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(_socket_path(args, cfg))
        return True
    return False


def cmd_restore(args: argparse.Namespace) -> int:
    """Rebuild this host's sessions from PostgreSQL into an empty store (lovd stopped)."""
    import socket

    from lovd.store import Store
    from lovd.sync.restore import RestoreError, restore

    cfg: Config = args.cfg
    if os.geteuid() == 0:
        print("lovd: run lovd restore as the lovd user: runuser -u lovd -- lovd restore",
              file=sys.stderr)  # fmt: skip
        return 1
    if not cfg.postgres_dsn:
        print("lovd: postgres.dsn is not set: there is nothing to restore from", file=sys.stderr)
        return 1
    if _lovd_running(args, cfg):
        print("lovd: lovd is running; stop it first (systemctl stop lovd.service lovd.socket)",
              file=sys.stderr)  # fmt: skip
        return 1
    host_id = cfg.host_id or socket.gethostname()

    async def run() -> int:
        store = await Store.open(cfg.db_path)
        try:
            done = await restore(store, cfg, host_id, new_links=True)
        finally:
            await store.close()
        links = {sid: f"{cfg.public_url.rstrip('/')}/c/{sid}?token={tok}"
                 for sid, tok in done.links.items()}  # fmt: skip
        if args.json:
            print(json.dumps({"host_id": host_id, "restored": done.count, "links": links}))
            return 0
        print(f"restored {done.count} session(s) of host_id {host_id} from PostgreSQL")
        if links:
            print("New links (the old ones no longer work; give each to its session's user):")
            for sid, url in links.items():
                print(f"  {sid}  {url}")
        print("Start lovd now: it re-adopts the containers that still run.")
        return 0

    try:
        return asyncio.run(run())
    except RestoreError as e:
        print(f"lovd: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - psycopg/OS errors: one line, no traceback
        print(f"lovd: restore failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from lovd.doctor import config_report, render, run_checks

    results = config_report(*config_mod.config_path(args.config), [])
    results += asyncio.run(run_checks(args.cfg))
    print(json.dumps([r.as_dict() for r in results], indent=2) if args.json else render(results))
    return 1 if any(r.status == "fail" for r in results) else 0


def doctor_bad_config(args: argparse.Namespace, err: ConfigError) -> int:
    """``lovd doctor`` with settings lovd refuses: report each; the host checks need them."""
    from lovd.doctor import config_report, render

    results = config_report(*config_mod.config_path(args.config), err.problems)
    print(json.dumps([r.as_dict() for r in results], indent=2) if args.json else render(results))
    return EXIT_USAGE


def cmd_image(args: argparse.Namespace) -> int:
    from lovd.images import build

    return build(args.cfg, test=args.test, tag=args.tag)


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from lovd import log
    from lovd.demo import mode

    cfg = dataclasses.replace(args.cfg, demo="on", demo_listen=args.listen)
    log.setup(cfg.log_level)

    async def run() -> None:
        demo = await mode.start(cfg)
        for name, url in demo.urls.items():
            print(f"{name:6} {url}")
        print("(URLs as session containers see them; Ctrl-C stops)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await demo.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"lovd {__version__}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lovd", description=__doc__)
    p.add_argument("--config", help="config file (default $LOVD_CONFIG or /etc/lovd/lovd.conf)")
    p.add_argument("--socket", help="API socket for client commands (default from config)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--listen", help="unix:PATH or tcp:HOST:PORT (overrides config)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("session", help="manage sessions")
    ss = s.add_subparsers(dest="session_cmd", required=True)
    c = ss.add_parser("create", help="create a session and wait until it runs")
    c.add_argument("--no-wait", action="store_true", help="return while it is starting")
    c.add_argument("--json", action="store_true")
    c = ss.add_parser("list", help="list sessions")
    c.add_argument("--json", action="store_true")
    c.add_argument(
        "--all-hosts",
        action="store_true",
        help="every host's sessions from PostgreSQL (read-only), with their host",
    )
    c = ss.add_parser("show", help="show one session with its recent events")
    c.add_argument("id")
    c.add_argument("--json", action="store_true")
    c = ss.add_parser(
        "link", help="a new single-use browser link for a session (the old one stops working)"
    )
    c.add_argument("id")
    c.add_argument("--json", action="store_true")
    c = ss.add_parser(
        "stop", help="stop sessions' containers (workspace kept; a browser request wakes them)"
    )
    c.add_argument("ids", nargs="+", metavar="ID")
    c = ss.add_parser("rm", help="delete sessions")
    c.add_argument("ids", nargs="+", metavar="ID")
    s.set_defaults(fn=cmd_session)

    s = sub.add_parser("cleanup", help="delete expired/dead sessions, stop idle ones")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_cleanup)

    s = sub.add_parser(
        "restore",
        help="rebuild this host's sessions from PostgreSQL into an empty store (lovd stopped); "
        "prints a new link per session",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_restore)

    s = sub.add_parser("doctor", help="check this host for everything lovd needs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_doctor)

    s = sub.add_parser("image", help="session images")
    si = s.add_subparsers(dest="image_cmd", required=True)
    b = si.add_parser("build", help="build the session image (offline-capable)")
    b.add_argument("--test", action="store_true", help="build the tiny test image instead")
    b.add_argument("--tag", help="image tag (default: the configured image)")
    s.set_defaults(fn=cmd_image)

    s = sub.add_parser("demo", help="run the Lovdata MCP and LLM stand-ins in the foreground")
    s.add_argument(
        "--listen",
        default="0.0.0.0",  # noqa: S104 - containers reach the host by its own address
        help="address the stand-ins bind",
    )
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("version", help="print the version")
    s.set_defaults(fn=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.cfg = config_mod.load(args.config)
    except ConfigError as e:
        if args.fn is cmd_doctor:  # the report lists every problem, not just the first
            return doctor_bad_config(args, e)
        print(f"lovd: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    rc: int = args.fn(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
