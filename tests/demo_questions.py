"""The demo question set (tests/data/demo_questions.yaml) and an in-process stand-in for
OpenCode's agent loop: the stub model's tool calls run against the Lovdata stand-in's MCP
server (in memory, through the MCP client), the way OpenCode offers and runs them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lovd.demo import llm_stub

QUESTIONS_PATH = Path(__file__).parent / "data" / "demo_questions.yaml"
LOVDATA_LINK = re.compile(r"https://lovdata\.no/lov/[0-9-]+/§[0-9a-z-]+")
PREFIX = "lovdata_"  # OpenCode names MCP tools <server>_<tool>
MAX_STEPS = 8


@dataclass(frozen=True)
class DemoQuestion:
    ask: str
    cite: str | None = None
    missing_law: str | None = None

    def check(self, answer: str) -> bool:
        """Right when the first lovdata.no provision link is the one to cite, or when the
        answer names the law the corpus does not hold (and cites nothing)."""
        if self.cite is not None:
            links = LOVDATA_LINK.findall(answer)
            return bool(links) and links[0] == self.cite
        assert self.missing_law is not None
        return self.missing_law in answer and not LOVDATA_LINK.search(answer)


def load() -> list[DemoQuestion]:
    raw = yaml.safe_load(QUESTIONS_PATH.read_text(encoding="utf-8"))
    return [DemoQuestion(**q) for q in raw["questions"]]


async def openai_tools(client: Any) -> list[dict[str, Any]]:
    listed = await client.list_tools()
    return [
        {
            "type": "function",
            "function": {
                "name": PREFIX + t.name,
                "description": t.description or "",
                "parameters": t.input_schema,
            },
        }
        for t in listed.tools
    ]


async def ask(client: Any, tools: list[dict[str, Any]], question: str) -> tuple[str, list[str]]:
    """(the stub's answer, the tools it called) for one question in a new chat."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Du er en norsk juridisk researchassistent."},
        {"role": "user", "content": question},
    ]
    called: list[str] = []
    for step in range(MAX_STEPS):
        reply = llm_stub.decide({"messages": messages, "tools": tools})
        if reply.tool_name is None:
            return reply.text, called
        name = reply.tool_name.removeprefix(PREFIX)
        called.append(name)
        result = await client.call_tool(name, reply.tool_arguments or {})
        text = "\n".join(getattr(c, "text", "") for c in result.content)
        cid = f"call_{step}"
        fn = {"name": reply.tool_name, "arguments": json.dumps(reply.tool_arguments)}
        messages.append(
            {"role": "assistant", "tool_calls": [{"id": cid, "type": "function", "function": fn}]}
        )
        messages.append({"role": "tool", "tool_call_id": cid, "content": text})
    raise AssertionError(f"no answer after {MAX_STEPS} steps: {called}")
