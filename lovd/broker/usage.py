"""LLM usage: read token counts from provider responses as they stream past, count them
per session and per UTC day, and enforce the configured caps.

The providers report usage in their own shapes; all are read from the JSON objects of a
response body or of its SSE ``data:`` lines:

- OpenAI Chat Completions and OpenAI-compatible: ``usage.prompt_tokens`` /
  ``usage.completion_tokens`` (streams carry it in the last chunk, which the broker
  always asks for with ``stream_options.include_usage``);
- OpenAI Responses: top-level ``usage`` of a plain body, ``response.usage`` in the
  ``response.completed`` (``.incomplete``, ``.failed``) event of a stream;
  ``input_tokens`` / ``output_tokens`` (reasoning tokens are part of the latter);
- Anthropic: ``message.usage`` in ``message_start``, cumulative ``usage`` in
  ``message_delta``; cache writes and reads (``cache_creation_input_tokens``,
  ``cache_read_input_tokens``) are input too;
- Google: ``usageMetadata``: ``promptTokenCount`` + ``toolUsePromptTokenCount`` in,
  ``candidatesTokenCount`` + ``thoughtsTokenCount`` out.

A ``total_tokens`` / ``totalTokenCount`` larger than the parts is counted as output, so
a field this module does not know yet is not free. Every figure is cumulative within
one response, so the largest seen is the total.

Before a call the broker reserves what it may cost at most (its output bound and an
estimate of its input) against both caps; a call that does not fit is refused, and the
reservation is replaced by the usage the provider reports (all of it when none can be
read). So parallel calls cannot overshoot a cap.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# A non-streamed body larger than this is passed through but not parsed for usage.
_MAX_PARSED_BODY = 4 * 1024 * 1024


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sum(d: dict[str, Any], *names: str) -> int | None:
    """The sum of the integer fields among ``names`` (None when there is none)."""
    found = [v for v in (_int(d.get(n)) for n in names) if v is not None]
    return sum(found) if found else None


@dataclass
class Tokens:
    input: int = 0
    output: int = 0
    found: bool = False  # any usage figure was seen

    def see(self, obj: Any) -> None:
        """Take the usage figures out of one decoded JSON object, if it has any."""
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        for key in ("message", "response"):  # Anthropic's message_start; Responses events
            inner = obj.get(key)
            if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                self._usage(inner["usage"])
        meta = obj.get("usageMetadata")
        if isinstance(meta, dict):
            inp = _sum(meta, "promptTokenCount", "toolUsePromptTokenCount")
            out = _sum(meta, "candidatesTokenCount", "thoughtsTokenCount")
            self._take(inp, out, _int(meta.get("totalTokenCount")))

    def _usage(self, u: dict[str, Any]) -> None:
        if "prompt_tokens" in u or "completion_tokens" in u:
            inp = _int(u.get("prompt_tokens"))
            out = _int(u.get("completion_tokens"))
        else:
            inp = _sum(u, "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
            out = _int(u.get("output_tokens"))
        self._take(inp, out, _int(u.get("total_tokens")))

    def _take(self, inp: int | None, out: int | None, total: int | None = None) -> None:
        if total is not None:
            out = max(out or 0, total - (inp or 0))
        if inp is not None:
            self.input = max(self.input, inp)
            self.found = True
        if out is not None:
            self.output = max(self.output, out)
            self.found = True

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
    return _day_name(int(now // 86400))


@functools.lru_cache(maxsize=4)
def _day_name(day: int) -> str:
    # Every call is counted against its day: formatting it once a day, not three times
    # a call, keeps the broker's per-call cost down.
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


@dataclass(frozen=True)
class Reservation:
    sid: str
    day: str
    input_estimate: int
    max_output: int


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
    # Tokens reserved by calls in flight, per session and per day.
    held: dict[str, int] = field(default_factory=dict)
    held_days: dict[str, int] = field(default_factory=dict)

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

    def reserve(
        self, sid: str, input_estimate: int, max_output: int, now: float
    ) -> Reservation | str:
        """Hold what a call may cost against both caps; why not, when it does not fit."""
        why = self.refusal(sid, now)
        if why:
            return why
        amount = input_estimate + max_output
        day = utc_day(now)
        if self.per_session_cap:
            left = self.per_session_cap - self.of(sid).tokens - self.held.get(sid, 0)
            if amount > left:
                return (
                    f"Denne økten har {max(left, 0)} av sine {self.per_session_cap} tokens "
                    f"igjen, og dette kallet kan bruke opptil {amount}. Start en ny økt for å "
                    f"fortsette. (This call may use up to {amount} tokens; this session has "
                    f"{max(left, 0)} of its {self.per_session_cap} left. Start a new session "
                    "to continue.)"
                )
        if self.per_day_cap:
            left = self.per_day_cap - self.days.get(day, 0) - self.held_days.get(day, 0)
            if amount > left:
                return (
                    "Tjenesten har ikke nok igjen av dagens kvote for språkmodellen til dette "
                    "kallet; prøv igjen senere eller etter midnatt (UTC). (The service has not "
                    "enough of today's language-model allowance left for this call; try "
                    "again later or after midnight UTC.)"
                )
        self.held[sid] = self.held.get(sid, 0) + amount
        self.held_days[day] = self.held_days.get(day, 0) + amount
        return Reservation(sid, day, input_estimate, max_output)

    def settle(
        self, r: Reservation, tokens: Tokens, now: float, *, complete: bool = True
    ) -> Tokens:
        """Replace a reservation by the usage the provider reported. A call whose usage
        could not be read costs all it reserved, and so does one cut off mid-answer
        (the provider bills what it generated, but a stream's early usage figures, such
        as Anthropic's in message_start, do not yet say how much). Returns what was
        counted."""
        for table, key in ((self.held, r.sid), (self.held_days, r.day)):
            left = table.get(key, 0) - r.input_estimate - r.max_output
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)
        if tokens.found and complete:
            counted = tokens
        else:
            counted = Tokens(
                max(tokens.input, r.input_estimate), max(tokens.output, r.max_output), True
            )
        self.count_llm(r.sid, counted, now)
        return counted

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
