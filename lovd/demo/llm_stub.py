"""A stub of an OpenAI-compatible chat model, for demo mode and tests.

``POST /v1/chat/completions`` (streamed SSE when ``stream`` is true, JSON otherwise) and
``GET /v1/models``. It plays a model just well enough for a full OpenCode round trip:

1. a legal question, with a Lovdata search tool on offer → a tool call: a search with
   the question's content words, everyday words put as the law puts them ("Kan
   arbeidsgiveren si meg opp uten saklig grunn?" → ``{"query": "arbeidsgiveren
   oppsigelse saklig grunn"}``), within the law it names ("aml", "husleielova", ...);
   a question that cites a section of a law ("aml § 15-7") → ``resolve_reference``;
2. search results → ``get_provision`` for the best provision (reading it), then
   ``get_cross_references`` for it (the legal agent's method: find the law, read the
   provision, follow its references);
3. then → an answer in the question's language that quotes the most relevant sentence
   of the provision read, cites section, law and the exact lovdata.no URL from the
   results, names the other hits and the references it followed, says the text may have
   changed since and that it is not legal advice — or says plainly which law or section
   it could not find;
4. OpenCode's title-generation request → a short title; anything else → a short
   generic answer.

``GET /requests`` lists what each chat request offered (tools, system prompt) and what
the stub answered, so tests can see which agent and tools a session really uses.

    python -m lovd.demo.llm_stub --host 127.0.0.1 --port 8766
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lovd.demo import question as questions

logger = logging.getLogger(__name__)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


MODEL_ID = "legal-stub"
STREAM_CHUNK_WORDS = 4

# Tool suffixes in the order the stub prefers them; OpenCode prefixes MCP tools with the
# server's name ("lovdata_search_provisions_fulltext"), other clients may not.
SEARCH_TOOL_SUFFIXES: tuple[str, ...] = (
    "search_provisions_fulltext",
    "search_provisions_semantic",
    "search_laws_fulltext",
    "search_laws_semantic",
    "resolve_reference",
)

LEGAL_WORDS: frozenset[str] = _words(
    """
    lov loven lover lovens forskrift forskriften paragraf bestemmelse rett rettigheter
    plikt plikter oppsigelse oppsigelsen avskjed arbeidsgiver arbeidstaker arbeidsavtale
    leie husleie leier utleier depositum personvern personopplysninger samtykke grunnlov
    grunnloven ytringsfrihet domstol straff erstatning kontrakt avtale juridisk lovlig
    ulovlig law laws statute regulation section legal lawful unlawful rights dismissal
    tenant landlord employer employee contract privacy constitution court
    """
)

# Words that shape a question but say nothing about its subject.
QUESTION_WORDS: frozenset[str] = _words(
    """
    hva hvem hvor hvordan hvilke hvilken hvilket hvorfor når sier står gjelder om og i
    på til av for med som er det den de en et å at har kan skal må ikke eller fra ved
    etter jeg meg min mitt du deg vi oss meg norsk norske norge loven lov lovens regler
    reglene the a an of to in on for and or is are what which who how does do about say
    says under according rules norway norwegian me my i can law laws legal
    """
)

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_URL_RE = re.compile(r"https://lovdata\.no/[^\s\"'<>)\]\\,]+")
_LAW_NAME_RE = re.compile(r"^\w+(loven|lova|lov)$")
_ENGLISH_HINTS = frozenset({"what", "does", "the", "law", "how", "which", "is", "are"})


@dataclass(frozen=True)
class Reply:
    """What the stub decided to say: either text or one tool call."""

    text: str = ""
    tool_name: str | None = None
    tool_arguments: dict[str, Any] | None = None


# --- message helpers ---------------------------------------------------------------------


def message_text(message: dict[str, Any]) -> str:
    """Content of a chat message as text (string or list of content parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def tool_names(body: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for tool in body.get("tools") or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return names


def tool_parameters(body: dict[str, Any], name: str) -> set[str]:
    for tool in body.get("tools") or []:
        fn = tool.get("function") or {}
        if fn.get("name") == name:
            return set((fn.get("parameters") or {}).get("properties") or {})
    return set()


def pick_search_tool(names: Sequence[str]) -> str | None:
    for suffix in SEARCH_TOOL_SUFFIXES:
        for name in names:
            if name.endswith(suffix):
                return name
    return None


def is_title_request(messages: Sequence[dict[str, Any]], body: dict[str, Any]) -> bool:
    """OpenCode asks for a session title with a dedicated system prompt and no tools."""
    if body.get("tools"):
        return False
    system = " ".join(message_text(m) for m in messages if m.get("role") == "system").lower()
    return "title" in system and ("generat" in system or "thread" in system)


def looks_legal(question: str, names: Sequence[str]) -> bool:
    words = {w.lower() for w in _WORD_RE.findall(question)}
    if words & LEGAL_WORDS or "§" in question:
        return True
    if any(_LAW_NAME_RE.match(w) for w in words):
        return True
    # With Lovdata tools on offer, any question is taken to be about law.
    return "?" in question and any("lovdata" in n for n in names)


def extract_query(question: str) -> tuple[str, str | None]:
    """(search words, law named in the question or None).

    "Hva sier arbeidsmiljøloven om oppsigelse?" → ("oppsigelse", "arbeidsmiljøloven").
    """
    read = questions.read(question)
    return (read.query or read.law or question.strip()), read.law


def is_english(text: str) -> bool:
    words = {w.lower() for w in _WORD_RE.findall(text)}
    return len(words & _ENGLISH_HINTS) >= 2


# --- answers from tool results -----------------------------------------------------------


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def provisions_in(tool_output: str) -> list[dict[str, Any]]:
    """Provision records (dicts with a section and a lovdata.no URL) in a tool result."""
    try:
        data: Any = json.loads(tool_output)
    except ValueError:
        # Some clients wrap the MCP text; fall back to the first JSON object inside.
        start, end = tool_output.find("{"), tool_output.rfind("}")
        try:
            data = json.loads(tool_output[start : end + 1]) if start >= 0 else None
        except ValueError:
            data = None
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in _walk(data):
        url = item.get("url")
        if not isinstance(url, str) or not item.get("section"):
            continue
        if url.startswith("https://lovdata.no/") and url not in seen:
            seen.add(url)
            found.append(item)
    return found


def _sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    found = [m.group(1).strip() for m in re.finditer(r"(.+?[.!?])(?=\s|$)", flat)]
    return [x for x in found if x] or [flat]


def _clip(sentence: str, limit: int = 320) -> str:
    return sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "..."


def _quote(text: str, question: str) -> str:
    """What a reader would quote: the provision's first sentence (its rule), and the
    sentence sharing most word stems with the question when that is another one."""
    asked = {w[:5] for w in questions.read(question).words if len(w) > 3}

    def overlap(sentence: str) -> int:
        return len(asked & {w.lower()[:5] for w in _WORD_RE.findall(sentence) if len(w) > 3})

    sentences = _sentences(text)
    first = sentences[0]
    best = max(sentences[1:], key=overlap, default=first)
    if overlap(best) > overlap(first):
        return f"{_clip(first)} … {_clip(best)}"
    return _clip(first)


def _not_found(question: str, tool_output: str, english: bool) -> str:
    """No provision: say plainly which law or section was not found, or that nothing was."""
    read = questions.read(question)
    law = read.law_name or read.law
    missing_law = "Fant ingen lov" in tool_output or "finnes ikke i dette utvalget" in tool_output
    missing_section = re.search(r"§ ?([\w-]+) finnes ikke i korpuset", tool_output)
    urls = list(dict.fromkeys(_URL_RE.findall(tool_output)))
    if law and missing_law:
        if english:
            return (
                f"I could not find {law} in the Lovdata selection I have access to, so I "
                "cannot answer from that law. Check lovdata.no or ask a lawyer."
            )
        return (
            f"Jeg fant ikke {law} i Lovdata-utvalget jeg har tilgang til, så jeg kan ikke "
            "svare ut fra den loven. Sjekk lovdata.no eller spør en advokat."
        )
    if missing_section:
        where = f" i {law}" if law else ""
        link = f" Se {urls[0]}." if urls else ""
        if english:
            return f"I could not find § {missing_section.group(1)}{where} in Lovdata.{link}"
        return f"Jeg fant ikke § {missing_section.group(1)}{where} i Lovdata.{link}"
    if urls:
        lead = "Relevant sources:" if english else "Relevante kilder:"
        return lead + "\n" + "\n".join(f"- {u}" for u in urls[:3])
    if english:
        return (
            "I found no provisions in Lovdata that answer the question. Try rephrasing "
            "it or naming the law."
        )
    where = f" i {law}" if law else " i Lovdata"
    return (
        f"Jeg fant ingen bestemmelser{where} som besvarer spørsmålet. Prøv å "
        "omformulere det eller nevne hvilken lov det gjelder."
    )


def answer_from_tool_output(
    question: str, tool_output: str, cross_references: str = "", read: str = ""
) -> str:
    """The answer from what the tools returned: ``tool_output`` (search and resolve
    results), ``read`` (the provision read with get_provision, cited first) and
    ``cross_references`` (a get_cross_references result)."""
    provisions = provisions_in(read) + provisions_in(tool_output)
    provisions = list({p["url"]: p for p in reversed(provisions)}.values())[::-1]
    english = is_english(question)
    if not provisions:
        return _not_found(question, tool_output, english)
    first = provisions[0]
    lines: list[str] = []
    lines.append(
        "According to the provisions I found in Lovdata:"
        if english
        else "Etter bestemmelsene jeg fant i Lovdata:"
    )
    law = first.get("law_short_title") or first.get("law_title") or ""
    heading = f" ({first['heading']})" if first.get("heading") else ""
    body = str(first.get("text") or first.get("snippet") or "")
    quote = _quote(body, question)
    lines.append(f"\n**{first['section']} {law}**{heading}: {quote}")
    lines.append(f"{'Source' if english else 'Kilde'}: {first['url']}")
    others = provisions[1:3]
    if others:
        lines.append("\nSee also:" if english else "\nSe også:")
        for item in others:
            other_law = item.get("law_short_title") or ""
            other_heading = f" ({item['heading']})" if item.get("heading") else ""
            lines.append(f"- {item['section']} {other_law}{other_heading}: {item['url']}")
    title = first.get("law_title")
    if title:
        date = f", {first['law_date']}" if first.get("law_date") else ""
        lines.append(f"\n{'Law' if english else 'Lov'}: {title}{date}.")
    lines.extend(_followed(cross_references, english))
    if english:
        lines.append(
            "\nThe text is as Lovdata holds it today and may have been amended since: check "
            "the consolidated version on lovdata.no before you rely on it. This is legal "
            "information, not legal advice; for a concrete case, ask a lawyer or the "
            "competent authority. (Answer by lovd's offline demo model.)"
        )
    else:
        lines.append(
            "\nTeksten er slik Lovdata har den i dag og kan være endret senere: sjekk "
            "gjeldende versjon på lovdata.no før du bygger på den. Dette er juridisk "
            "informasjon, ikke juridisk rådgivning; i en konkret sak bør du spørre en "
            "advokat eller rette myndighet. (Svar fra lovds demomodell uten nett.)"
        )
    return "\n".join(lines)


def _followed(cross_references: str, english: bool) -> list[str]:
    """The references the stub followed (a get_cross_references result), as cited lines."""
    try:
        data = json.loads(cross_references) if cross_references else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return []
    refs = [r for r in data.get("references") or [] if isinstance(r, dict) and r.get("url")]
    refs += [r for r in data.get("referenced_by") or [] if isinstance(r, dict) and r.get("url")]
    if not refs:
        return []
    lead = "References I followed:" if english else "Henvisninger jeg fulgte:"
    out = [f"\n{lead}"]
    for ref in refs[:4]:
        section = ref.get("section") or ref.get("to") or ref.get("provision_id") or ""
        heading = f" ({ref['heading']})" if ref.get("heading") else ""
        out.append(f"- {section}{heading}: {ref['url']}")
    return out


# --- the decision -------------------------------------------------------------------------


def _tool(names: Sequence[str], suffix: str) -> str | None:
    """The offered tool with this name, with or without OpenCode's server prefix."""
    return next((n for n in names if n == suffix or n.endswith("_" + suffix)), None)


def first_call(question: str, names: Sequence[str], body: dict[str, Any]) -> Reply | None:
    """The first tool call for a question: resolve a cited section of a named law, or
    search with the question's content words (within the law it names)."""
    read = questions.read(question)
    resolve = _tool(names, "resolve_reference")
    if read.sections and read.law and resolve:
        reference = f"{read.law} § {read.sections[0]}"
        return Reply(tool_name=resolve, tool_arguments={"reference": reference})
    tool = pick_search_tool(names)
    if tool is None:
        return None
    if tool.endswith("resolve_reference"):
        return Reply(tool_name=tool, tool_arguments={"reference": question.strip()})
    params = tool_parameters(body, tool)
    query = " ".join([*(f"§ {s}" for s in read.sections), *read.words])
    args: dict[str, Any] = {"query": query or read.law or question.strip()}
    if read.law and "law_id" in params:
        args["law_id"] = read.law
    if "limit" in params:
        args["limit"] = SEARCH_LIMIT
    return Reply(tool_name=tool, tool_arguments=args)


def decide(body: dict[str, Any]) -> Reply:
    messages: list[dict[str, Any]] = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if not messages:
        return Reply(text="Hei! Still meg et spørsmål om norsk lov.")
    if is_title_request(messages, body):
        users = [message_text(m) for m in messages if m.get("role") == "user"]
        return Reply(text=make_title(users[-1] if users else ""))
    last = messages[-1]
    question = next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    names = tool_names(body)
    if last.get("role") == "tool":
        # All tool results since the question, in order; the model answers from them.
        found: list[str] = []
        reads: list[str] = []
        followed: list[str] = []
        for name, output in reversed(list(_tool_results_since_question(messages))):
            if name.endswith(XREF_SUFFIX):
                followed.append(output)
            elif name.endswith(READ_SUFFIX):
                reads.append(output)
            else:
                found.append(output)
        hits = provisions_in("\n".join(found))
        best = provisions_in("\n".join(reads))[:1] or hits[:1]
        best_id = best[0].get("provision_id") if best else None
        reader = _tool(names, READ_SUFFIX)
        if reader and not reads and best_id:
            return Reply(tool_name=reader, tool_arguments={"provision_id": best_id})
        xref = _tool(names, XREF_SUFFIX)
        if xref and not followed and best_id:
            return Reply(tool_name=xref, tool_arguments={"provision_id": best_id})
        text = answer_from_tool_output(
            question, "\n".join(found), "\n".join(followed), "\n".join(reads)
        )
        return Reply(text=text)
    if last.get("role") == "user" and looks_legal(question, names):
        call = first_call(question, names, body)
        if call is not None:
            return call
    if is_english(question):
        return Reply(text="I am a demo model for Norwegian legal questions. Ask me about a law.")
    return Reply(text="Jeg er en demomodell for spørsmål om norsk rett. Spør meg gjerne om en lov.")


XREF_SUFFIX = "get_cross_references"
READ_SUFFIX = "get_provision"
SEARCH_LIMIT = 5


def _tool_results_since_question(
    messages: Sequence[dict[str, Any]],
) -> Iterator[tuple[str, str]]:
    """(tool name, result text) of the tool results after the last user message, newest
    first; the name comes from the assistant message that made the call."""
    called: dict[str, str] = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                called[str(call.get("id"))] = str(call["function"].get("name", ""))
    for m in reversed(messages):
        if m.get("role") == "user":
            return
        if m.get("role") == "tool":
            yield called.get(str(m.get("tool_call_id")), ""), message_text(m)


def make_title(text: str) -> str:
    words = _WORD_RE.findall(text)[:6]
    title = " ".join(words) or "Juridisk spørsmål"
    return title[:1].upper() + title[1:]


# --- HTTP ---------------------------------------------------------------------------------


def _chunk(
    completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def stream_chunks(reply: Reply, model: str, *, include_usage: bool) -> list[dict[str, Any]]:
    """The reply as OpenAI streaming chunks (without the final ``[DONE]``)."""
    cid = f"chatcmpl-{secrets.token_hex(8)}"
    created = int(time.time())
    chunks = [_chunk(cid, created, model, {"role": "assistant", "content": ""}, None)]
    if reply.tool_name is not None:
        arguments = json.dumps(reply.tool_arguments or {}, ensure_ascii=False)
        call_id = f"call_{secrets.token_hex(6)}"
        head = {"index": 0, "id": call_id, "type": "function"}
        head["function"] = {"name": reply.tool_name, "arguments": ""}
        chunks.append(_chunk(cid, created, model, {"tool_calls": [head]}, None))
        # Split the JSON arguments like a real model streams them.
        middle = max(1, len(arguments) // 2)
        for piece in (arguments[:middle], arguments[middle:]):
            tool_delta = {"index": 0, "function": {"arguments": piece}}
            chunks.append(_chunk(cid, created, model, {"tool_calls": [tool_delta]}, None))
        finish = "tool_calls"
    else:
        words = reply.text.split(" ")
        for i in range(0, len(words), STREAM_CHUNK_WORDS):
            piece = " ".join(words[i : i + STREAM_CHUNK_WORDS])
            if i + STREAM_CHUNK_WORDS < len(words):
                piece += " "
            chunks.append(_chunk(cid, created, model, {"content": piece}, None))
        finish = "stop"
    chunks.append(_chunk(cid, created, model, {}, finish))
    if include_usage:
        usage = _usage(reply)
        chunks.append(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    return chunks


def _usage(reply: Reply) -> dict[str, int]:
    completion = max(1, len(reply.text.split()) + (10 if reply.tool_name else 0))
    return {"prompt_tokens": 100, "completion_tokens": completion, "total_tokens": 100 + completion}


def completion_json(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    finish = "stop"
    if reply.tool_name is not None:
        message["tool_calls"] = [
            {
                "id": f"call_{secrets.token_hex(6)}",
                "type": "function",
                "function": {
                    "name": reply.tool_name,
                    "arguments": json.dumps(reply.tool_arguments or {}, ensure_ascii=False),
                },
            }
        ]
        finish = "tool_calls"
    return {
        "id": f"chatcmpl-{secrets.token_hex(8)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": _usage(reply),
    }


REQUESTS_KEY = web.AppKey("requests", list)
MAX_RECORDED = 200


def summary(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """What a test needs to see of one chat request: which tools the client offered, its
    system prompt, and what the stub answered (not the whole conversation)."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    return {
        "tools": tool_names(body),
        "system": "\n".join(message_text(m) for m in messages if m.get("role") == "system"),
        "messages": len(messages),
        "reply_tool": reply.tool_name,
        "reply_text": reply.text,
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": {"message": "expected an object"}}, status=400)
    reply = decide(body)
    recorded = request.app[REQUESTS_KEY]
    recorded.append(summary(body, reply))
    del recorded[:-MAX_RECORDED]
    model = str(body.get("model") or MODEL_ID)
    logger.info(
        "chat: %d messages, %d tools -> %s",
        len(body.get("messages") or []),
        len(body.get("tools") or []),
        f"tool {reply.tool_name}" if reply.tool_name else f"{len(reply.text)} chars",
    )
    if not body.get("stream"):
        return web.json_response(completion_json(reply, model))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for chunk in stream_chunks(reply, model, include_usage=include_usage):
        await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "lovd"}],
        }
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def requests_seen(request: web.Request) -> web.Response:
    """``GET /requests``: the recorded chat requests (see :func:`summary`), for tests that
    check what an OpenCode session offers its model (like the MCP stand-in's /calls)."""
    return web.json_response(request.app[REQUESTS_KEY])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _require_key(api_key: str) -> Any:
    """Refuse calls without ``Authorization: Bearer <api_key>``, as a real provider would
    (tests use it to show which key reached the provider)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        got = request.headers.get("Authorization", "")
        if request.path.startswith("/v1/") and not hmac.compare_digest(
            got.encode(), f"Bearer {api_key}".encode()
        ):
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=401)
        return await handler(request)

    return check


def create_app(api_key: str = "") -> web.Application:
    app = web.Application(middlewares=[_require_key(api_key)] if api_key else [])
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/requests", requests_seen)
    app[REQUESTS_KEY] = []
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lovd.demo.llm_stub",
        description="OpenAI-compatible stub model for lovd's demo mode and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    web.run_app(create_app(), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
