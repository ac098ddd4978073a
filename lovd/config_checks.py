"""What a setting's value may be: small checks that return a problem, or None when fine.

Each check says what was wrong *and* what is allowed, so ``lovd.conf`` can be fixed from
the message alone; config.py prefixes the key. Checks are pure functions of the value:
cross-setting rules live in config.py.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

Check = Callable[[Any], "str | None"]

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
YEAR = 365 * DAY


def _num(v: float) -> str:
    text = str(int(v)) if v == int(v) else f"{v:g}"
    for unit, name in ((YEAR, "year"), (DAY, "day"), (HOUR, "hour")):
        if v >= unit and v % unit == 0:
            n = int(v // unit)
            return f"{text} ({n} {name}{'s' if n > 1 else ''})"
    return text


def seconds(lo: float, hi: float, *, above: bool = False, zero: str = "") -> Check:
    """A finite duration in [lo, hi] ((lo, hi] with ``above``); ``zero`` names what 0 means
    when 0 is allowed outside the range (e.g. "never")."""
    low = f"more than {_num(lo)}" if above else f"from {_num(lo)}"
    allowed = f"seconds {low} to {_num(hi)}"
    if zero:
        allowed = f"0 ({zero}) or {allowed}"

    def check(v: Any) -> str | None:
        if zero and v == 0:
            return None
        if not math.isfinite(v) or v > hi or (v <= lo if above else v < lo):
            return f"{v!r} is out of range; allowed: {allowed}"
        return None

    return check


def count(lo: int, hi: int, *, zero: str = "", unit: str = "") -> Check:
    """A whole number in [lo, hi]; ``zero`` names what 0 means when lo > 0."""
    allowed = f"{lo} to {hi}{' ' + unit if unit else ''}"
    if zero:
        allowed = f"0 ({zero}) or {allowed}"

    def check(v: Any) -> str | None:
        if zero and v == 0:
            return None
        if not lo <= v <= hi:
            return f"{v!r} is out of range; allowed: {allowed}"
        return None

    return check


def number(lo: float, hi: float, unit: str) -> Check:
    def check(v: Any) -> str | None:
        if not math.isfinite(v) or not lo < v <= hi:
            return f"{v!r} is out of range; allowed: more than {_num(lo)} to {_num(hi)} {unit}"
        return None

    return check


def port(*, zero: str = "") -> Check:
    return count(1, 65535, zero=zero)


def size(parse: Callable[[str], int], lo: int, lo_text: str, *, zero: str = "") -> Check:
    allowed = f"a size like 512M or 4G (K, M, G, T), at least {lo_text}"
    if zero:
        allowed = f"0 ({zero}) or {allowed}"

    def check(v: Any) -> str | None:
        try:
            n = parse(v)
        except ValueError:
            return f"{v!r} is not a size; allowed: {allowed}"
        if (zero and n == 0) or n >= lo:
            return None
        return f"{v!r} is too small; allowed: {allowed}"

    return check


def url(*, empty: bool = False) -> Check:
    """An absolute http(s) URL with a host; ``empty`` allows "" (off)."""

    def check(v: Any) -> str | None:
        if empty and v == "":
            return None
        what = "an http:// or https:// URL with a host name" + (" (or empty)" if empty else "")
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return f"{v!r} is not a URL; allowed: {what}"
        if parts.scheme not in ("http", "https") or not parts.hostname or " " in v:
            return f"{v!r} is not a URL; allowed: {what}"
        if parts.query or parts.fragment or parts.username is not None:
            return f"{v!r}: no query, fragment or user:password@ allowed; allowed: {what}"
        return None

    return check


def _ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ip_address(v: Any) -> str | None:
    if not _ip(v):
        return f"{v!r} is not an IP address; allowed: an IPv4 or IPv6 address (no host names)"
    return None


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


def _host_port(v: str, *, host_required: bool, ip_only: bool) -> str | None:
    """None when ``v`` is HOST:PORT ([IPV6]:PORT), else what is wrong."""
    host, sep, p = v.rpartition(":")
    if not sep or not p.isdigit() or not 0 < int(p) < 65536:
        return "no port 1-65535 after the last ':'"
    if host.startswith("[") and host.endswith("]"):
        return None if _ip(host[1:-1]) and ":" in host else "bad [IPv6] address"
    if not host:
        return "no host before ':'" if host_required else None
    if ip_only:
        return None if _ip(host) and ":" not in host else "host is not an IP address"
    return None if _ip(host) or _HOSTNAME.fullmatch(host) else "host is not a host name"


def host_port(example: str, *, ip_only: bool = False, empty: bool = False) -> Check:
    allowed = f"HOST:PORT like {example}" + (" (or empty)" if empty else "")

    def check(v: Any) -> str | None:
        if empty and v == "":
            return None
        why = _host_port(v, host_required=True, ip_only=ip_only)
        return f"{v!r}: {why}; allowed: {allowed}" if why else None

    return check


def listen(v: Any) -> str | None:
    """lovd's API: unix:PATH or tcp:HOST:PORT."""
    allowed = "unix:/ABSOLUTE/PATH or tcp:HOST:PORT (e.g. tcp:127.0.0.1:8080)"
    kind, _, where = v.partition(":")
    if kind == "unix" and where.startswith("/"):
        return None
    if kind == "tcp" and not _host_port(where, host_required=False, ip_only=True):
        return None
    return f"{v!r} is not a listen address; allowed: {allowed}"


def caddy_admin(v: Any) -> str | None:
    allowed = "unix//ABSOLUTE/PATH or HOST:PORT (e.g. localhost:2019), or empty (off)"
    if v == "" or (v.startswith("unix//") and len(v) > 6):
        return None
    if not _host_port(v.removeprefix("tcp/"), host_required=True, ip_only=False):
        return None
    return f"{v!r} is not Caddy's admin address; allowed: {allowed}"


def caddy_listen(v: Any) -> str | None:
    """Caddy network addresses: [tcp/|tcp4/|tcp6/][HOST]:PORT[-PORT], or unix//PATH."""
    allowed = "a list of at least one address like ':80', ':443' or '127.0.0.1:8080'"
    if not v:
        return f"empty list; allowed: {allowed}"
    for entry in v:
        if entry.startswith("unix//") and len(entry) > 6:
            continue
        addr = re.sub(r"^(tcp|tcp4|tcp6)/", "", entry)
        host, sep, ports = addr.rpartition(":")
        lo, _, hi = ports.partition("-")
        ok = sep and lo.isdigit() and 0 < int(lo) < 65536
        ok = ok and (not hi or (hi.isdigit() and int(lo) <= int(hi) < 65536))
        ok = ok and (not host or _ip(host.strip("[]")) or bool(_HOSTNAME.fullmatch(host)))
        if not ok:
            return f"{entry!r} is not a Caddy listen address; allowed: {allowed}"
    return None


def absolute_path(*, empty: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if (empty and v == "") or v.startswith("/"):
            return None
        return f"{v!r} is not an absolute path" + ("; allowed: /PATH or empty" if empty else "")

    return check


def non_empty(v: Any) -> str | None:
    return None if v.strip() else "must not be empty"


def word(v: Any) -> str | None:
    """Non-empty, no whitespace: image references, binaries, names."""
    if not v or any(c.isspace() for c in v):
        return f"{v!r}: allowed: a non-empty value without spaces"
    return None


def no_control(v: Any) -> str | None:
    """No newline, NUL, …: values end up in env files, headers and unit properties."""
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        return "contains a control character (newline, tab, NUL, …); allowed: printable text"
    return None


def each(check: Check, *, at_least: int = 0) -> Check:
    """Every entry of a list passes ``check``."""

    def run(v: Any) -> str | None:
        if len(v) < at_least:
            return f"at least {at_least} entr{'y' if at_least == 1 else 'ies'} needed"
        for entry in v:
            problem = check(entry)
            if problem:
                return problem
        return None

    return run


def both(*checks: Check) -> Check:
    def run(v: Any) -> str | None:
        for c in checks:
            problem = c(v)
            if problem:
                return problem
        return None

    return run
