"""Offline stand-ins for the demo mode and the test suite.

``lovdata_mcp`` imitates the remote Lovdata MCP server over a small corpus of real
Norwegian statute text; ``llm_stub`` is an OpenAI-compatible chat endpoint that
behaves just enough like a model to drive a full OpenCode tool-call round trip.
Neither needs network access or API keys.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

FIXTURE_NAME = "lovdata-fixture.json"


def default_corpus_path() -> Path:
    """The packaged fixture (20 provisions of four Norwegian laws)."""
    return Path(str(resources.files(__package__).joinpath("data", FIXTURE_NAME)))
