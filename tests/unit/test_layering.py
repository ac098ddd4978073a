"""lovd's import layering (README, "Layout"): no import circle inside lovd/, no import from
a lower floor to a higher one, and the service built in one place only (lovd/wiring.py).

Read from the source with ``ast``, so nothing is imported. Every ``import`` counts, at
module level or inside a function: a deferred import is still a dependency, and a circle
through one still means two modules that cannot be understood (or tested) apart. Imports
under ``if TYPE_CHECKING:`` are skipped: they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "lovd"

# Lowest first; a module may import its own floor and the floors below. An entry is a
# module, or ``pkg.*`` for a package and everything in it; the most specific entry wins.
# Keep in step with README.md, "Layout".
FLOORS: list[tuple[str, list[str]]] = [
    (
        "ground",
        [
            "lovd",
            "lovd.errors",
            "lovd.ids",
            "lovd.log",
            "lovd.config",
            "lovd.config_checks",
            "lovd.egress_allow",
            "lovd.report",
            "lovd.session.model",
            "lovd.systemd.*",
        ],
    ),
    (
        "systems",
        [
            "lovd.store",
            "lovd.metrics",
            "lovd.procs",
            "lovd.podman",
            "lovd.limits",
            "lovd.egress",
            "lovd.runner",
            "lovd.images",
            "lovd.demo.*",
        ],
    ),
    ("sessions", ["lovd.session.*", "lovd.broker.*"]),
    ("edges", ["lovd.caddy", "lovd.runtime_events", "lovd.sync.*", "lovd.web.*"]),
    ("assembly", ["lovd.wiring", "lovd.doctor", "lovd.daemon", "lovd.cli", "lovd.__main__"]),
]

# What makes up the service, by the module that defines it: built by lovd/wiring.py's
# ``build`` only. The daemon and every test and bench harness call ``build`` (the
# harnesses through tests/stack.py), so a harness tests what ``lovd serve`` runs.
ASSEMBLED = {
    "Sessions": "lovd.session.lifecycle",
    "BrowserGate": "lovd.web.gate",
    "Broker": "lovd.broker.server",
    "create_app": "lovd.web.app",
    "create_public_app": "lovd.web.public",
}
BUILT_IN = {"lovd/wiring.py"}
MAX_ASSEMBLY_SITES = 1


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking_only(tree: ast.Module) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _known(name: str) -> str | None:
    """The lovd module ``name`` is, or is defined in; None outside lovd."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        # ``from lovd import egress`` imports the module lovd.egress, not lovd/__init__
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    for name in names:
        target = _known(name)
        if target and target != module:
            yield target


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported lovd module: line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        edges = graph.setdefault(module, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skip:
                for target in _targets(module, path, node):
                    edges.setdefault(target, node.lineno)
    return graph


def _floor(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (specificity, floor)
    for level, (_, entries) in enumerate(FLOORS):
        for entry in entries:
            if entry.endswith(".*"):
                pkg = entry[:-2]
                if module == pkg or module.startswith(pkg + "."):
                    cand = (len(pkg), level)
                else:
                    continue
            elif module == entry:
                cand = (10_000, level)
            else:
                continue
            if best is None or cand > best:
                best = cand
    return None if best is None else best[1]


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_floor() -> None:
    missing = sorted(m for m in MODULES if _floor(m) is None)
    assert not missing, f"add these to FLOORS here and to README.md's Layout: {missing}"


def test_no_import_cycle_inside_lovd() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    detail = [
        " ; ".join(f"{a}:{graph[a][b]} -> {b}" for a in c for b in graph[a] if b in c)
        for c in cycles
    ]
    assert not cycles, f"import circles: {detail}"


def test_no_import_from_a_lower_floor_to_a_higher_one() -> None:
    upward = []
    for module, edges in sorted(_graph().items()):
        here = _floor(module)
        for target, line in sorted(edges.items()):
            there = _floor(target)
            if here is not None and there is not None and there > here:
                upward.append(
                    f"{MODULES[module].relative_to(ROOT)}:{line} ({FLOORS[here][0]}) imports "
                    f"{target} ({FLOORS[there][0]})"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_a_package_init_pulls_in_nothing_above_its_lowest_module() -> None:
    """Importing lovd.session.model runs lovd/session/__init__.py first: were that to
    import the session services, the ground floor would drag them in after all."""
    graph = _graph()
    wrong = []
    for module in sorted(MODULES):
        here = _floor(module)
        parts = module.split(".")
        for n in range(2, len(parts)):
            package = ".".join(parts[:n])
            for target in graph.get(package, {}):
                there = _floor(target)
                if here is not None and there is not None and there > here:
                    wrong.append(f"{package} (run on importing {module}) imports {target}")
    assert not wrong, wrong


def _builds_in(source: str, module: str = "") -> list[tuple[int, str]]:
    """Where ``source`` (the text of ``module``) builds a part of the service directly:
    calls ``Sessions(...)``, ``Broker.from_config(...)``, ``create_app(...)``, … by a name
    imported from (or defined in) the module that defines it, or as ``module.name(...)``."""
    tree = ast.parse(source)
    names: dict[str, str] = {n: n for n, where in ASSEMBLED.items() if where == module}
    modules: dict[str, str] = {}  # local name of a defining module -> its module name
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if ASSEMBLED.get(a.name) == node.module:
                    names[a.asname or a.name] = a.name
                full = f"{node.module}.{a.name}"
                if full in ASSEMBLED.values():
                    modules[a.asname or a.name] = full
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ASSEMBLED.values():
                    modules[a.asname or a.name] = a.name
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in names:
            out.append((node.lineno, names[f.id]))
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            owner = f.value.id
            if owner in names:  # Broker.from_config(...), BrowserGate.from_config(...)
                out.append((node.lineno, f"{names[owner]}.{f.attr}"))
            elif owner in modules and ASSEMBLED.get(f.attr) == modules[owner]:
                out.append((node.lineno, f.attr))
    return sorted(out)


def _assembly_sites() -> dict[str, list[tuple[int, str]]]:
    """File -> where it builds a part of the service directly."""
    sites = {}
    for top in ("lovd", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            module = ".".join(rel.with_suffix("").parts) if top == "lovd" else ""
            found = _builds_in(path.read_text(), module)
            if found:
                sites[str(rel)] = found
    return sites


def test_the_service_is_assembled_in_one_place() -> None:
    sites = _assembly_sites()
    print(f"\n{len(sites)} place(s) build the service:")
    for path, calls in sites.items():
        print(f"  {path}: " + ", ".join(f"{name}(...) at {line}" for line, name in calls))
    elsewhere = set(sites) - BUILT_IN
    assert not elsewhere, f"build it with lovd.wiring.build (tests: tests/stack.py): {sites}"
    assert len(sites) <= MAX_ASSEMBLY_SITES, sites


def test_the_checks_catch_what_they_are_for() -> None:
    """The detectors themselves: a circle in a made-up graph, floors of known modules."""
    circle = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(circle) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
    assert _floor("lovd.store") == 1
    assert _floor("lovd.session.model") == 0
    assert _floor("lovd.session.launcher") == 2
    assert _floor("lovd.web.gate") == 3
    assert _floor("lovd.daemon") == 4
    assert _floor("lovd.nonexistent") is None
    harness = (
        "from lovd.broker.server import Broker\n"
        "from lovd.web import app as api\n"
        "from lovd.web.gate import BrowserGate as G\n"
        "b = Broker(store=s)\nc = Broker.from_config(cfg)\na = api.create_app()\n"
        "g = G.from_config(cfg, s)\nd = other.create_app()\n"
    )
    assert _builds_in(harness) == [
        (4, "Broker"), (5, "Broker.from_config"), (6, "create_app"),
        (7, "BrowserGate.from_config"),
    ]  # fmt: skip
    # The module that defines a part builds it only where it calls it by name.
    assert _builds_in("def create_app(): ...\nx = create_app()\n", "lovd.web.app") == [
        (2, "create_app")
    ]
