"""Typed settings loaded from YAML (``lovd.conf``) and the environment.

Every setting is one dataclass field whose metadata carries its YAML key (dotted
path into nested mappings) and its help text; ``lovd.conf.example`` is checked
against this list by the test suite, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lovd import config_checks as checks
from lovd.egress_allow import EgressError, parse_allow

DEFAULT_CONFIG_PATH = "/etc/lovd/lovd.conf"
# expires_at of a session that never expires (session_ttl 0): 9999-12-31T23:59:59Z, the
# last second every consumer (ISO dates, PostgreSQL timestamptz, cookies) can represent.
NEVER = 253402300799.0


class ConfigError(Exception):
    """A configuration problem the operator must fix; the message names the key.

    ``problems`` holds every problem found (lovd doctor lists them); the message is the
    first, on one line."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        more = len(problems) - 1
        tail = f" (and {more} more: lovd doctor lists them all)" if more else ""
        return cls(problems[0] + tail, problems)


def setting(key: str, default: Any, help: str) -> Any:
    meta = {"key": key, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    # --- daemon ---
    listen: str = setting(
        "listen",
        "unix:/run/lovd/api.sock",
        "Where the API listens when not socket-activated: unix:PATH or tcp:HOST:PORT.",
    )
    state_dir: str = setting(
        "state_dir",
        "/var/lib/lovd",
        "Database, session workspaces and the host key live here (systemd StateDirectory).",
    )
    runtime_dir: str = setting(
        "runtime_dir",
        "",
        "Per-session secret files and sockets (should be a tmpfs). Empty: "
        "$RUNTIME_DIRECTORY (systemd), else $XDG_RUNTIME_DIR/lovd, else <state_dir>/run.",
    )
    public_url: str = setting(
        "public_url",
        "http://localhost",
        "Base URL browsers use to reach Caddy (http:// or https:// and a host name); "
        "session links are <public_url>/c/<id>.",
    )
    log_level: str = setting("log_level", "info", "debug, info, warning or error.")
    idle_exit: float = setting(
        "idle_exit",
        0.0,
        "Seconds without API requests after which a socket-activated lovd exits (0: never). "
        "Sessions keep running; the next connection starts lovd again.",
    )
    watchdog: bool = setting(
        "watchdog", True, "Send WATCHDOG=1 to systemd when WatchdogSec= is set on the unit."
    )
    max_body: int = setting(
        "max_body", 65536, "Largest accepted request body in bytes; larger bodies get 413."
    )
    host_id: str = setting(
        "host_id",
        "",
        "Name of this host in shared state (PostgreSQL). Empty: the machine's hostname.",
    )

    # --- containers ---
    runner: str = setting(
        "runner",
        "auto",
        "auto, systemd or podman. systemd runs each container as a transient unit of the "
        "lovd user's systemd manager; podman runs podman directly; auto picks systemd when "
        "a user manager is reachable.",
    )
    podman: str = setting("podman.binary", "podman", "The podman executable.")
    podman_socket: str = setting(
        "podman.socket",
        "",
        "Podman API socket for listing/inspecting containers. Empty: "
        "$XDG_RUNTIME_DIR/podman/podman.sock when it exists, else the podman CLI.",
    )
    image: str = setting(
        "image", "localhost/lovd-session:latest", "Session container image (lovd image build)."
    )
    container_port: int = setting(
        "container_port", 4096, "Port the session server listens on inside the container."
    )
    container_user: str = setting(
        "container_user",
        "1000",
        "User the container's process runs as (podman --user); the session secret is owned "
        "by it. lovd's images run as uid 1000. Empty: the image's default user (secret "
        "then owned by container root).",
    )
    health_path: str = setting(
        "health_path", "/global/health", "HTTP path probed for readiness and health."
    )
    port_range: str = setting(
        "port_range",
        "20000-29999",
        "Host loopback ports published for session containers (127.0.0.1 only).",
    )
    userns: str = setting(
        "userns",
        "auto",
        "podman --userns for session containers. 'auto' gives each container its own "
        "subordinate id range (never keep-id: that maps the container onto lovd itself).",
    )
    extra_run_args: list[str] = setting(
        "extra_run_args", [], "Additional podman run arguments (no secrets: argv is public)."
    )
    host_gateway: str = setting(
        "host_gateway",
        "10.0.2.2",
        "Address session containers use to reach lovd's credential broker on the host. "
        "10.0.2.2 is the host's loopback under session_network (slirp4netns with "
        "allow_host_loopback).",
    )
    session_network: str = setting(
        "session_network",
        "slirp4netns:allow_host_loopback=true",
        "podman --network for session containers. It must let a session reach "
        "host_gateway, where the broker listens on the host's loopback; the egress rules "
        "(egress.*) then allow that one port and nothing else.",
    )

    # --- limits and lifecycle ---
    memory_max: str = setting(
        "limits.memory",
        "4G",
        "Memory limit per session (MemoryMax=): a size with K, M, G or T, at least 64M.",
    )
    cpus: float = setting("limits.cpus", 1.0, "CPU limit per session, in CPUs (CPUQuota=).")
    tasks_max: int = setting("limits.tasks", 512, "Process/thread limit per session (TasksMax=).")
    limits_enforce: bool = setting(
        "limits.enforce",
        True,
        "Refuse to start sessions (503) where the host cannot enforce limits.memory, "
        "limits.cpus and limits.tasks for the lovd user (cgroup v2 with the memory, cpu and "
        "pids controllers delegated to its user manager; lovd doctor says which are). "
        "false: start them anyway, without the missing limits (logged at start, shown by "
        "lovd doctor).",
    )
    disk_max: str = setting(
        "limits.disk",
        "1G",
        "Disk quota per session: its workspace and chat database (512M, 1G, ...; 0: none). "
        "Reached: new prompts are refused with a message in the chat, the history stays.",
    )
    max_running: int = setting(
        "limits.max_running", 3, "Sessions that may run at once; more get 429 + Retry-After."
    )
    warm_pool: int = setting(
        "warm_pool",
        1,
        "Session containers kept started and ready ahead of demand, so POST /api/sessions "
        "hands one out at once instead of waiting seconds for OpenCode to boot. They use "
        "free places only (running + warm never exceeds limits.max_running) and give "
        "theirs up when a session needs it. 0 turns the pool off.",
    )
    warm_max_age: float = setting(
        "warm_max_age",
        3600.0,
        "Seconds after which an unclaimed warm container is replaced, so a rebuilt image "
        "or changed settings reach new sessions.",
    )
    warm_refill_delay: float = setting(
        "warm_refill_delay",
        5.0,
        "Seconds the warm pool waits after a container was claimed before it starts the "
        "next one: booting OpenCode takes seconds of CPU, which would otherwise slow the "
        "claimed chat's first page. 0: at once.",
    )
    ready_timeout: float = setting(
        "ready_timeout",
        60.0,
        "Seconds a starting session may take to answer its health path (1 to 3600).",
    )
    stop_timeout: int = setting(
        "stop_timeout",
        5,
        "Seconds podman waits after SIGTERM before SIGKILL (0 to 3600; 0: SIGKILL at once).",
    )
    idle_timeout: float = setting(
        "idle_timeout", 3600.0, "Seconds without activity before a session is stopped (0: never)."
    )
    session_ttl: float = setting(
        "session_ttl",
        86400.0,
        "Seconds after creation at which a session is deleted, whatever its state "
        "(with its workspace and chat history). 0: never (like every 0 among the "
        "timeouts: the limit is off).",
    )
    delete_after: float = setting(
        "delete_after",
        86400.0,
        "Seconds a stopped, failed or idle-stopped session (its workspace and chat history) "
        "is kept after it stopped; until then it wakes on its user's next request. Nothing "
        "else deletes a session but this, session_ttl and an explicit delete. 0: never "
        "(the session is kept until session_ttl or an explicit delete).",
    )
    orphan_grace: float = setting(
        "orphan_grace",
        60.0,
        "Seconds a labelled container without a session row may live before removal "
        "(protects containers whose row is still being written). 0: no grace, removed at "
        "the next reconcile.",
    )
    health_interval: float = setting(
        "health.interval",
        30.0,
        "Seconds between health probes of running sessions (the health path, with "
        "health.probe_timeout); each pass also reconciles containers with the store "
        "(1 to 3600: each pass runs podman ps).",
    )
    probe_timeout: float = setting(
        "health.probe_timeout",
        2.0,
        "Seconds a health probe may take before it counts as failed (a hung server).",
    )
    health_failures: int = setting(
        "health.failures",
        3,
        "Consecutive failed probes after which a running session's container is restarted "
        "(same session id, workspace, port and token).",
    )
    restart_attempts: int = setting(
        "health.restart_attempts",
        3,
        "Restarts (after failed probes, or of a crashed container) allowed within "
        "health.restart_window; one more failure and the session is failed (its workspace "
        "is kept and it wakes on its user's next request).",
    )
    restart_window: float = setting(
        "health.restart_window",
        600.0,
        "Seconds over which health.restart_attempts counts.",
    )
    health_history: int = setting(
        "health.history",
        50,
        "Probe results kept per session (GET /api/sessions/{id}/health, lovd session show).",
    )
    disk_floor: str = setting(
        "floors.disk_free",
        "1G",
        "New sessions are refused (503 + Retry-After) while the filesystem of state_dir "
        "has less free space than this (K, M, G suffixes); running sessions are not "
        "touched. 0: no floor.",
    )
    memory_floor: str = setting(
        "floors.memory_free",
        "1G",
        "New sessions are refused (503 + Retry-After) while the host has less available "
        "memory than this (MemAvailable). 0: no floor.",
    )

    # --- legal research session ---
    mcp_lovdata_url: str = setting(
        "mcp.lovdata.url",
        "",
        "Lovdata MCP server URL (streamable HTTP). Empty: demo stand-in when demo is on.",
    )
    mcp_lovdata_token: str = setting(
        "mcp.lovdata.token", "", "Bearer token for the Lovdata MCP server (secret)."
    )
    sequential_thinking: bool = setting(
        "mcp.sequential_thinking", False, "Enable the local sequential-thinking MCP server."
    )
    model: str = setting(
        "llm.model", "", "Default model, provider/model. Empty: the demo stub when demo is on."
    )
    models: list[str] = setting(
        "llm.models",
        [],
        "Further models (provider/model) a session may use besides llm.model. A session can "
        "use llm.model and these, nothing else: OpenCode lists only them, and the gate and "
        "the broker refuse any other model in a request.",
    )
    llm_base_url: str = setting(
        "llm.base_url", "", "OpenAI-compatible endpoint for the 'lovd' provider."
    )
    llm_api_key: str = setting("llm.api_key", "", "API key for llm.base_url (secret).")
    openai_api_key: str = setting("llm.openai_api_key", "", "OpenAI API key (secret).")
    anthropic_api_key: str = setting("llm.anthropic_api_key", "", "Anthropic API key (secret).")
    google_api_key: str = setting("llm.google_api_key", "", "Google AI API key (secret).")
    openai_base_url: str = setting(
        "llm.openai_base_url", "https://api.openai.com/v1", "Where the broker sends OpenAI calls."
    )
    anthropic_base_url: str = setting(
        "llm.anthropic_base_url",
        "https://api.anthropic.com/v1",
        "Where the broker sends Anthropic calls.",
    )
    google_base_url: str = setting(
        "llm.google_base_url",
        "https://generativelanguage.googleapis.com/v1beta",
        "Where the broker sends Google AI calls.",
    )
    max_tokens_per_session: int = setting(
        "llm.max_tokens_per_session",
        0,
        "LLM tokens (input + output, from the providers' usage fields) one session may use "
        "in its lifetime; past it the broker refuses further LLM calls with a message the "
        "chat shows. 0: no cap.",
    )
    max_tokens_per_day: int = setting(
        "llm.max_tokens_per_day",
        0,
        "LLM tokens all sessions of this host may use per UTC day; past it the broker "
        "refuses further LLM calls until midnight UTC. 0: no cap.",
    )
    max_output_tokens: int = setting(
        "llm.max_output_tokens",
        16384,
        "Output bound the broker sets on an LLM request that names none (max_tokens, "
        "max_completion_tokens, max_output_tokens, maxOutputTokens). Every call reserves its "
        "output bound plus an estimate of its input against the token caps before it goes.",
    )
    permissions_deny: list[str] = setting(
        "llm.deny_tools",
        ["bash", "edit", "webfetch"],
        "OpenCode tools a legal chat does not need; denied in every session.",
    )
    demo: str = setting(
        "demo",
        "auto",
        "auto, on or off. Demo mode starts the Lovdata MCP and LLM stand-ins on the host's "
        "loopback and puts them behind the broker; auto turns it on when no MCP URL and no "
        "LLM key is configured.",
    )
    demo_corpus: str = setting(
        "demo_corpus", "", "Statute corpus JSON for the Lovdata stand-in. Empty: bundled fixture."
    )
    demo_mcp_port: int = setting(
        "demo_mcp_port", 18765, "Port of the Lovdata MCP stand-in (0: any free port)."
    )
    demo_llm_port: int = setting("demo_llm_port", 18766, "Port of the stub LLM (0: any free port).")
    demo_listen: str = setting(
        "demo_listen",
        "127.0.0.1",
        "Address the demo stand-ins bind. Loopback keeps them off the network; sessions "
        "reach them only through the broker.",
    )
    unused_timeout: float = setting(
        "unused_timeout",
        300.0,
        "Seconds a session may run without a single chat request before it is stopped to "
        "give its place back (it wakes again when its page is loaded or a prompt is sent, "
        "never for a poll; 0: never). Keeps abandoned or scripted starts from holding "
        "every place.",
    )

    # --- the credential broker and session egress ---
    broker_listen: str = setting(
        "broker.listen",
        "127.0.0.1:18780",
        "HOST:PORT of the credential broker, on the host's loopback. Sessions call the LLM "
        "providers and the Lovdata MCP server through it (at host_gateway:PORT) with a "
        "per-session credential; the broker adds the real keys, which never enter a "
        "container.",
    )
    broker_max_body: str = setting(
        "broker.max_body",
        "8M",
        "Largest request body the broker accepts from a session (checked as it arrives; "
        "larger ones get 413). A whole conversation with its attachments is one body.",
    )
    broker_body_memory: str = setting(
        "broker.body_memory",
        "256M",
        "Request-body bytes the broker holds in memory at once, all sessions together "
        "(one session: two bodies of broker.max_body); past it requests get 503.",
    )
    broker_session_requests: int = setting(
        "broker.session_requests",
        16,
        "Requests one session may have in flight at the broker at once (LLM and MCP); "
        "more get 429.",
    )
    broker_session_concurrency: int = setting(
        "broker.session_concurrency",
        2,
        "LLM calls one session may have running at once; further ones wait their turn, so "
        "parallel calls cannot overshoot a token cap.",
    )
    broker_read_timeout: float = setting(
        "broker.read_timeout",
        30.0,
        "Seconds a connection to the broker has to send its request's head (from opening) "
        "and then its body; slower ones are closed. Each call has a connection of its own.",
    )
    broker_max_connections: int = setting(
        "broker.max_connections",
        1024,
        "Connections to the broker open at once, all sessions together; more are answered "
        "503 and closed.",
    )
    egress_enforce: bool = setting(
        "egress.enforce",
        True,
        "Apply egress rules inside every session's network namespace (nftables, through an "
        "OCI hook) so a session reaches the broker and egress.allow only. With true, a "
        "session whose rules cannot be applied does not start. false: no rules (lovd "
        "doctor warns).",
    )
    egress_allow: list[str] = setting(
        "egress.allow",
        [],
        "Further destinations sessions may reach, as ADDRESS:PORT, ADDRESS or CIDR "
        "(e.g. an internal package mirror). Empty: the broker only.",
    )

    # --- Caddy and the browser path ---
    caddy_admin: str = setting(
        "caddy.admin",
        "unix//run/caddy/admin.sock",
        "Caddy's admin API: unix//PATH or HOST:PORT. lovd pushes its one server there and "
        "re-pushes it when Caddy restarts. Empty: lovd does not manage Caddy.",
    )
    caddy_listen: list[str] = setting(
        "caddy.listen",
        [":80"],
        "Addresses of the public site in Caddy (e.g. ':443' with an https public_url, whose "
        "host name then gets a managed certificate).",
    )
    caddy_server: str = setting(
        "caddy.server",
        "lovd",
        "Name and @id of lovd's server in Caddy's config; lovd touches nothing else.",
    )
    caddy_auth_socket: str = setting(
        "caddy.auth_socket",
        "",
        "Unix socket where lovd serves Caddy: forward_auth, landing page, session start. "
        "Separate from the API socket so Caddy never reaches the operator API. "
        "Empty: auth.sock next to the API socket (/run/lovd/auth.sock by default).",
    )
    caddy_check_interval: float = setting(
        "caddy.check_interval",
        1.0,
        "Seconds between checks that lovd's server is still in Caddy's config.",
    )
    caddy_tls: bool = setting(
        "caddy.tls",
        False,
        "Serve the site over HTTPS (HTTP/2) on caddy.listen with the certificates Caddy "
        "already has loaded (your Caddy config's tls app: load_files/load_pem or "
        "automation), for hosts without a public name (e.g. listen [':443'] and public_url "
        "https://10.0.0.5). With an https public_url whose host is a public name, Caddy "
        "manages the certificate and this is not needed.",
    )
    browser_start_limit: int = setting(
        "browser.start_limit",
        5,
        "Sessions one client address may start from the landing page per start_window.",
    )
    browser_max_running_per_client: int = setting(
        "browser.max_running_per_client",
        2,
        "Running sessions one client address (an IPv6 /64 counts as one) may hold, "
        "started or woken from the browser; more get the landing page's refusal with 429 "
        "+ Retry-After (0: no such limit). The operator API is not limited by it.",
    )
    browser_start_window: float = setting(
        "browser.start_window", 600.0, "Seconds over which browser.start_limit counts."
    )
    browser_auth_failures: int = setting(
        "browser.auth_failures",
        10,
        "Failed session-cookie/link checks one client address may make per "
        "auth_failure_window before it gets 429.",
    )
    browser_auth_failure_window: float = setting(
        "browser.auth_failure_window", 60.0, "Seconds over which browser.auth_failures counts."
    )

    # --- PostgreSQL sync (lovd/sync/) ---
    postgres_dsn: str = setting(
        "postgres.dsn",
        "",
        "libpq connection string or URI of the PostgreSQL database every host syncs its "
        "sessions to (e.g. 'host=db.internal dbname=lovd user=lovd'). Empty: no sync. A "
        "password belongs here or, better, in a libpq passfile the DSN names "
        "(passfile=/etc/lovd/pgpass, mode 0600, owned by lovd); never in the environment "
        "of other processes. lovd creates and migrates its own tables (lovd_*).",
    )
    postgres_pool_size: int = setting(
        "postgres.pool_size",
        3,
        "PostgreSQL connections lovd may hold: one for the relay, the rest for cross-host "
        "reads (scope=all, ownership checks, browser routing).",
    )
    postgres_batch: int = setting(
        "postgres.batch", 500, "Outbox rows the relay applies per PostgreSQL transaction."
    )
    postgres_connect_timeout: float = setting(
        "postgres.connect_timeout", 3.0, "Seconds to wait for a PostgreSQL connection."
    )
    postgres_timeout: float = setting(
        "postgres.timeout",
        30.0,
        "Seconds one relay pass (a batch's transaction) may take before it is abandoned, "
        "its connection closed and the batch retried later: PostgreSQL hanging, or a "
        "network partition. psycopg may add up to 10 s trying to cancel the query.",
    )
    postgres_read_timeout: float = setting(
        "postgres.read_timeout",
        2.0,
        "Seconds a request that reads PostgreSQL (GET /api/sessions?scope=all) waits before "
        "it gets a 503 saying PostgreSQL is unavailable.",
    )
    postgres_max_backoff: float = setting(
        "postgres.max_backoff",
        5.0,
        "Longest pause, in seconds, between reconnection attempts while PostgreSQL is "
        "unreachable (the pause doubles from 0.2 s up to this). Changes queue in SQLite "
        "meanwhile; the API never waits for PostgreSQL.",
    )
    postgres_heartbeat_interval: float = setting(
        "postgres.heartbeat_interval",
        5.0,
        "Seconds between this host's heartbeats in lovd_hosts when there is nothing to sync.",
    )
    postgres_host_stale_after: float = setting(
        "postgres.host_stale_after",
        30.0,
        "A host whose last heartbeat is older than this many seconds is shown as not alive "
        "(scope=all, lovd doctor). Browser traffic for its sessions is still sent to it: "
        "its lovd may only have exited when idle.",
    )
    postgres_retention: float = setting(
        "postgres.retention",
        604800.0,
        "Seconds PostgreSQL keeps session events and the tombstones of deleted sessions "
        "(default 7 days); older ones are pruned.",
    )
    postgres_upstream: str = setting(
        "postgres.upstream",
        "",
        "HOST:PORT where a front Caddy on another host reaches this host's own Caddy site, "
        "published in lovd_hosts for browser routing across hosts (see the README). Empty: "
        "browsers reach this host's sessions only through its own Caddy.",
    )
    restore_on_start: bool = setting(
        "postgres.restore_on_start",
        True,
        "When lovd starts with a brand-new empty SQLite store and PostgreSQL holds live "
        "sessions for this host_id, rebuild them from PostgreSQL and re-adopt their "
        "containers (their old links stop working: see 'lovd restore').",
    )

    # --- derived helpers ---
    def expires_at(self, now: float) -> float:
        """When a session created (or claimed) at ``now`` expires: session_ttl 0 is never."""
        return now + self.session_ttl if self.session_ttl else NEVER

    def allowed_models(self, demo_model: str = "") -> frozenset[str]:
        """Every "provider/model" a session may use: llm.model (or demo mode's stub) and
        llm.models."""
        return frozenset(m for m in (self.model or demo_model, *self.models) if m)

    @property
    def disk_quota(self) -> int:
        """limits.disk in bytes (0: no quota)."""
        return parse_size(self.disk_max)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def db_path(self) -> Path:
        return self.state_path / "lovd.db"

    @property
    def sessions_path(self) -> Path:
        return self.state_path / "sessions"

    @property
    def secrets_path(self) -> Path:
        """Runtime files (session secrets, sockets): tmpfs wherever one is available."""
        if self.runtime_dir:
            return Path(self.runtime_dir)
        systemd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if systemd:
            return Path(systemd)
        xdg = os.environ.get("XDG_RUNTIME_DIR", "")
        return Path(xdg) / "lovd" if xdg else self.state_path / "run"

    @property
    def broker_port(self) -> int:
        return int(self.broker_listen.rpartition(":")[2])

    @property
    def broker_host(self) -> str:
        return self.broker_listen.rpartition(":")[0].strip("[]")

    @property
    def ports(self) -> range:
        lo, _, hi = self.port_range.partition("-")
        return range(int(lo), int(hi) + 1)


@dataclass(frozen=True)
class Setting:
    key: str
    attr: str
    default: Any
    help: str
    type: type


def settings() -> Iterator[Setting]:
    for f in dataclasses.fields(Config):
        factory = f.default_factory
        default = factory() if factory is not dataclasses.MISSING else f.default
        yield Setting(f.metadata["key"], f.name, default, f.metadata["help"], type(default))


_CHOICES = {
    "runner": ("auto", "systemd", "podman"),
    "demo": ("auto", "on", "off"),
    "log_level": ("debug", "info", "warning", "error"),
}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    known_sections = {s.key.rsplit(".", 1)[0] for s in settings() if "." in s.key}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and any(
            sec == key or sec.startswith(key + ".") for sec in known_sections
        ):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _coerce(s: Setting, value: Any) -> Any:
    if s.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if s.type is list:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{s.key}: expected a list of strings, got {value!r}")
        return list(value)
    if s.type is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, s.type) or (s.type is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"{s.key}: expected {s.type.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _model(v: Any) -> str | None:
    provider, _, name = v.partition("/")
    if v and (not provider or not name or any(c.isspace() for c in v)):
        return f"{v!r} is not provider/model (e.g. openai/gpt-4.1)"
    return None


def _matches(pattern: str, allowed: str, *, empty: bool = False) -> checks.Check:
    rx = re.compile(pattern)

    def check(v: Any) -> str | None:
        if (empty and v == "") or rx.fullmatch(v):
            return None
        return f"{v!r} is not allowed; allowed: {allowed}" + (" (or empty)" if empty else "")

    return check


def _userns(v: Any) -> str | None:
    mode = v.partition(":")[0]
    if mode in ("keep-id", "host", "") or any(c.isspace() for c in v):
        return (
            f"{v!r} is not allowed; allowed: auto, or another podman --userns mode that gives "
            "the container its own ids (never host or keep-id: they map it onto lovd itself)"
        )
    return None


def _egress_entry(v: Any) -> str | None:
    try:
        parse_allow(v)
    except EgressError as e:
        return str(e).removeprefix("egress.allow: ")
    return None


@functools.cache
def _rules() -> dict[str, checks.Check]:
    """Every setting's allowed values, by key. A setting without an entry here still gets
    the generic rule of its type (_generic): finite and not negative, no control characters."""
    c = checks
    never = "never"
    word_or_empty = _matches(r"\S+", "a value without spaces", empty=True)
    return {
        "listen": c.listen,
        "state_dir": c.absolute_path(),
        "runtime_dir": c.absolute_path(empty=True),
        "public_url": c.url(),
        "idle_exit": c.seconds(0, c.YEAR, above=True, zero=never),
        "max_body": c.count(1024, 1 << 30, unit="bytes"),
        "host_id": _matches(
            r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}",
            "letters, digits, . _ -, at most 63 characters",
            empty=True,
        ),
        "podman.binary": c.word,
        "podman.socket": c.absolute_path(empty=True),
        "image": c.word,
        "container_port": c.port(),
        "container_user": _matches(
            r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?",
            "USER or USER:GROUP (names or numeric ids)",
            empty=True,
        ),
        "health_path": _matches(r"/\S*", "a path starting with '/', without spaces"),
        "port_range": _port_range,
        "userns": _userns,
        "extra_run_args": c.each(c.non_empty),
        "host_gateway": c.ip_address,
        "session_network": c.word,
        # As podman --memory and systemd's MemoryMax= both read it: K, M, G, T only.
        "limits.memory": c.both(
            _matches(r"\d+(\.\d+)?[KMGT]?", "a size like 512M or 4G (K, M, G, T)"),
            c.size(parse_size, 64 << 20, "64M"),
        ),
        "limits.cpus": c.number(0, 1024, "CPUs"),
        "limits.tasks": c.count(16, 1_000_000),
        "limits.max_running": c.count(1, 10_000),
        "warm_pool": c.count(0, 1_000),
        "warm_max_age": c.seconds(0, c.YEAR, above=True),
        "warm_refill_delay": c.seconds(0, 3600),
        "ready_timeout": c.seconds(1, c.HOUR),
        "stop_timeout": c.count(0, 3600, unit="seconds"),
        "idle_timeout": c.seconds(0, 10 * c.YEAR, above=True, zero=never),
        "session_ttl": c.seconds(0, 10 * c.YEAR, above=True, zero=never),
        "delete_after": c.seconds(0, 10 * c.YEAR, above=True, zero=never),
        "unused_timeout": c.seconds(0, 10 * c.YEAR, above=True, zero=never),
        "orphan_grace": c.seconds(0, c.DAY),
        "health.interval": c.seconds(1, c.HOUR),
        "health.probe_timeout": c.seconds(0, 5 * c.MINUTE, above=True),
        "health.failures": c.count(1, 1_000),
        "health.restart_attempts": c.count(1, 1_000),
        "health.restart_window": c.seconds(0, c.YEAR, above=True),
        "health.history": c.count(1, 10_000),
        "floors.disk_free": c.size(parse_size, 0, "0", zero="no floor"),
        "floors.memory_free": c.size(parse_size, 0, "0", zero="no floor"),
        "limits.disk": c.size(parse_size, 0, "0", zero="no quota"),
        "mcp.lovdata.url": c.url(empty=True),
        "mcp.lovdata.token": word_or_empty,
        "llm.model": _model,
        "llm.models": c.each(_model),
        "llm.base_url": c.url(empty=True),
        "llm.api_key": word_or_empty,
        "llm.openai_api_key": word_or_empty,
        "llm.anthropic_api_key": word_or_empty,
        "llm.google_api_key": word_or_empty,
        "llm.openai_base_url": c.url(),
        "llm.anthropic_base_url": c.url(),
        "llm.google_base_url": c.url(),
        "llm.max_tokens_per_session": c.count(1, 10**15, zero="no cap"),
        "llm.max_tokens_per_day": c.count(1, 10**15, zero="no cap"),
        "llm.deny_tools": c.each(_matches(r"[A-Za-z0-9_.*-]+", "OpenCode tool names")),
        "demo_corpus": c.absolute_path(empty=True),
        "demo_mcp_port": c.port(zero="any free port"),
        "demo_llm_port": c.port(zero="any free port"),
        "demo_listen": c.ip_address,
        "broker.listen": c.host_port("127.0.0.1:18780", ip_only=True),
        "egress.allow": c.each(_egress_entry),
        "caddy.admin": c.caddy_admin,
        "caddy.listen": c.caddy_listen,
        "caddy.server": _matches(r"[A-Za-z0-9_-]{1,64}", "letters, digits, _ and -"),
        "caddy.auth_socket": c.absolute_path(empty=True),
        "caddy.check_interval": c.seconds(0.1, c.HOUR),
        "browser.start_limit": c.count(1, 1_000_000),
        "browser.start_window": c.seconds(0, c.YEAR, above=True),
        "browser.auth_failures": c.count(1, 1_000_000),
        "browser.auth_failure_window": c.seconds(0, c.YEAR, above=True),
        "browser.max_running_per_client": c.count(1, 10_000, zero="no limit"),
        "llm.max_output_tokens": c.count(1, 10_000_000),
        "broker.max_body": c.size(parse_size, 1 << 10, "1K"),
        "broker.body_memory": c.size(parse_size, 1 << 10, "1K"),
        "broker.session_requests": c.count(1, 100_000),
        "broker.session_concurrency": c.count(1, 10_000),
        "broker.max_connections": c.count(1, 1_000_000),
        "broker.read_timeout": c.seconds(0, c.HOUR, above=True),
        "postgres.dsn": _dsn,
        "postgres.pool_size": c.count(2, 100),
        "postgres.batch": c.count(1, 100_000),
        "postgres.connect_timeout": c.seconds(0, 5 * c.MINUTE, above=True),
        "postgres.timeout": c.seconds(0, c.HOUR, above=True),
        "postgres.read_timeout": c.seconds(0, 5 * c.MINUTE, above=True),
        "postgres.max_backoff": c.seconds(0.2, c.HOUR),
        "postgres.heartbeat_interval": c.seconds(0, c.HOUR, above=True),
        "postgres.host_stale_after": c.seconds(0, c.DAY, above=True),
        "postgres.retention": c.seconds(c.MINUTE, 10 * c.YEAR),
        "postgres.upstream": c.host_port("10.0.0.2:80", empty=True),
        **{key: _choice(choices) for key, choices in _CHOICES.items()},
    }


def _choice(choices: tuple[str, ...]) -> checks.Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"{v!r}: must be one of {', '.join(choices)}"

    return check


def _port_range(v: Any) -> str | None:
    lo, sep, hi = v.partition("-")
    if not (sep and lo.strip().isdigit() and hi.strip().isdigit()):
        return f"expected LOW-HIGH, got {v!r}"
    if not 1024 <= int(lo) <= int(hi) <= 65535:
        return f"{v!r} must lie within 1024-65535 (LOW-HIGH, LOW <= HIGH)"
    return None


def _dsn(v: Any) -> str | None:
    if not v:
        return None
    import psycopg.conninfo

    try:
        psycopg.conninfo.conninfo_to_dict(v)
    except psycopg.Error:
        # Not the parser's message: it may quote the DSN, password included.
        return (
            "not a libpq connection string or URI (key=value pairs, or "
            "postgresql://user@host/dbname); check quoting"
        )
    return None


def _generic(s: Setting) -> checks.Check | None:
    """The rule for a setting _rules() does not name: what any value of its type must be."""
    if s.type is float:
        return checks.seconds(0, 10 * checks.YEAR)
    if s.type is int:
        return checks.count(0, 10**15)
    return None


def problems(cfg: Config) -> list[str]:
    """Everything wrong with ``cfg``, one line each, each naming its key and what is allowed."""
    rules = _rules()
    out: list[str] = []
    for s in settings():
        value = getattr(cfg, s.attr)
        strings = value if isinstance(value, list) else [value] if isinstance(value, str) else []
        problem = next(filter(None, map(checks.no_control, strings)), None)
        rule = rules.get(s.key) or _generic(s)
        if problem is None and rule is not None:
            problem = rule(value)
        if problem:
            out.append(f"{s.key}: {problem}")
    # Rules across settings, once each setting is fine on its own.
    if not out and cfg.max_running > len(cfg.ports):
        out.append(
            f"limits.max_running: {cfg.max_running} sessions need as many ports, and "
            f"port_range {cfg.port_range} has {len(cfg.ports)}; allowed: at most "
            f"{len(cfg.ports)}, or a wider port_range"
        )
    if not out and parse_size(cfg.broker_body_memory) < parse_size(cfg.broker_max_body):
        out.append(
            f"broker.body_memory: {cfg.broker_body_memory} is less than one body; allowed: at "
            f"least broker.max_body ({cfg.broker_max_body})"
        )
    if not out and cfg.postgres_host_stale_after <= cfg.postgres_heartbeat_interval:
        out.append(
            f"postgres.host_stale_after: {cfg.postgres_host_stale_after:g} would show live "
            f"hosts as dead; allowed: more than postgres.heartbeat_interval "
            f"({cfg.postgres_heartbeat_interval:g})"
        )
    return out


def _validate(cfg: Config) -> None:
    found = problems(cfg)
    if found:
        raise ConfigError.of(found)


def parse_size(text: str) -> int:
    """Bytes in ``"512M"``, ``"1G"``, ``"1024"`` (K, M, G, T are powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = float(t)
    except ValueError as e:
        raise ValueError(f"expected a size like 512M or 1G, got {text!r}") from e
    if not math.isfinite(value):
        raise ValueError(f"expected a size like 512M or 1G, got {text!r}")
    if value < 0:
        raise ValueError(f"a size cannot be negative, got {text!r}")
    return int(value * scale)


def from_mapping(data: Mapping[str, Any]) -> Config:
    by_key = {s.key: s for s in settings()}
    values: dict[str, Any] = {}
    found: list[str] = []
    for key, value in _flatten(data):
        s = by_key.get(key)
        if s is None:
            found.append(f"unknown setting {key!r} (see lovd.conf.example for all keys)")
            continue
        try:
            values[s.attr] = _coerce(s, value)
        except ConfigError as e:
            found.append(str(e))
    if found:
        raise ConfigError.of(found)
    cfg = Config(**values)
    _validate(cfg)
    return cfg


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml when present), refusing a key given twice in one mapping.

    PyYAML keeps the last of duplicate keys: a repeated section (two ``limits:`` blocks)
    would silently replace the first, settings and all."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicates(node, "")
        return super().construct_document(node)


def _refuse_duplicates(node: yaml.Node, prefix: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}" if isinstance(key_node, yaml.ScalarNode) else ""
            line = key_node.start_mark.line + 1
            if key and key in seen:
                raise ConfigError(
                    f"{key}: given twice (lines {seen[key]} and {line}); a repeated key or "
                    "section would replace the first: merge them into one"
                )
            seen[key] = line
            _refuse_duplicates(value_node, key + "." if key else prefix)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, prefix)


def config_path(path: str | None = None) -> tuple[Path, bool]:
    """The file ``load`` reads, and whether it was named (``path`` or $LOVD_CONFIG)."""
    explicit = path or os.environ.get("LOVD_CONFIG")
    return Path(explicit or DEFAULT_CONFIG_PATH), bool(explicit)


def load(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load the config file (``path``, else $LOVD_CONFIG, else the default path).

    A missing *default* file is fine (all defaults); a missing explicit file is an error.
    """
    p, explicit = config_path(path)
    try:
        text = p.read_text()
    except FileNotFoundError as e:
        if explicit:
            raise ConfigError(f"config file {p} does not exist") from e
        text = ""
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from e
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else {}  # noqa: S506
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    flat: dict[str, Any] = {}
    for key, value in _flatten(loaded):
        if key in flat:  # `limits.memory: …` beside a `limits:` section naming it too
            raise ConfigError(f"{key}: given twice; a repeated key would replace the first")
        flat[key] = value
    flat.update(overrides or {})
    return from_mapping(flat)


_EXAMPLE_HEADER = """\
# lovd configuration (YAML). Copy to /etc/lovd/lovd.conf (or point LOVD_CONFIG at it).
# Every key is optional; the values shown are the defaults. Unknown keys are errors.
# Secrets (tokens, API keys) belong only here or in a file readable by lovd alone:
# lovd hands them to session containers in a file on its tmpfs runtime directory,
# bind-mounted read-only: never on a command line, never in podman inspect.
"""


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)


def render_example() -> str:
    """lovd.conf.example, generated from the settings (``python -m lovd.config > …``)."""
    lines = [_EXAMPLE_HEADER]
    section: list[str] = []
    for s in sorted(settings(), key=lambda s: (s.key.count(".") > 0, s.key.split(".")[:-1])):
        parts = s.key.split(".")
        if parts[:-1] != section:
            common = 0
            while common < min(len(section), len(parts) - 1) and section[common] == parts[common]:
                common += 1
            lines.append("")
            lines.extend("  " * i + parts[i] + ":" for i in range(common, len(parts) - 1))
            section = parts[:-1]
        indent = "  " * (len(parts) - 1)
        lines.extend(f"{indent}# {h}" for h in textwrap.wrap(s.help, 92 - len(indent)))
        lines.append(f"{indent}{parts[-1]}: {_yaml_value(s.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_example(), end="")
