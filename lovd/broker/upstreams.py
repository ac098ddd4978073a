"""Where the broker sends each kind of call, and which real credential it adds.

A session container knows only the broker's address and its own per-session
credential; the operator's keys are in this table, in lovd's memory, and nowhere else.
Each upstream is a fixed base URL: the broker is not an open proxy, a session can only
reach the paths below the configured providers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lovd.config import Config


@dataclass(frozen=True)
class Upstream:
    prefix: str  # the broker path it is served under, e.g. "/llm/openai"
    base_url: str  # where calls go (no trailing slash)
    key_header: str  # the header that carries the real credential upstream
    key_value: str  # its value ("" when the upstream needs none)
    llm: bool  # an LLM provider: usage counted, caps enforced
    kind: str = ""  # openai, anthropic, google, lovd or mcp: which routes and formats apply
    models: frozenset[str] = frozenset()  # the model names a session may use here

    def __repr__(self) -> str:  # never print the key
        return f"Upstream({self.prefix!r} -> {self.base_url!r})"


def _bearer(key: str) -> str:
    return f"Bearer {key}" if key else ""


def models_by_provider(allowed: frozenset[str]) -> dict[str, frozenset[str]]:
    """``{"openai": {"gpt-4o-mini"}, ...}`` from ``"provider/model"`` names (a model
    name may itself hold a slash, as vLLM's do: only the first one splits)."""
    out: dict[str, set[str]] = {}
    for m in allowed:
        provider, _, name = m.partition("/")
        out.setdefault(provider, set()).add(name)
    return {p: frozenset(ns) for p, ns in out.items()}


def from_config(c: Config, demo_urls: dict[str, str]) -> dict[str, Upstream]:
    """The upstreams lovd's config (and demo mode, when on) provides, by path prefix."""
    table: dict[str, Upstream] = {}
    models = models_by_provider(c.allowed_models(demo_urls.get("model", "")))

    def add(prefix: str, url: str, header: str, value: str, *, llm: bool) -> None:
        kind = prefix.rpartition("/")[2] if llm else "mcp"
        table[prefix] = Upstream(
            prefix, url.rstrip("/"), header, value, llm, kind, models.get(kind, frozenset())
        )

    if c.openai_api_key:
        add("/llm/openai", c.openai_base_url, "Authorization", _bearer(c.openai_api_key), llm=True)
    if c.anthropic_api_key:
        add("/llm/anthropic", c.anthropic_base_url, "x-api-key", c.anthropic_api_key, llm=True)
    if c.google_api_key:
        add("/llm/google", c.google_base_url, "x-goog-api-key", c.google_api_key, llm=True)
    lovd_llm = c.llm_base_url or demo_urls.get("llm", "")
    if lovd_llm:
        add("/llm/lovd", lovd_llm, "Authorization", _bearer(c.llm_api_key), llm=True)
    mcp = c.mcp_lovdata_url or demo_urls.get("mcp", "")
    if mcp:
        add("/mcp/lovdata", mcp, "Authorization", _bearer(c.mcp_lovdata_token), llm=False)
    return table
