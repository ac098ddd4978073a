"""The Lovdata MCP stand-in, through a real MCP client over streamable HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytest.importorskip("mcp")
pytest.importorskip("uvicorn")

from mcp import Client

from lovd.demo import lovdata_mcp
from lovd.demo.serve import StandIn, serve_lovdata_mcp

EXPECTED_TOOLS = {
    "get_law",
    "list_laws",
    "search_laws_fulltext",
    "search_laws_semantic",
    "get_law_content",
    "get_law_text",
    "get_provision",
    "get_provisions_batch",
    "list_provisions",
    "search_provisions_fulltext",
    "search_provisions_semantic",
    "get_cross_references",
    "get_cross_references_by_law",
    "resolve_reference",
    "health_check",
    "license_info",
}
AML_15_7 = "https://lovdata.no/lov/2005-06-17-62/§15-7"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[StandIn]:
    standin = await serve_lovdata_mcp(calls_log=tmp_path / "calls.jsonl")
    yield standin
    await standin.stop()


async def call(url: str, tool: str, args: dict[str, Any]) -> tuple[bool, Any]:
    async with Client(url) as client:
        result = await client.call_tool(tool, args)
    text = result.content[0].text  # type: ignore[union-attr]
    if result.is_error:
        return True, text
    return False, json.loads(text)


async def test_lists_the_real_lovdata_tool_names(server: StandIn) -> None:
    async with Client(server.base_url + "/mcp") as client:
        tools = await client.list_tools()
    names = {t.name for t in tools.tools}
    assert names == EXPECTED_TOOLS
    schema = next(t for t in tools.tools if t.name == "search_provisions_fulltext").input_schema
    assert set(schema["properties"]) == {"query", "law_id", "limit"}
    schema = next(t for t in tools.tools if t.name == "search_provisions_semantic").input_schema
    assert set(schema["properties"]) == {"query", "law_id", "limit", "threshold"}


async def test_fulltext_search_finds_oppsigelse_in_aml(server: StandIn) -> None:
    err, data = await call(
        server.base_url + "/mcp",
        "search_provisions_fulltext",
        {"query": "oppsigelse", "law_id": "arbeidsmiljøloven", "limit": 10},
    )
    assert not err
    urls = [r["url"] for r in data["results"]]
    assert AML_15_7 in urls
    assert all(u.startswith("https://lovdata.no/lov/2005-06-17-62/§") for u in urls)
    hit = next(r for r in data["results"] if r["url"] == AML_15_7)
    assert hit["section"] == "§ 15-7"
    assert hit["heading"] == "Vern mot usaklig oppsigelse"
    assert hit["text"].startswith("(1) Arbeidstaker kan ikke sies opp uten at det er saklig")


@pytest.mark.parametrize(
    ("reference", "url"),
    [
        ("aml. § 15-7", AML_15_7),
        ("arbeidsmiljøloven §15-7", AML_15_7),
        ("LOV-2005-06-17-62 § 15-7", AML_15_7),
        ("husll. § 9-6", "https://lovdata.no/lov/1999-03-26-17/§9-6"),
        ("grl. § 102", "https://lovdata.no/lov/1814-05-17/§102"),
        ("Grunnloven § 98", "https://lovdata.no/lov/1814-05-17/§98"),
    ],
)
async def test_resolve_reference(server: StandIn, reference: str, url: str) -> None:
    err, data = await call(server.base_url + "/mcp", "resolve_reference", {"reference": reference})
    assert not err
    assert data["found"] is True
    assert data["provision"]["url"] == url


async def test_resolve_reference_to_law_and_unknown(server: StandIn) -> None:
    url = server.base_url + "/mcp"
    _, data = await call(url, "resolve_reference", {"reference": "popplyl."})
    assert data["type"] == "law"
    assert data["law"]["doc_id"] == "NL/lov/2018-06-15-38"
    _, data = await call(url, "resolve_reference", {"reference": "aml. § 99-1"})
    assert data["found"] is False
    assert data["url"] == "https://lovdata.no/lov/2005-06-17-62/§99-1"
    _, data = await call(url, "resolve_reference", {"reference": "tullball § 1"})
    assert data["found"] is False


async def test_law_and_provision_tools(server: StandIn) -> None:
    url = server.base_url + "/mcp"
    _, law = await call(url, "get_law", {"doc_id": "NL/lov/1999-03-26-17"})
    assert law["short_title"] == "husleieloven"
    assert {"section": "§ 3-5", "heading": "Depositum"}.items() <= law["table_of_contents"][
        0
    ].items()
    _, laws = await call(url, "list_laws", {"legal_area": "arbeidsrett"})
    assert [x["short_title"] for x in laws["laws"]] == ["arbeidsmiljøloven"]
    _, page = await call(url, "list_laws", {"limit": 2, "offset": 2})
    assert page["total"] == 4
    assert len(page["laws"]) == 2
    _, text = await call(url, "get_law_text", {"doc_id": "grl."})
    assert (
        "Kongeriket Norge er et fritt, selvstendig, udelelig og uavhendelig rike." in text["text"]
    )
    _, content = await call(url, "get_law_content", {"doc_id": "aml"})
    assert "<h2>§ 15-7. Vern mot usaklig oppsigelse</h2>" in content["content"]
    _, batch = await call(
        url,
        "get_provisions_batch",
        {"ids": ["NL/lov/2005-06-17-62/§15-7", "aml. § 15-8", "NL/lov/x/§1"]},
    )
    assert [p["section"] for p in batch["provisions"]] == ["§ 15-7", "§ 15-8"]
    assert batch["not_found"] == ["NL/lov/x/§1"]
    _, listed = await call(url, "list_provisions", {"law_id": "husleieloven", "limit": 3})
    assert listed["total"] == 8
    assert [p["section"] for p in listed["provisions"]] == ["§ 3-5", "§ 9-2", "§ 9-4"]
    err, message = await call(url, "get_provision", {"provision_id": "NL/lov/x/§1"})
    assert err
    assert "Fant ingen bestemmelse" in message


async def test_cross_references(server: StandIn) -> None:
    url = server.base_url + "/mcp"
    _, refs = await call(url, "get_cross_references", {"provision_id": "NL/lov/1999-03-26-17/§9-7"})
    targets = {r["to"]: r for r in refs["references"]}
    assert targets["NL/lov/1999-03-26-17/§9-8"]["in_corpus"] is True
    outside = targets["NL/lov/1992-06-26-86/§13-2"]
    assert outside["in_corpus"] is False
    assert outside["url"] == "https://lovdata.no/lov/1992-06-26-86/§13-2"
    assert [r["provision_id"] for r in refs["referenced_by"]] == ["NL/lov/1999-03-26-17/§9-2"]
    _, by_law = await call(url, "get_cross_references_by_law", {"law_id": "aml."})
    assert by_law["total"] == 10  # § 15-6: 1, § 15-12: 6, § 15-14: 3


async def test_searches_over_laws_and_semantic(server: StandIn) -> None:
    url = server.base_url + "/mcp"
    _, laws = await call(url, "search_laws_fulltext", {"query": "depositum"})
    assert [x["short_title"] for x in laws["results"]] == ["husleieloven"]
    _, sem = await call(url, "search_laws_semantic", {"query": "personopplysninger og personvern"})
    assert sem["results"][0]["short_title"] == "personopplysningsloven"
    _, sem = await call(
        url,
        "search_provisions_semantic",
        {"query": "oppsigelse ved sykdom", "law_id": "aml.", "threshold": 0.9},
    )
    assert sem["results"][0]["url"] == "https://lovdata.no/lov/2005-06-17-62/§15-8"
    assert all(r["similarity"] >= 0.9 for r in sem["results"])
    _, none = await call(url, "search_provisions_fulltext", {"query": "romfart"})
    assert none["total"] == 0


async def test_health_and_license(server: StandIn) -> None:
    url = server.base_url + "/mcp"
    _, health = await call(url, "health_check", {})
    assert health["status"] == "ok"
    assert health["provisions"] == 20
    _, lic = await call(url, "license_info", {})
    assert "NLOD" in lic["license"]
    assert lic["license_url"] == "https://data.norge.no/nlod/no/2.0"


async def test_calls_are_recorded_in_memory_file_and_endpoint(
    server: StandIn, tmp_path: Path
) -> None:
    url = server.base_url + "/mcp"
    await call(url, "resolve_reference", {"reference": "aml. § 15-7"})
    await call(url, "get_provision", {"provision_id": "does-not-exist"})
    async with aiohttp.ClientSession() as http:
        async with http.get(server.base_url + "/calls") as resp:
            calls = await resp.json()
        assert [c["tool"] for c in calls] == ["resolve_reference", "get_provision"]
        assert calls[0]["arguments"] == {"reference": "aml. § 15-7"}
        assert calls[0]["ts"].endswith("+00:00")
        lines = (tmp_path / "calls.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["tool"] for line in lines] == [
            "resolve_reference",
            "get_provision",
        ]
        async with http.delete(server.base_url + "/calls") as resp:
            assert resp.status == 204
        async with http.get(server.base_url + "/calls") as resp:
            assert await resp.json() == []


async def test_corpus_is_swappable(tmp_path: Path) -> None:
    corpus = {
        "laws": [
            {
                "doc_id": "NL/lov/1997-02-28-19",
                "law_id": "LOV-1997-02-28-19",
                "short_title": "folketrygdloven",
                "title": "Lov om folketrygd (folketrygdloven)",
                "date": "1997-02-28",
                "type": "lov",
                "legal_area": "trygderett",
                "abbreviations": ["ftrl."],
            }
        ],
        "provisions": [
            {
                "provision_id": "NL/lov/1997-02-28-19/§1-1",
                "law_doc_id": "NL/lov/1997-02-28-19",
                "section": "§ 1-1",
                "heading": "Formål",
                "text": "Formålet med folketrygden er å gi økonomisk trygghet.",
            }
        ],
    }
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(corpus, ensure_ascii=False), encoding="utf-8")
    standin = await serve_lovdata_mcp(corpus_path=path)
    try:
        err, data = await call(
            standin.base_url + "/mcp", "resolve_reference", {"reference": "ftrl. § 1-1"}
        )
        assert not err
        # URLs default to lovdata.no's pattern when the corpus gives none.
        assert data["provision"]["url"] == "https://lovdata.no/lov/1997-02-28-19/§1-1"
    finally:
        await standin.stop()


async def test_token_is_required_when_configured() -> None:
    standin = await serve_lovdata_mcp(token="t0ken")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(standin.base_url + "/mcp", json={}) as resp:
                assert resp.status == 401
            async with http.get(standin.base_url + "/calls") as resp:
                assert resp.status == 200
        import httpx2  # the MCP SDK's HTTP client

        headers = {"Authorization": "Bearer t0ken"}
        async with httpx2.AsyncClient(headers=headers) as http_client:
            from mcp.client.streamable_http import streamable_http_client

            async with streamable_http_client(
                standin.base_url + "/mcp", http_client=http_client
            ) as (read, write):
                from mcp import ClientSession

                async with ClientSession(read, write) as session:
                    await session.initialize()
                    result = await session.call_tool("health_check", {})
        assert not result.is_error
    finally:
        await standin.stop()


def test_cli_arguments() -> None:
    args = lovdata_mcp._parse_args(
        ["--host", "0.0.0.0", "--port", "9", "--corpus", "/x.json", "--calls-log", "/y"]
    )
    assert (args.host, args.port, str(args.corpus), str(args.calls_log)) == (
        "0.0.0.0",
        9,
        "/x.json",
        "/y",
    )


async def test_norwegian_search_stems_ranks_and_falls_back(server: StandIn) -> None:
    url = server.base_url + "/mcp"
    # "arbeidsgiveren" (definite form) finds "arbeidsgiver"; BM25 puts § 15-7 first.
    _, data = await call(
        url, "search_provisions_fulltext", {"query": "arbeidsgiveren saklig grunn"}
    )
    assert data["match"] == "all"
    assert data["results"][0]["url"] == AML_15_7
    # No provision holds every word: any word may match, best first, and it says so.
    _, data = await call(url, "search_provisions_fulltext", {"query": "oppsigelse sykdom romfart"})
    assert data["match"] == "any"
    assert data["results"][0]["url"] == "https://lovdata.no/lov/2005-06-17-62/§15-8"
    # A compound the corpus lacks falls back to its head; a typo to the nearest word.
    _, data = await call(url, "search_provisions_fulltext", {"query": "oppsigelsestid"})
    assert data["searched_instead"] == {"oppsigelsestid": "oppsigelsesfrist"}
    assert data["results"][0]["url"] == "https://lovdata.no/lov/1999-03-26-17/§9-6"
    # "§ 15-7" in a query keeps to provisions with that number.
    _, data = await call(url, "search_provisions_fulltext", {"query": "§ 15-7"})
    assert [r["url"] for r in data["results"]] == [AML_15_7]
    _, data = await call(url, "search_provisions_fulltext", {"query": "aml § 15-7"})
    assert [r["url"] for r in data["results"]] == [AML_15_7]


@pytest.mark.parametrize("name", ["hl", "husll.", "husleielova", "Husleieloven", "husleielov"])
async def test_short_and_inflected_law_names(server: StandIn, name: str) -> None:
    _, data = await call(
        server.base_url + "/mcp",
        "search_provisions_fulltext",
        {"query": "depositum", "law_id": name},
    )
    assert data["law_id"] == "NL/lov/1999-03-26-17"
    assert data["results"][0]["section"] == "§ 3-5"


async def test_a_known_law_outside_the_corpus_is_named(server: StandIn) -> None:
    url = server.base_url + "/mcp"
    _, data = await call(url, "resolve_reference", {"reference": "avhl. § 3-9"})
    assert data["found"] is False
    assert data["law_name"] == "avhendingslova"
    err, message = await call(
        url, "search_provisions_fulltext", {"query": "tyveri", "law_id": "strl"}
    )
    assert err and "straffeloven" in message
