"""Every error lovd answers over HTTP, rendered in one place.

One decision (:func:`is_navigation`): a browser's top-level page load gets an HTML page
(web/pages.py, through the ``page`` renderer the browser-facing apps pass), everything
else RFC 9457 problem+json. One renderer (:func:`render`): a :class:`LovdError` as that
page or as problem+json. One middleware (:func:`middleware`) for the apps that have no
other: a LovdError raised by a handler, aiohttp's own HTTP errors (unknown route, wrong
method, body too large) and any unexpected exception all end there, the last as a 500
that names the request and nothing of lovd's internals (the traceback goes to the log).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from lovd.errors import LovdError

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"

# An HTML page for an error, for a browser's navigation (Pages.error).
PageRenderer = Callable[[LovdError, web.Request], web.Response]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    415: "unsupported-media-type",
    429: "rate-limited",
}


def is_navigation(request: web.Request) -> bool:
    """Whether the request is a browser's top-level page load (answer with a page), not
    XHR, SSE, an asset or a program (answer with problem+json).

    For Caddy's forward_auth subrequest the headers are the browser's own and the method
    is the original one (``X-Forwarded-Method``)."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate"
    method = request.headers.get("X-Forwarded-Method", request.method).upper()
    return method == "GET" and "text/html" in request.headers.get("Accept", "")


def problem(err: LovdError, instance: str | None = None) -> web.Response:
    """``err`` as problem+json, with ``Retry-After`` when it says when to come back."""
    resp = web.Response(
        status=err.status, body=json.dumps(err.problem(instance)).encode(), content_type=PROBLEM
    )
    resp.headers["Cache-Control"] = "no-store"
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp


def render(
    request: web.Request,
    err: LovdError,
    page: PageRenderer | None = None,
    *,
    nav: bool | None = None,
) -> web.Response:
    """The answer to ``request`` for ``err``: the HTML page for a navigation (``nav``
    overrides :func:`is_navigation` for a form's own target), else problem+json whose
    ``instance`` is the path the browser asked for."""
    if page is not None and (is_navigation(request) if nav is None else nav):
        return page(err, request)
    return problem(err, request.headers.get("X-Forwarded-Uri", request.path))


def from_http(e: web.HTTPException, request: web.Request) -> LovdError:
    """aiohttp's own refusal (no route, wrong method, body too large …) as a LovdError."""
    code = _HTTP_CODES.get(e.status, "bad-request" if e.status < 500 else "internal")
    if e.status == 405:
        detail = (
            f"{request.method} is not allowed on {request.path}; "
            f"allowed: {e.headers.get('Allow', 'none')}"
        )
    elif e.status == 404:
        detail = f"there is nothing at {request.path}"
    else:
        detail = e.reason or "request refused"
    return LovdError(code, detail)


def internal(request_id: str = "") -> LovdError:
    """The error of an unexpected exception: what to quote, nothing of what happened."""
    rid = request_id or secrets.token_hex(8)
    return LovdError("internal", f"internal error; see lovd's log for request id {rid}")


def middleware(page: PageRenderer | None = None) -> Middleware:
    """Every failure of the app's handlers rendered by :func:`render`; redirects (3xx
    HTTPExceptions) pass through."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except LovdError as e:
            return render(request, e, page)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = render(request, from_http(e, request), page)
            if "Allow" in e.headers:  # RFC 9110: a 405 lists the methods it has
                resp.headers["Allow"] = e.headers["Allow"]
            return resp
        except Exception:
            err = internal()
            log.exception("unhandled error in %s %s (%s)", request.method, request.path, err)
            return render(request, err, page)

    return errors
