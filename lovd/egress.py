"""Session egress: a session container reaches lovd's broker (and ``egress.allow``), nothing else.

Mechanism. Every ``podman run`` of a session carries podman's global ``--hooks-dir``
pointing at ``<runtime dir>/egress/hooks.d``, whose one OCI hook runs at the
``createRuntime`` stage: after the runtime has created the container's namespaces,
before the container's process starts. The hook loads ``rules.nft`` (rendered here from
the config) into the container's own network namespace with ``nsenter --net nft -f``.
So there is no moment in which a session runs unfiltered, every (re)start — lovd's, or a
systemd ``Restart=`` while lovd is down — gets the rules, and the rules live in the
container's namespace, untouched by a lovd restart. The hook runs as root of the lovd
user's rootless user namespace, whose capabilities extend to the container's network
namespace; the session's own process (uid 1000, no capabilities, no-new-privileges)
cannot undo the rules. Measured: ~6 ms per container start (sh, nsenter, nft).

It fails closed: a hook that cannot load the rules exits non-zero, so the runtime
refuses to start the container, and Podman's error carries the hook's one-line reason.

Podman silently ignores a ``--hooks-dir`` that does not exist (verified on Podman
4.3.1), so :func:`ensure` re-checks the files before every start that names the dir.

Nothing here is secret: the rule set is what any session can discover by probing.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
from pathlib import Path

from lovd.config import Config

# The entry syntax lives in a ground-floor module so config.py can validate it without
# importing this one (which needs Config): no import circle. Re-exported: callers catch
# egress.EgressError.
from lovd.egress_allow import EgressError as EgressError  # noqa: PLC0414
from lovd.egress_allow import parse_allow as parse_allow  # noqa: PLC0414
from lovd.errors import LovdError

log = logging.getLogger(__name__)

TABLE = "lovd_egress"
HOOK_NAME = "lovd-egress.json"
# The hook's own PATH: runtimes run hooks with exactly the environment the hook file
# names (none by default), and the lovd user's login PATH often lacks the sbin dirs.
HOOK_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOOK_TIMEOUT = 10  # seconds; a hung nft must not hang the container start forever
# createRuntime: runtime namespace, after the container's namespaces exist, before
# pivot_root and the container's process (OCI runtime-spec config.md#posix-platform-hooks).
HOOK_STAGE = "createRuntime"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# POSIX sh, run as `/bin/sh hook.sh RULES` (so a noexec runtime dir is fine). It runs on
# every container start, so: no interpreter start-up, no JSON library, builtins only
# besides nsenter and nft. The OCI state on stdin is the runtime's own encoding, whose
# first "pid" key is the state's: runc writes ociVersion, id, status, pid, bundle, then
# the annotations (the only free-form part, and set by lovd's podman run anyway).
HOOK_SCRIPT = r"""# lovd session egress hook (written by lovd; see lovd/egress.py).
# OCI createRuntime hook: loads lovd's nftables rules into the new container's network
# namespace before its process starts. A non-zero exit stops the container from starting.
fail() { printf 'lovd-egress: %s\n' "$*" >&2; exit 1; }
rules=$1
state=
while IFS= read -r line || [ -n "$line" ]; do state=$state$line; done
pid=${state#*\"pid\":}
pid=${pid# }
pid=${pid%%[!0-9]*}
[ -n "$pid" ] && [ "$pid" -gt 1 ] || fail "no container pid in the OCI state"
command -v nft >/dev/null 2>&1 ||
    fail "nft not found: install nftables (apt-get install nftables) or set egress.enforce: false"
command -v nsenter >/dev/null 2>&1 || fail "nsenter not found: install util-linux"
[ -r "$rules" ] || fail "rules file $rules missing: restart lovd (it writes the file)"
if ! err=$(nsenter --target "$pid" --net nft -f "$rules" 2>&1); then
    fail "nft could not load $rules into the container's network namespace:" \
        "$(printf '%s' "$err" | tr '\n' ' ')"
fi
"""


def _gateway(config: Config) -> IPAddress:
    try:
        return ipaddress.ip_address(config.host_gateway)
    except ValueError as e:
        raise EgressError(
            f"host_gateway: {config.host_gateway!r} is not an IP address (egress rules need one)"
        ) from e


def render_rules(config: Config) -> str:
    """The nftables script the hook loads into each session's network namespace.

    Output only: inbound connections to the published port are answered through
    ``ct state established``. Everything not accepted is rejected at once (TCP reset,
    ICMP admin-prohibited) rather than silently dropped, so a blocked lookup or fetch
    inside OpenCode fails in a millisecond instead of hanging until its own timeout;
    the chain's policy is still drop."""
    gw = _gateway(config)
    family = "ip" if gw.version == 4 else "ip6"
    allow = [parse_allow(e) for e in config.egress_allow]
    rules = [
        'oif "lo" accept',
        "ct state established,related accept",
        f"{family} daddr {gw} tcp dport {config.broker_port} accept",
        *(a.rule() for a in allow),
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx admin-prohibited",
    ]
    body = "".join(f"\t\t{r}\n" for r in rules)
    return (
        "# lovd session egress rules (generated from lovd.conf; see lovd/egress.py).\n"
        "# The namespace is the container's own and new: nothing in it but these rules.\n"
        "# (flush, not create-then-delete of the table: deleting a table costs ~12 ms.)\n"
        "flush ruleset\n"
        f"table inet {TABLE} {{\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy drop;\n"
        f"{body}"
        "\t}\n"
        "}\n"
    )


def hook_json(directory: Path, search_path: str) -> str:
    """Podman's hook file (oci-hooks(5), version 1.0.0)."""
    hook = {
        "version": "1.0.0",
        "hook": {
            "path": "/bin/sh",
            "args": ["sh", str(directory / "hook.sh"), str(directory / "rules.nft")],
            "env": [f"PATH={search_path}"],
            "timeout": HOOK_TIMEOUT,
        },
        # Only lovd's own `podman run`s name this hooks dir, so every container it sees
        # is a session.
        "when": {"always": True},
        "stages": [HOOK_STAGE],
    }
    return json.dumps(hook, indent=2) + "\n"


def directory(config: Config) -> Path:
    """Per broker port: two lovd instances sharing a runtime dir (they cannot share a
    port) must never load each other's rules into their containers."""
    return config.secrets_path / f"egress-{config.broker_port}"


def hooks_dir(config: Config) -> Path:
    return directory(config) / "hooks.d"


def _files(config: Config, search_path: str) -> dict[Path, str]:
    d = directory(config)
    return {
        d / "rules.nft": render_rules(config),
        d / "hook.sh": HOOK_SCRIPT,
        d / "hooks.d" / HOOK_NAME: hook_json(d, search_path),
    }


def _write(path: Path, text: str) -> None:
    # Atomic: a container starting meanwhile reads the old file or the new one.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)


def _sync(config: Config, search_path: str) -> bool:
    """Make the files on disk what the config says; True if anything was (re)written."""
    changed = False
    d = directory(config)
    d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.mkdir(mode=0o700, exist_ok=True)
    (d / "hooks.d").mkdir(mode=0o700, exist_ok=True)
    for path, text in _files(config, search_path).items():
        try:
            same = path.read_text() == text
        except FileNotFoundError:
            same = False
        if not same:
            _write(path, text)
            changed = True
    return changed


def install(config: Config, search_path: str | None = None) -> Path | None:
    """At daemon start: write the hook, its script and the rules (or remove them when
    ``egress.enforce`` is off). Returns the hooks dir, or None when not enforced."""
    if not config.egress_enforce:
        shutil.rmtree(directory(config), ignore_errors=True)
        log.warning(
            "egress.enforce is false: session containers can reach every service on the "
            "host's loopback, other sessions' ports and the network"
        )
        return None
    search_path = search_path or HOOK_SEARCH_PATH
    try:
        _sync(config, search_path)
    except OSError as e:
        raise EgressError(f"egress: cannot write {directory(config)}: {e.strerror}") from e
    if not nft_path(search_path):
        log.warning("egress: nft not found; sessions will not start (apt-get install nftables)")
    log.info(
        "egress rules in force for new session containers (hook in %s): broker %s:%d, "
        "%d egress.allow entries",
        hooks_dir(config),
        config.host_gateway,
        config.broker_port,
        len(config.egress_allow),
    )
    return hooks_dir(config)


def ensure(config: Config) -> Path | None:
    """Before every start: the hooks dir a spec names must exist, or Podman would start
    the container without the hook. Cheap when nothing changed (reads three small files)."""
    if not config.egress_enforce:
        return None
    try:
        if _sync(config, HOOK_SEARCH_PATH):
            log.warning(
                "egress hook files were missing or changed in %s; rewrote them", directory(config)
            )
    except (OSError, EgressError) as e:
        raise LovdError(
            "runner-failed", f"egress: cannot write the hook in {directory(config)}: {e}"
        ) from e
    if not nft_path():
        # The hook would refuse the container anyway; say why here, where the runner's
        # own error (systemd-run's exit status) would not.
        raise LovdError(
            "unavailable",
            "egress rules cannot be applied: nft is not installed on this host; install "
            "nftables (apt-get install nftables) or set egress.enforce: false",
        )
    return hooks_dir(config)


def nft_path(search_path: str | None = None) -> str | None:
    """The nft the hook will find (it searches HOOK_SEARCH_PATH, not the caller's PATH)."""
    return shutil.which("nft", path=search_path or HOOK_SEARCH_PATH)


def summary(config: Config) -> str:
    extra = f" and {len(config.egress_allow)} egress.allow entries" if config.egress_allow else ""
    return f"sessions reach {config.host_gateway}:{config.broker_port} (broker){extra} only"
