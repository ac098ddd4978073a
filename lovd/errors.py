"""lovd's error vocabulary: short kebab-case codes, one HTTP status each.

Raised anywhere in the daemon, rendered once as RFC 9457 problem+json by the web layer.
"""

from __future__ import annotations

from typing import Any

# code -> (HTTP status, title)
CODES: dict[str, tuple[int, str]] = {
    "bad-request": (400, "Bad request"),
    "invalid-json": (400, "Request body is not valid JSON"),
    "invalid-session-id": (400, "Invalid session id"),
    "unauthorized": (401, "Authentication required"),
    "forbidden": (403, "Forbidden"),
    "not-found": (404, "Not found"),
    "session-not-found": (404, "Session not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "conflict": (409, "Conflict"),
    "link-used": (410, "Link already used"),
    "body-too-large": (413, "Request body too large"),
    "unsupported-media-type": (415, "Unsupported media type"),
    "too-many-sessions": (429, "Session limit reached"),
    "quota-exceeded": (507, "Disk quota reached"),
    "rate-limited": (429, "Too many requests"),
    "internal": (500, "Internal error"),
    "runner-failed": (502, "Container runtime failed"),
    "unavailable": (503, "Service unavailable"),
    "image-missing": (503, "Session image missing"),
    "start-timeout": (504, "Session did not become ready in time"),
}


class LovdError(Exception):
    """An error with a stable code, a human message saying what to do, and optional extras."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.extra = extra or {}

    @property
    def status(self) -> int:
        return CODES[self.code][0]

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://lovd.invalid/problems/{self.code}",
            "title": CODES[self.code][1],
            "status": self.status,
            "detail": self.message,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        body.update(self.extra)
        return body
