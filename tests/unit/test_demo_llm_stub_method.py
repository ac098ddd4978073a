"""The stub model follows the legal agent's method: search, follow the cross-references
of what it found, then answer with citations, the currency caveat and "not legal advice"."""

from __future__ import annotations

import json
from typing import Any

from lovd.demo import llm_stub

QUESTION = "Hva sier arbeidsmiljøloven om oppsigelse?"
HIT = {
    "provision_id": "NL/lov/2005-06-17-62/§15-7",
    "law_title": "Lov om arbeidsmiljø, arbeidstid og stillingsvern mv. (arbeidsmiljøloven)",
    "law_short_title": "arbeidsmiljøloven",
    "section": "§ 15-7",
    "heading": "Vern mot usaklig oppsigelse",
    "url": "https://lovdata.no/lov/2005-06-17-62/§15-7",
    "text": "(1) Arbeidstaker kan ikke sies opp uten at det er saklig begrunnet.",
}
XREFS = {
    "provision_id": HIT["provision_id"],
    "references": [
        {
            "to": "NL/lov/2005-06-17-62/§15-12",
            "section": "§ 15-12",
            "heading": "Virkninger av usaklig oppsigelse mv.",
            "url": "https://lovdata.no/lov/2005-06-17-62/§15-12",
        },
    ],
    "referenced_by": [],
}


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"properties": {}}}}


TOOLS = [tool("lovdata_search_provisions_fulltext"), tool("lovdata_get_cross_references")]


def call(cid: str, name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    fn = {"name": name, "arguments": "{}"}
    return [
        {"role": "assistant", "tool_calls": [{"id": cid, "type": "function", "function": fn}]},
        {"role": "tool", "tool_call_id": cid, "content": json.dumps(result)},
    ]


def test_search_then_cross_references_then_the_answer() -> None:
    asked = [{"role": "user", "content": QUESTION}]
    searched = asked + call("c1", "lovdata_search_provisions_fulltext", {"results": [HIT]})
    second = llm_stub.decide({"messages": searched, "tools": TOOLS})
    assert second.tool_name == "lovdata_get_cross_references"
    assert second.tool_arguments == {"provision_id": HIT["provision_id"]}

    followed = searched + call("c2", "lovdata_get_cross_references", XREFS)
    answer = llm_stub.decide({"messages": followed, "tools": TOOLS}).text
    assert "§ 15-7 arbeidsmiljøloven" in answer and HIT["url"] in answer
    assert "Henvisninger jeg fulgte" in answer and XREFS["references"][0]["url"] in answer
    assert "kan være endret" in answer and "ikke juridisk rådgivning" in answer


def test_english_question_gets_an_english_answer() -> None:
    question = "What does arbeidsmiljøloven say about oppsigelse?"
    msgs = [{"role": "user", "content": question}]
    msgs += call("c1", "lovdata_search_provisions_fulltext", {"results": [HIT]})
    msgs += call("c2", "lovdata_get_cross_references", XREFS)
    answer = llm_stub.decide({"messages": msgs, "tools": TOOLS}).text
    assert "Source: " + HIT["url"] in answer and "References I followed" in answer
    assert "not legal advice" in answer and "may have been amended" in answer


def test_requests_are_summarised_for_tests() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hei"}]
    body = {"messages": messages, "tools": TOOLS}
    seen = llm_stub.summary(body, llm_stub.decide(body))
    assert seen["tools"] == [t["function"]["name"] for t in TOOLS]
    assert seen["system"] == "S" and seen["messages"] == 2
