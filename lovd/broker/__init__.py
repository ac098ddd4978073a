"""The credential broker: LLM and MCP calls of session containers, with the operator's
keys added outside the container (see server.py)."""
