"""What the broker lets through: exact method + path per provider, the query parameters
and request headers those routes need, and the model and output bound of each LLM call.

A session's broker credential opens the operator's keys for these calls only. Anything
else a provider's API offers with the same key (files, batches, fine-tuning, images, the
organisation's costs, Anthropic's betas…) is refused before an upstream sees it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# The raw path tail (after the upstream's prefix) may hold only these characters, so no
# encoding (``%2e``, ``%2f``, ``%252e``…), backslash or other trick can name a different
# upstream path once a client library or the provider decodes or normalises it.
_SAFE_TAIL = re.compile(r"[A-Za-z0-9/_.:-]*")
_GOOGLE = re.compile(
    r"/models/([A-Za-z0-9][A-Za-z0-9._-]*):(generateContent|streamGenerateContent)"
)

# Request headers the providers' SDKs and an MCP client need; every other one is dropped
# (OpenAI-Organization and OpenAI-Project would pick another of the operator's billing
# scopes, anthropic-beta switches on server-side features such as the MCP connector and
# the Files API).
FORWARD_HEADERS = frozenset(
    {
        "content-type",
        "accept",
        "user-agent",
        "anthropic-version",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
    }
)
# Query parameters per route kind, with the values allowed (``key`` never: it would be
# the session's credential).
_QUERY: dict[str, dict[str, frozenset[str]]] = {"generate": {"alt": frozenset({"sse"})}}

# Where each route kind keeps its output bound; the first is the one the broker sets
# when a request has none.
_MAX_OUTPUT = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
}


# Compact, UTF-8 as sent: a rewritten body is no larger than need be. One encoder for
# all calls (json.dumps with options builds a new one each time).
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Route:
    kind: str  # chat, responses, messages, generate (LLM calls) or mcp
    model: str = ""  # the model named in the path (Google)


def match(upstream_kind: str, method: str, raw_tail: str) -> Route | None:
    """The allowlisted route ``method raw_tail`` is at this upstream, or None."""
    if not _SAFE_TAIL.fullmatch(raw_tail):
        return None
    if raw_tail and any(seg in ("", ".", "..") for seg in raw_tail.split("/")[1:]):
        return None
    if upstream_kind == "mcp":
        # Streamable HTTP: POST messages, GET the event stream, DELETE to end it.
        ok = raw_tail == "" and method in ("POST", "GET", "DELETE")
        return Route("mcp") if ok else None
    if method != "POST":
        return None
    if upstream_kind in ("openai", "lovd") and raw_tail == "/chat/completions":
        return Route("chat")
    if upstream_kind == "openai" and raw_tail == "/responses":
        return Route("responses")
    if upstream_kind == "anthropic" and raw_tail == "/messages":
        return Route("messages")
    if upstream_kind == "google":
        m = _GOOGLE.fullmatch(raw_tail)
        if m:
            return Route("generate", model=m[1])
    return None


def query(route: Route, params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The query parameters ``route`` needs, out of what the client sent."""
    allowed = _QUERY.get(route.kind, {})
    return [(k, v) for k, v in params if v in allowed.get(k, frozenset())]


@dataclass(frozen=True)
class Call:
    """An LLM request as it goes upstream, with what it may cost."""

    body: bytes
    model: str
    input_estimate: int  # tokens, from the body's size
    max_output: int  # tokens the answer may use at most (all choices)


def prepare(
    upstream_kind: str,
    route: Route,
    body: bytes,
    models: frozenset[str],
    default_max_output: int,
) -> Call:
    """Check an LLM request body and bound it: a configured model, function tools only,
    an output bound (set to ``default_max_output`` when absent), usage asked for in
    streamed chat completions."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refusal(400, f"the request body is not JSON ({e}); send a JSON object") from e
    if not isinstance(data, dict):
        raise Refusal(400, "the request body must be a JSON object")
    model = route.model if route.kind == "generate" else data.get("model")
    if not isinstance(model, str) or model not in models:
        offered = ", ".join(sorted(models)) or "none"
        raise Refusal(
            403,
            f"the model {str(model)[:100]!r} is not offered by this service (models here: "
            f"{offered}); "
            "the operator sets them in llm.model and llm.models",
        )
    _only_function_tools(route, data)
    changed = False
    if route.kind == "generate":
        gen = data.get("generationConfig")
        if gen is None:
            gen = data["generationConfig"] = {}
        if not isinstance(gen, dict):
            raise Refusal(400, "generationConfig must be a JSON object")
        bound = _bound(gen, "maxOutputTokens")
        if bound is None:
            bound = gen["maxOutputTokens"] = default_max_output
            changed = True
        choices = _bound(gen, "candidateCount") or 1
    else:
        fields = _MAX_OUTPUT[route.kind]
        bounds = [b for b in (_bound(data, f) for f in fields) if b is not None]
        if bounds:
            bound = max(bounds)
        else:
            # An OpenAI-compatible server (vLLM, the stub…) knows max_tokens; OpenAI's
            # reasoning models only max_completion_tokens.
            name = "max_tokens" if upstream_kind == "lovd" else fields[0]
            bound = data[name] = default_max_output
            changed = True
        choices = (_bound(data, "n") or 1) if route.kind == "chat" else 1
    if route.kind == "chat" and data.get("stream") is True:
        # Without it a stream reports no usage at all; a client's include_usage: false
        # is overruled.
        opts = data.get("stream_options")
        if not isinstance(opts, dict) or opts.get("include_usage") is not True:
            data["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
            changed = True
    if changed:
        body = _ENCODE(data).encode()
    return Call(body, model, len(body) // 3 + 1, bound * choices)


def _only_function_tools(route: Route, data: dict[str, Any]) -> None:
    """Tools the client runs itself (function tools) only: the providers' hosted tools
    (web search, code execution, remote MCP servers, image generation…) run on the
    provider's side with the operator's account, reach arbitrary URLs and are billed
    apart from tokens."""
    tools = data.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise Refusal(400, "tools must be a JSON array")
    for tool in tools:
        if not isinstance(tool, dict):
            raise Refusal(400, "each of tools must be a JSON object")
        if route.kind == "generate":
            hosted = sorted(set(tool) - {"functionDeclarations"})
            kind = hosted[0] if hosted else ""
        elif route.kind == "messages":
            kind = "" if tool.get("type") in (None, "custom") else str(tool.get("type"))
        else:
            kind = "" if tool.get("type") == "function" else str(tool.get("type"))
        if kind:
            raise Refusal(
                403,
                f"the tool type {kind[:100]!r} runs on the provider's side and is not offered by "
                "this service; only function tools are passed on",
            )


def _bound(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Refusal(400, f"{name} must be a positive whole number, got {str(value)[:40]!r}")
    return value
