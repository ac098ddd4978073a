"""One renderer for refusals as RFC 9457 problem+json, for the API and the browser path."""

from __future__ import annotations

import json

from aiohttp import web

from lovd.errors import LovdError

PROBLEM = "application/problem+json"


def problem(err: LovdError, instance: str | None = None) -> web.Response:
    """``err`` as problem+json, with ``Retry-After`` when it says when to come back."""
    resp = web.Response(
        status=err.status, body=json.dumps(err.problem(instance)).encode(), content_type=PROBLEM
    )
    resp.headers["Cache-Control"] = "no-store"
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp
