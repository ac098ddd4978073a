"""A session's state is written in one place: lovd/session/machine.py. This reads lovd's
source (ast) and fails on a state write anywhere else: a ``status=`` keyword that is not
an HTTP response's, a new ``Session`` row built with a state, or a store write primitive
called from outside the machine. The launcher writes nothing at all: it returns a start's
outcome and lovd/session/starts.py records it."""

from __future__ import annotations

import ast
from pathlib import Path

LOVD = Path(__file__).resolve().parents[2] / "lovd"
MACHINE = "session/machine.py"
# HTTP answers take a status too; it is no session state.
HTTP = frozenset({"Response", "json_response", "StreamResponse"})
# The store's write primitives: only the machine calls them.
PRIMITIVES = frozenset({"insert", "write", "tombstone", "delete", "restore"})
# (file, function) pairs allowed to name a state, and why.
ALLOWED = {
    # the tombstone primitive that machine.delete/drop call: the row as its delete is recorded
    ("store.py", "_deleted"),
    # a stand-in row for a session this host does not hold, never stored (timing-safe
    # link checks)
    ("web/public.py", "_unknown"),
}


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _is_store(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "store") or (
        isinstance(node, ast.Attribute) and node.attr == "store"
    )


def state_writes(source: str, rel: str) -> list[str]:
    """Where ``source`` (the file ``rel`` under lovd/) writes a session's state."""
    if rel == MACHINE:
        return []
    found: list[str] = []

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func = node.name
        if isinstance(node, ast.Call) and (rel, func) not in ALLOWED:
            name = _name(node.func)
            kw = {k.arg for k in node.keywords}
            where = f"{rel}:{node.lineno} ({func or 'module'})"
            if "status" in kw and name not in HTTP:
                found.append(f"{where}: {name}(status=...)")
            elif name == "Session" and len(node.args) >= 2:
                found.append(f"{where}: Session(...) with a state")
            elif (
                name in PRIMITIVES
                and isinstance(node.func, ast.Attribute)
                and _is_store(node.func.value)
                and rel != "store.py"
            ):
                found.append(f"{where}: store.{name}(...)")
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(ast.parse(source), "")
    return found


LAUNCHER = "session/launcher.py"
# What the launcher may ask the store: reads only (any other store call is a write, or
# one that a new write method would slip through).
STORE_READS = frozenset({"get", "all", "count", "used_ports", "history", "tombstones"})


def launcher_writes(source: str) -> list[str]:
    """Where ``source`` (the launcher's) touches the state machine or writes the store."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.alias):
            names = [node.name, node.asname or ""]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any("machine" in n.lower() for n in names):
            found.append(f"{LAUNCHER}:{line}: refers to the state machine ({', '.join(names)})")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and _is_store(node.func.value)
            and node.func.attr not in STORE_READS
        ):
            found.append(f"{LAUNCHER}:{line}: store.{node.func.attr}(...)")
    return found


def test_the_launcher_writes_no_state() -> None:
    source = (LOVD / LAUNCHER).read_text()
    found = launcher_writes(source)
    assert found == [], "the launcher writes state (return an outcome instead):\n" + "\n".join(
        found
    )
    # And it still reads the store (the check above looks at the right calls).
    assert "self.store.get(" in source


def test_the_launcher_check_finds_what_it_looks_for() -> None:
    bad = {
        "from lovd.session.machine import StateMachine": "state machine",
        "import lovd.session.machine as m": "state machine",
        "def __init__(self, machine): pass": "state machine",
        "await self.machine.transition(sid, SessionState.FAILED)": "state machine",
        "await self.store.update(sid, container_id=cid)": "store.update",
        "await self.store.add_health([], 5)": "store.add_health",
        "await store.purge(sid)": "store.purge",
    }
    for code, what in bad.items():
        hits = launcher_writes(code)
        assert hits and all(what in h for h in hits), (code, hits)
    ok = (
        "s = self.store.get(sid)\n"
        "rows = self.store.all()\n"
        "x = self.store.instance_id\n"
        "await self.runner.stop(sid)\n"
        "return Started(cid, 0.5)\n"
    )
    assert launcher_writes(ok) == []


def test_the_state_is_written_only_by_the_machine() -> None:
    found = []
    for path in sorted(LOVD.rglob("*.py")):
        rel = path.relative_to(LOVD).as_posix()
        found += state_writes(path.read_text(), rel)
    assert found == [], "state writes outside lovd/session/machine.py:\n" + "\n".join(found)


def test_the_check_finds_what_it_looks_for() -> None:
    """The check above is not hollow: each way of writing a state around the machine is
    caught, and HTTP statuses are not."""
    bad = {
        "await self.store.update(sid, status=SessionState.RUNNING)": "update(status=",
        "row = dataclasses.replace(s, status='failed')": "replace(status=",
        "Session(id=sid, status='warm', reason='')": "Session(status=",
        "Session(sid, 'running', '', '', 0, '', '', 0.0, 0.0, 0.0, 0.0)": "with a state",
        "await self.store.write(sid, {'status': 'running'})": "store.write",
        "await store.insert(row)": "store.insert",
        "await self.store.tombstone(sid, 'x')": "store.tombstone",
    }
    for code, what in bad.items():
        hits = state_writes(code, "session/lifecycle.py")
        assert len(hits) == 1 and what in hits[0], (code, hits)
    ok = (
        "web.Response(status=204)\n"
        "web.json_response({}, status=503)\n"
        "await self.store.update(sid, used_at=1.0)\n"
        "await machine.transition(sid, SessionState.RUNNING, reason='')\n"
    )
    assert state_writes(ok, "web/gate.py") == []
    assert state_writes("Session(status=to, **fields)", MACHINE) == []
