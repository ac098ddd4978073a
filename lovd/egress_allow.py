"""The syntax of ``egress.allow`` entries: parsed here, turned into nftables rules in egress.py.

A ground-floor module (nothing of lovd's imported) so config.py validates the setting
with the very parser egress.py uses, without config and egress importing each other.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressError(Exception):
    """The egress settings cannot be turned into rules (the message names the key)."""


@dataclass(frozen=True)
class Allow:
    """One ``egress.allow`` entry: a network, optionally one port (TCP and UDP)."""

    network: IPNetwork
    port: int | None = None

    def rule(self) -> str:
        family = "ip" if self.network.version == 4 else "ip6"
        addr = (
            str(self.network.network_address)
            if self.network.num_addresses == 1
            else str(self.network)
        )
        if self.port is None:
            return f"{family} daddr {addr} accept"
        return f"{family} daddr {addr} meta l4proto {{ tcp, udp }} th dport {self.port} accept"


def _network(text: str, entry: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "/" in text and "has host bits set" in str(e):
            hint = ipaddress.ip_network(text, strict=False)
            raise EgressError(f"egress.allow: {entry!r} has host bits set (meant {hint}?)") from e
        raise EgressError(
            f"egress.allow: {entry!r} is not ADDRESS:PORT, ADDRESS or CIDR "
            "(host names are not resolved: give the address; IPv6 with a port as [ADDR]:PORT)"
        ) from e


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise EgressError(f"egress.allow: {entry!r}: port must be 1-65535")
    return int(text)


def parse_allow(entry: str) -> Allow:
    """``ADDR``, ``ADDR:PORT``, ``CIDR``, ``CIDR:PORT``; IPv6 with a port as ``[ADDR]:PORT``."""
    text = entry.strip()
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise EgressError(f"egress.allow: {entry!r}: expected [IPV6]:PORT")
        return Allow(_network(addr, entry), _port(rest[1:], entry) if rest else None)
    if text.count(":") == 1:  # IPv4 with a port (a bare IPv6 address has several colons)
        addr, _, port = text.partition(":")
        return Allow(_network(addr, entry), _port(port, entry))
    return Allow(_network(text, entry), None)
