"""A stand-in for the Lovdata MCP server: same tool names and arguments, local corpus.

Serves MCP over streamable HTTP at ``/mcp`` (Python ``mcp`` SDK under uvicorn) so an
OpenCode session can be wired to it exactly as to the real server. Every tool call is
recorded (tool, arguments, timestamp) in memory, optionally appended to a JSONL file, and
listed by ``GET /calls`` so tests can assert that the model really used a tool.

    python -m lovd.demo.lovdata_mcp --host 127.0.0.1 --port 8765 \
        [--corpus PATH] [--calls-log PATH] [--token TOKEN]

In lovd's demo mode it binds the host's loopback (``demo_listen``) and sessions reach
it at 10.0.2.2 through slirp4netns's allow_host_loopback (``demo_network``). Run by
hand for containers on Podman's default network, it must bind an address they can
reach (the host's own, or 0.0.0.0) and they call it as ``host.containers.internal``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from lovd.demo import default_corpus_path
from lovd.demo.corpus import Corpus, Law, lovdata_url_for
from lovd.demo.search import Result as SearchResult

logger = logging.getLogger(__name__)

SERVER_NAME = "lovdata"
MCP_PATH = "/mcp"
DEFAULT_LIMIT = 10
DEFAULT_SEMANTIC_THRESHOLD = 0.3
TOKEN_ENV = "LOVD_DEMO_MCP_TOKEN"  # noqa: S105 - the variable's name, not a token

NLOD_LICENSE: dict[str, Any] = {
    "license": "Norsk lisens for offentlige data (NLOD) 2.0",
    "license_short": "NLOD 2.0",
    "license_url": "https://data.norge.no/nlod/no/2.0",
    "license_url_en": "https://data.norge.no/nlod/en/2.0",
    "licensor": "Lovdata",
    "attribution": (
        "Inneholder data under Norsk lisens for offentlige data (NLOD) "
        "tilgjengeliggjort av Lovdata."
    ),
    "attribution_en": (
        "Contains data under the Norwegian licence for Open Government data (NLOD) "
        "distributed by Lovdata."
    ),
    "note": (
        "Lovtekst er ikke vernet etter åndsverkloven § 14. Dette er en lokal "
        "demo-tjeneste (lovd) med et lite utvalg bestemmelser, ikke Lovdatas tjeneste."
    ),
}


class CallLog:
    """Every tool call, in memory and (optionally) appended to a JSONL file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, tool: str, arguments: dict[str, Any]) -> None:
        entry = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "tool": tool,
            "arguments": arguments,
        }
        logger.info("tool call %s %s", tool, json.dumps(arguments, ensure_ascii=False))
        with self._lock:
            self._calls.append(entry)
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._calls)

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()


class _RecordToolCalls:
    """MCP middleware: records ``tools/call`` before validation, so bad calls show too."""

    def __init__(self, log: CallLog) -> None:
        self.log = log

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.method == "tools/call" and ctx.params:
            name = ctx.params.get("name")
            args = ctx.params.get("arguments") or {}
            self.log.record(str(name), dict(args) if isinstance(args, dict) else {"_raw": args})
        return await call_next(ctx)


class _BearerAuth:
    """Requires ``Authorization: Bearer <token>`` on the MCP endpoint when a token is set,
    so tests can prove the session container forwards LOVDATA_MCP_TOKEN."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith(MCP_PATH):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse({"error": "unauthorized"}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _law_or_error(corpus: Corpus, ref: str) -> Law:
    law = corpus.find_law(ref)
    if law is None:
        known = corpus.unknown_law_name(ref)
        named = f" ({known})" if known else ""
        raise ToolError(
            f"Fant ingen lov eller forskrift for {ref!r}{named} i dette utvalget av Lovdata. "
            "Bruk list_laws eller search_laws_fulltext for å finne riktig dokument-id."
        )
    return law


def _how(result: SearchResult) -> dict[str, Any]:
    """What the search did, for the caller to judge its hits."""
    how: dict[str, Any] = {"match": result.mode}
    if result.corrected:
        how["searched_instead"] = result.corrected
    return how


def _optional_law(corpus: Corpus, law_id: str | None) -> Law | None:
    return _law_or_error(corpus, law_id) if law_id else None


def build_server(corpus: Corpus, calls: CallLog) -> MCPServer[Any]:
    """The MCP server with the Lovdata tool set over ``corpus``."""
    mcp: MCPServer[Any] = MCPServer(
        name=SERVER_NAME,
        instructions=(
            "Norwegian laws and regulations (lover og forskrifter) with provisions and "
            "cross-references. Local demo stand-in for the Lovdata MCP server."
        ),
        version="0.1.0",
        middleware=[_RecordToolCalls(calls)],
    )

    @mcp.tool()
    def get_law(doc_id: str) -> dict[str, Any]:
        """Get one law or regulation with metadata and table of contents.

        doc_id: document id (e.g. "NL/lov/2005-06-17-62"), LOV-id, short title
        ("arbeidsmiljøloven") or abbreviation ("aml.").
        """
        law = _law_or_error(corpus, doc_id)
        data = law.summary()
        data["table_of_contents"] = [
            {"provision_id": p.provision_id, "section": p.section, "heading": p.heading}
            for p in corpus.provisions_of(law)
        ]
        return data

    @mcp.tool()
    def list_laws(
        document_type: str | None = None,
        legal_area: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        """List laws and regulations, optionally filtered by document_type ("lov" or
        "forskrift") and legal_area (e.g. "arbeidsrett")."""
        laws = [
            law
            for law in corpus.laws
            if (not document_type or law.type.lower() == document_type.lower())
            and (not legal_area or legal_area.lower() in law.legal_area.lower())
        ]
        page = laws[max(0, offset) : max(0, offset) + max(0, limit)]
        return {"total": len(laws), "offset": offset, "laws": [law.summary() for law in page]}

    @mcp.tool()
    def search_laws_fulltext(query: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
        """Norwegian full-text search over laws and regulations (titles and text), ranked
        by BM25. Words are stemmed ("arbeidsgiveren" finds "arbeidsgiver") and match
        compounds they start ("oppsigelse" finds "oppsigelsesvern"); all words must match,
        and when no law matches them all, any may ("match": "all" or "any")."""
        hits, result = corpus.search_laws(query, limit, require_all=True)
        return {
            "query": query,
            **_how(result),
            "total": len(hits),
            "results": [{**law.summary(), "score": score} for law, score in hits],
        }

    @mcp.tool()
    def search_laws_semantic(
        query: str, limit: int = DEFAULT_LIMIT, threshold: float = DEFAULT_SEMANTIC_THRESHOLD
    ) -> dict[str, Any]:
        """Semantic search over laws. In this stand-in "semantic" is the share of query
        words found (stemmed, 0..1, ties ranked by BM25), not an embedding model; results
        below threshold are dropped."""
        hits, _ = corpus.search_laws(query, limit, require_all=False, threshold=threshold)
        return {
            "query": query,
            "total": len(hits),
            "results": [{**law.summary(), "similarity": score} for law, score in hits],
        }

    @mcp.tool()
    def get_law_content(doc_id: str) -> dict[str, Any]:
        """A law's full content as HTML."""
        law = _law_or_error(corpus, doc_id)
        return {**law.summary(), "content_type": "text/html", "content": corpus.law_html(law)}

    @mcp.tool()
    def get_law_text(doc_id: str) -> dict[str, Any]:
        """A law's full content as plain text."""
        law = _law_or_error(corpus, doc_id)
        return {**law.summary(), "content_type": "text/plain", "text": corpus.law_text(law)}

    @mcp.tool()
    def get_provision(provision_id: str) -> dict[str, Any]:
        """One provision by id (e.g. "NL/lov/2005-06-17-62/§15-7") or citation ("aml. § 15-7")."""
        p = corpus.find_provision(provision_id)
        if p is None:
            raise ToolError(f"Fant ingen bestemmelse {provision_id!r}.")
        return corpus.provision_record(p)

    @mcp.tool()
    def get_provisions_batch(ids: list[str]) -> dict[str, Any]:
        """Several provisions by id; ids not found are listed under "not_found"."""
        found: list[dict[str, Any]] = []
        missing: list[str] = []
        for pid in ids:
            p = corpus.find_provision(pid)
            if p is None:
                missing.append(pid)
            else:
                found.append(corpus.provision_record(p))
        return {"provisions": found, "not_found": missing}

    @mcp.tool()
    def list_provisions(law_id: str, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """All provisions of a law, in order (law_id as for get_law)."""
        law = _law_or_error(corpus, law_id)
        provisions = corpus.provisions_of(law)
        page = provisions[max(0, offset) : max(0, offset) + max(0, limit)]
        return {
            "law": law.summary(),
            "total": len(provisions),
            "offset": offset,
            "provisions": [corpus.provision_record(p, full_text=False) for p in page],
        }

    @mcp.tool()
    def search_provisions_fulltext(
        query: str, law_id: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> dict[str, Any]:
        """Norwegian full-text search in provisions (heading, text and the law's names),
        optionally within one law (law_id: doc id, short title or abbreviation such as
        "aml"), ranked by BM25. Words are stemmed ("arbeidsgiveren" finds "arbeidsgiver")
        and match compounds they start ("oppsigelse" finds "oppsigelsesvern"); all words
        must match, and when no provision matches them all, any may ("match": "all" or
        "any"). "§ 15-7" in the query keeps to provisions with that number."""
        law = _optional_law(corpus, law_id)
        hits, result = corpus.search_provisions(query, law, limit, require_all=True)
        return {
            "query": query,
            **_how(result),
            "law_id": law.doc_id if law else None,
            "total": len(hits),
            "results": [{**corpus.provision_record(p), "score": s} for p, s in hits],
        }

    @mcp.tool()
    def search_provisions_semantic(
        query: str,
        law_id: str | None = None,
        limit: int = DEFAULT_LIMIT,
        threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
    ) -> dict[str, Any]:
        """Semantic search in provisions. In this stand-in "semantic" is the share of
        query words found in the provision (stemmed, 0..1, ties ranked by BM25), not
        embeddings."""
        law = _optional_law(corpus, law_id)
        hits, _ = corpus.search_provisions(
            query, law, limit, require_all=False, threshold=threshold
        )
        return {
            "query": query,
            "law_id": law.doc_id if law else None,
            "total": len(hits),
            "results": [{**corpus.provision_record(p), "similarity": s} for p, s in hits],
        }

    def _reference(target: str, source: str) -> dict[str, Any]:
        p = corpus.find_provision(target)
        return {
            "from": source,
            "to": target,
            "url": p.url if p else lovdata_url_for(target),
            "in_corpus": p is not None,
            "section": p.section if p else None,
            "heading": p.heading if p else None,
        }

    @mcp.tool()
    def get_cross_references(provision_id: str) -> dict[str, Any]:
        """References from one provision to others, and provisions that refer to it."""
        p = corpus.find_provision(provision_id)
        if p is None:
            raise ToolError(f"Fant ingen bestemmelse {provision_id!r}.")
        referenced_by = [
            {"provision_id": o.provision_id, "section": o.section, "url": o.url}
            for o in corpus.provisions
            if p.provision_id in o.cross_references
        ]
        return {
            "provision_id": p.provision_id,
            "url": p.url,
            "references": [_reference(t, p.provision_id) for t in p.cross_references],
            "referenced_by": referenced_by,
        }

    @mcp.tool()
    def get_cross_references_by_law(law_id: str) -> dict[str, Any]:
        """All cross-references from the provisions of one law."""
        law = _law_or_error(corpus, law_id)
        refs = [
            _reference(t, p.provision_id)
            for p in corpus.provisions_of(law)
            for t in p.cross_references
        ]
        return {"law": law.summary(), "total": len(refs), "references": refs}

    @mcp.tool()
    def resolve_reference(reference: str) -> dict[str, Any]:
        """Resolve a citation such as "aml. § 15-7", "husleieloven § 9-6", "grl. § 102" or
        "LOV-2005-06-17-62" to the law and provision it names."""
        resolved = corpus.resolve(reference)
        if resolved is None:
            known = corpus.unknown_law_name(reference)
            if known:
                message = f"{known} finnes ikke i dette utvalget av Lovdata."
                return {
                    "reference": reference,
                    "found": False,
                    "law_name": known,
                    "message": message[:1].upper() + message[1:],
                }
            return {"reference": reference, "found": False, "message": "Ukjent lov."}
        law, provision, section = resolved
        data: dict[str, Any] = {"reference": reference, "law": law.summary()}
        if provision is not None:
            data.update(found=True, type="provision", provision=corpus.provision_record(provision))
        elif section is not None:
            data.update(
                found=False,
                type="provision",
                message=f"§ {section} finnes ikke i korpuset for {law.short_title}.",
                url=f"{law.url}/§{section}",
            )
        else:
            data.update(found=True, type="law")
        return data

    @mcp.tool()
    def health_check() -> dict[str, Any]:
        """Service status."""
        return {
            "status": "ok",
            "server": "lovd demo Lovdata MCP stand-in",
            "laws": len(corpus.laws),
            "provisions": len(corpus.provisions),
            "corpus": str(corpus.path),
        }

    @mcp.tool()
    def license_info() -> dict[str, Any]:
        """Licence and attribution for the data (NLOD 2.0)."""
        return dict(NLOD_LICENSE)

    return mcp


def create_app(
    corpus_path: Path | str | None = None,
    calls_log: Path | str | None = None,
    *,
    token: str | None = None,
    calls: CallLog | None = None,
) -> ASGIApp:
    """The ASGI app: MCP at ``/mcp``, ``GET/DELETE /calls``, ``GET /health``."""
    corpus = Corpus.load(Path(corpus_path) if corpus_path else default_corpus_path())
    log = calls or CallLog(Path(calls_log) if calls_log else None)
    mcp = build_server(corpus, log)

    async def calls_route(request: Request) -> Response:
        if request.method == "DELETE":
            log.clear()
            return Response(status_code=204)
        return JSONResponse(log.snapshot())

    async def health_route(request: Request) -> Response:
        return JSONResponse({"status": "ok", "provisions": len(corpus.provisions)})

    # custom_route() is an untyped decorator in the SDK; calling it keeps the handlers typed.
    mcp.custom_route("/calls", methods=["GET", "DELETE"])(calls_route)
    mcp.custom_route("/health", methods=["GET"])(health_route)

    # The SDK turns on Host-header (DNS-rebinding) checks for loopback binds, which would
    # reject containers calling in as 10.0.2.2 or host.containers.internal. The data is
    # public law text, and a token can be required instead.
    app: ASGIApp = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    if token:
        app = _BearerAuth(app, token)
    return app


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lovd.demo.lovdata_mcp",
        description="Local stand-in for the Lovdata MCP server (streamable HTTP at /mcp).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--corpus", type=Path, default=None, help="corpus JSON (default: fixture)")
    parser.add_argument("--calls-log", type=Path, default=None, help="append tool calls (JSONL)")
    parser.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on /mcp (default: ${TOKEN_ENV} if set)",
    )
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn  # deferred: only the CLI needs the server

    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    app = create_app(args.corpus, args.calls_log, token=token)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    asyncio.run(uvicorn.Server(config).serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
