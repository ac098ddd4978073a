"""LLM usage: read token counts from provider responses as they stream past, count them
per session and per UTC day, and enforce the configured caps.

The providers report usage in their own shapes; all are read from the JSON objects of a
response body or of its SSE ``data:`` lines:

- OpenAI and OpenAI-compatible: ``usage.prompt_tokens`` / ``usage.completion_tokens``
  (streams carry it in the last chunk when ``stream_options.include_usage`` is set,
  which the broker asks for);
- Anthropic: ``message.usage.input_tokens`` in ``message_start``, cumulative
  ``usage.output_tokens`` in ``message_delta``;
- Google: ``usageMetadata.promptTokenCount`` / ``candidatesTokenCount`` (cumulative).

Every figure is cumulative within one response, so the largest seen is the total.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# A non-streamed body larger than this is passed through but not parsed for usage.
_MAX_PARSED_BODY = 4 * 1024 * 1024


@dataclass
class Tokens:
    input: int = 0
    output: int = 0

    def see(self, obj: Any) -> None:
        """Take the usage figures out of one decoded JSON object, if it has any."""
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._take(usage.get("prompt_tokens"), usage.get("completion_tokens"))
            self._take(usage.get("input_tokens"), usage.get("output_tokens"))
        message = obj.get("message")
        if isinstance(message, dict) and isinstance(message.get("usage"), dict):
            u = message["usage"]
            self._take(u.get("input_tokens"), u.get("output_tokens"))
        meta = obj.get("usageMetadata")
        if isinstance(meta, dict):
            self._take(meta.get("promptTokenCount"), meta.get("candidatesTokenCount"))

    def _take(self, inp: Any, out: Any) -> None:
        if isinstance(inp, int) and not isinstance(inp, bool):
            self.input = max(self.input, inp)
        if isinstance(out, int) and not isinstance(out, bool):
            self.output = max(self.output, out)

    @property
    def total(self) -> int:
        return self.input + self.output


class UsageReader:
    """Fed the bytes of one response as they pass; knows its token usage at the end."""

    def __init__(self, content_type: str) -> None:
        self.sse = content_type.startswith("text/event-stream")
        self.tokens = Tokens()
        self._buf = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if not self.sse:
            if len(self._buf) + len(chunk) > _MAX_PARSED_BODY:
                self._overflow = True
                self._buf.clear()
            elif not self._overflow:
                self._buf += chunk
            return
        self._buf += chunk
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        for line in lines:
            self._line(bytes(line))

    def _line(self, line: bytes) -> None:
        # Only lines that can carry usage are decoded: most chunks are text deltas.
        if not line.startswith(b"data:") or (b"sage" not in line):
            return
        try:
            self.tokens.see(json.loads(line[5:]))
        except ValueError:
            return

    def finish(self) -> Tokens:
        if self.sse:
            if self._buf:
                self._line(bytes(self._buf))
        elif self._buf and not self._overflow:
            with contextlib.suppress(ValueError):
                self.tokens.see(json.loads(self._buf))
        self._buf.clear()
        return self.tokens


@dataclass
class SessionUsage:
    llm_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    mcp_requests: int = 0
    refused: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "llm_requests": self.llm_requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "mcp_requests": self.mcp_requests,
            "refused": self.refused,
        }


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


@dataclass
class Ledger:
    """Usage per session and per UTC day. Totals are loaded from the store at start and
    written back in batches (``pending``); the caps are checked against memory only, so
    the broker never waits on the database."""

    per_session_cap: int = 0
    per_day_cap: int = 0
    sessions: dict[str, SessionUsage] = field(default_factory=dict)
    days: dict[str, int] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    dirty_days: set[str] = field(default_factory=set)

    def of(self, sid: str) -> SessionUsage:
        u = self.sessions.get(sid)
        if u is None:
            u = self.sessions[sid] = SessionUsage()
        return u

    def refusal(self, sid: str, now: float) -> str:
        """Why the next LLM call of ``sid`` is refused ("" when it may go)."""
        used = self.of(sid).tokens
        if self.per_session_cap and used >= self.per_session_cap:
            return (
                f"Denne økten har brukt opp sine {self.per_session_cap} tokens. "
                "Start en ny økt for å fortsette. "
                f"(This session has used its allowance of {self.per_session_cap} tokens; "
                "start a new session to continue.)"
            )
        day = utc_day(now)
        if self.per_day_cap and self.days.get(day, 0) >= self.per_day_cap:
            return (
                "Tjenesten har brukt opp dagens kvote for språkmodellen; prøv igjen etter "
                "midnatt (UTC). (The service has used today's language-model allowance; "
                "try again after midnight UTC.)"
            )
        return ""

    def count_llm(self, sid: str, tokens: Tokens, now: float) -> None:
        u = self.of(sid)
        u.llm_requests += 1
        u.input_tokens += tokens.input
        u.output_tokens += tokens.output
        day = utc_day(now)
        self.days[day] = self.days.get(day, 0) + tokens.total
        self.dirty.add(sid)
        self.dirty_days.add(day)

    def count_mcp(self, sid: str) -> None:
        self.of(sid).mcp_requests += 1
        self.dirty.add(sid)

    def count_refused(self, sid: str) -> None:
        self.of(sid).refused += 1
        self.dirty.add(sid)

    def forget(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        self.dirty.discard(sid)

    def take_dirty(self) -> tuple[dict[str, SessionUsage], dict[str, int]]:
        rows = {sid: self.sessions[sid] for sid in self.dirty if sid in self.sessions}
        days = {d: self.days[d] for d in self.dirty_days if d in self.days}
        self.dirty = set()
        self.dirty_days = set()
        return rows, days
