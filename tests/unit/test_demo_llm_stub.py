"""The OpenAI-compatible stub model, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lovd.demo import llm_stub
from lovd.demo.serve import StandIn, serve_llm_stub

QUESTION = "Hva sier arbeidsmiljøloven om oppsigelse?"


def lovdata_tools() -> list[dict[str, Any]]:
    def tool(name: str, props: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": "",
                "parameters": {"type": "object", "properties": props},
            },
        }

    return [
        tool("read", {"filePath": {"type": "string"}}),
        tool("lovdata_get_provision", {"provision_id": {"type": "string"}}),
        tool(
            "lovdata_search_provisions_fulltext",
            {
                "query": {"type": "string"},
                "law_id": {"type": "string"},
                "limit": {"type": "integer"},
            },
        ),
    ]


TOOL_RESULT = {
    "query": "oppsigelse",
    "results": [
        {
            "provision_id": "NL/lov/2005-06-17-62/§15-7",
            "law_title": "Lov om arbeidsmiljø, arbeidstid og stillingsvern mv. (arbeidsmiljøloven)",
            "law_short_title": "arbeidsmiljøloven",
            "law_date": "2005-06-17",
            "section": "§ 15-7",
            "heading": "Vern mot usaklig oppsigelse",
            "url": "https://lovdata.no/lov/2005-06-17-62/§15-7",
            "text": "(1) Arbeidstaker kan ikke sies opp uten at det er saklig begrunnet i "
            "virksomhetens, arbeidsgivers eller arbeidstakers forhold.\n\n(2) ...",
        }
    ],
}


@pytest.fixture
async def stub() -> AsyncIterator[StandIn]:
    standin = await serve_llm_stub()
    yield standin
    await standin.stop()


async def stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streamed completion and parse every SSE chunk."""
    chunks: list[dict[str, Any]] = []
    done = False
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/chat/completions", json={**body, "stream": True}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                done = True
                continue
            chunks.append(json.loads(payload))
    assert done
    return chunks


def tool_call_from(chunks: list[dict[str, Any]]) -> tuple[str, dict[str, Any], str | None]:
    name = ""
    arguments = ""
    finish = None
    for chunk in chunks:
        for choice in chunk["choices"]:
            for call in choice["delta"].get("tool_calls", []):
                name += call.get("function", {}).get("name", "")
                arguments += call.get("function", {}).get("arguments", "")
            finish = choice.get("finish_reason") or finish
    return name, json.loads(arguments), finish


def text_from(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"])


async def test_legal_question_streams_a_tool_call(stub: StandIn) -> None:
    chunks = await stream(
        stub.base_url,
        {
            "model": "legal-stub",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": QUESTION},
            ],
            "tools": lovdata_tools(),
            "stream_options": {"include_usage": True},
        },
    )
    name, args, finish = tool_call_from(chunks)
    assert name == "lovdata_search_provisions_fulltext"
    assert args == {"query": "oppsigelse", "law_id": "arbeidsmiljøloven", "limit": 5}
    assert finish == "tool_calls"
    assert chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_answer_after_tool_result_cites_the_url(stub: StandIn) -> None:
    def call(cid: str, name: str, arguments: str, result: Any) -> list[dict[str, Any]]:
        fn = {"name": name, "arguments": arguments}
        return [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": cid, "type": "function", "function": fn}],
            },
            {"role": "tool", "tool_call_id": cid, "content": json.dumps(result)},
        ]

    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        *call(
            "call_1", "lovdata_search_provisions_fulltext", '{"query":"oppsigelse"}', TOOL_RESULT
        ),
    ]
    body = {"model": "legal-stub", "messages": messages, "tools": lovdata_tools()}
    # It reads the best provision it found before it answers.
    name, args, _ = tool_call_from(await stream(stub.base_url, body))
    assert name == "lovdata_get_provision"
    assert args == {"provision_id": "NL/lov/2005-06-17-62/§15-7"}
    messages += call("call_2", name, json.dumps(args), TOOL_RESULT["results"][0])
    chunks = await stream(stub.base_url, {**body, "messages": messages})
    text = text_from(chunks)
    assert "https://lovdata.no/lov/2005-06-17-62/§15-7" in text
    assert "§ 15-7 arbeidsmiljøloven" in text
    assert "Arbeidstaker kan ikke sies opp uten at det er saklig begrunnet" in text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_non_streamed_completion_and_models(stub: StandIn) -> None:
    async with aiohttp.ClientSession() as http:
        body = {
            "model": "legal-stub",
            "messages": [{"role": "user", "content": QUESTION}],
            "tools": lovdata_tools(),
        }
        async with http.post(stub.base_url + "/v1/chat/completions", json=body) as resp:
            data = await resp.json()
        choice = data["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        call = choice["message"]["tool_calls"][0]
        assert call["function"]["name"] == "lovdata_search_provisions_fulltext"
        assert json.loads(call["function"]["arguments"])["query"] == "oppsigelse"
        async with http.get(stub.base_url + "/v1/models") as resp:
            models = await resp.json()
        assert [m["id"] for m in models["data"]] == ["legal-stub"]
        async with http.post(stub.base_url + "/v1/chat/completions", data=b"{") as resp:
            assert resp.status == 400


async def test_title_request_gets_a_short_title(stub: StandIn) -> None:
    chunks = await stream(
        stub.base_url,
        {
            "model": "legal-stub",
            "messages": [
                {
                    "role": "system",
                    "content": "You are a title generator. You output ONLY a thread title.",
                },
                {"role": "user", "content": "Generate a title for this conversation:\n"},
                {"role": "user", "content": QUESTION},
            ],
        },
    )
    title = text_from(chunks)
    assert 0 < len(title) <= 60
    assert "\n" not in title


async def test_small_talk_without_tools_gets_a_generic_answer(stub: StandIn) -> None:
    chunks = await stream(
        stub.base_url, {"model": "legal-stub", "messages": [{"role": "user", "content": "Hei"}]}
    )
    assert "norsk rett" in text_from(chunks)


@pytest.mark.parametrize(
    ("question", "query", "law"),
    [
        (QUESTION, "oppsigelse", "arbeidsmiljøloven"),
        (
            "Hvor stort depositum kan utleier kreve etter husleieloven?",
            "depositum utleier kreve",
            "husleieloven",
        ),
        ("What does Norwegian law say about dismissal?", "dismissal", None),
        (
            "Kan arbeidsgiveren si meg opp uten saklig grunn?",
            "arbeidsgiveren oppsigelse saklig grunn",
            None,
        ),
        ("Kan huseieren kaste meg ut?", "utleier oppsigelse", None),
        ("Hva sier hl om depositum?", "depositum", "husleieloven"),
        ("Hva sier avhl om mangler?", "mangler", "avhendingslova"),
    ],
)
def test_extract_query(question: str, query: str, law: str | None) -> None:
    assert llm_stub.extract_query(question) == (query, law)


def test_any_question_is_legal_when_lovdata_tools_are_offered() -> None:
    assert llm_stub.looks_legal("Kan sjefen min gjøre dette?", ["lovdata_search_laws_fulltext"])
    assert not llm_stub.looks_legal("Hva er klokka?", ["read"])
    assert llm_stub.looks_legal("Hva sier § 102?", [])


def test_no_search_tool_means_no_tool_call() -> None:
    reply = llm_stub.decide({"messages": [{"role": "user", "content": QUESTION}], "tools": []})
    assert reply.tool_name is None
    assert reply.text


def test_tool_result_without_hits_says_so() -> None:
    text = llm_stub.answer_from_tool_output(QUESTION, json.dumps({"results": []}))
    assert "fant ingen bestemmelser" in text
