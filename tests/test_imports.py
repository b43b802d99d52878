"""The package's import graph: no module of src/spotrun takes part in an import cycle.

The graph is read from the source with ``ast``: module-level imports only (an import
inside a function runs later, when everything is loaded), ``if TYPE_CHECKING:`` blocks
left out (they never run). A cycle is listed module by module, so it can be broken where
it makes the most sense.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "spotrun"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is loaded (``try`` and ``if`` included)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _module_level(node.body)
            found += _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                found += _module_level(block)
        elif isinstance(node, ast.With):
            found += _module_level(node.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each spotrun module and the spotrun modules it imports when it is loaded."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            # `from spotrun import cli` imports the module spotrun.cli.
            targets.update(f"{base}.{a.name}" for a in node.names)
        resolved = set()
        for target in targets:
            # Importing a.b.c loads a and a.b first: each is an edge.
            parts = target.split(".")
            resolved.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        # A module's own parent packages are loaded before it, whatever it imports: an
        # import of a sibling (spotrun.pipelines.registry importing spotrun.pipelines.base)
        # is no edge back to the package.
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in resolved if t in modules and t != name and t not in parents}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a
    path through the cycle, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _path_through(graph: dict[str, set[str]], component: list[str]) -> str:
    """One cycle inside ``component``, as ``a -> b -> a``."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    node = start
    while True:
        succ = sorted(s for s in graph[node] if s in members)
        nxt = next((s for s in succ if s == start and len(path) > 1), None) or next(
            (s for s in succ if s not in seen), None)
        if nxt is None or nxt == start:
            return " -> ".join([*path, start])
        path.append(nxt)
        seen.add(nxt)
        node = nxt


def test_the_graph_sees_the_packages_own_imports() -> None:
    graph = import_graph()
    # A check of the checker: these edges exist, a TYPE_CHECKING import is not one.
    assert "spotrun.jobs" in graph["spotrun.store.base"]
    assert "spotrun.cli" in graph["spotrun.__main__"]
    assert "spotrun.pipelines.base" in graph["spotrun.pipelines"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in src/spotrun:\n" + "\n".join(
        f"  {_path_through(graph, c)}  (modules: {', '.join(c)})" for c in found)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert _path_through(graph, ["a", "b", "c"]) == "a -> b -> c -> a"


def test_the_dashboard_imports_the_service_never_the_apis_routes() -> None:
    # What the dashboard may use of the HTTP package: how a request signs in, what the
    # app shares, and the request documents; everything it does goes through the service.
    allowed = {"spotrun.http", "spotrun.http.auth", "spotrun.http.context",
               "spotrun.http.schemas"}
    graph = import_graph()
    for module, targets in graph.items():
        if not module.startswith("spotrun.http.dashboard"):
            continue
        http = {t for t in targets if t.startswith("spotrun.http")
                and not t.startswith("spotrun.http.dashboard")}
        assert http <= allowed, f"{module} imports {sorted(http - allowed)}"


def late_imports() -> list[tuple[str, int, str]]:
    """Each import of a spotrun module inside a function: (file, line, the line), unless
    the line or the one above says it keeps a start-up fast ("start-up: ...")."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." if node.level else (node.module or "")]
                else:
                    continue
                if not any(n == "." or n == "spotrun" or n.startswith("spotrun.")
                           for n in names):
                    continue
                said = "\n".join(lines[max(0, node.lineno - 2):node.end_lineno])
                if "start-up" not in said:
                    found.append((str(path.relative_to(PACKAGE.parent)), node.lineno,
                                  lines[node.lineno - 1].strip()))
    return sorted(set(found))


def test_every_import_inside_a_function_says_which_start_up_it_keeps_fast() -> None:
    found = late_imports()
    assert not found, (
        "imports of spotrun modules inside functions (move them to the top, or say on the "
        "line above which start-up they keep fast: '# start-up: ...'):\n"
        + "\n".join(f"  {f}:{n}: {line}" for f, n, line in found))


# ------------------------------------------------------------- the documented layout

ARCHITECTURE = PACKAGE.parents[1] / "docs" / "architecture.md"


def _table(title: str) -> list[list[str]]:
    """The rows of the first Markdown table after the heading ``title``, as cells."""
    text = ARCHITECTURE.read_text()
    rest = text[text.index(title):]
    rows: list[list[str]] = []
    for line in rest.splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set(cells[0]) <= set("- "):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # the header row


def _names(cell: str) -> list[str]:
    return [n.strip().strip("`") for n in cell.split(",") if n.strip()]


def documented_rules() -> list[tuple[list[str], list[str] | None]]:
    """(module patterns, allowed patterns; None for anything), from architecture.md."""
    rules: list[tuple[list[str], list[str] | None]] = []
    for cells in _table("### Allowed imports"):
        allowed = cells[1].strip()
        rules.append((_names(cells[0]), None if allowed == "anything" else
                      [] if allowed == "nothing of spotrun" else _names(allowed)))
    return rules


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1]))


def all_imports() -> dict[str, set[str]]:
    """Each module (without ``spotrun.``) and the spotrun modules it imports anywhere
    (inside functions too), ``if TYPE_CHECKING:`` blocks left out."""
    graph: dict[str, set[str]] = {}
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and _is_type_checking(node.test) for n in ast.walk(node)}
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                full = {f"{base}.{a.name}" for a in node.names} & set(paths)
                targets.update(full or {base})
        short = name.removeprefix("spotrun.") if name != "spotrun" else "spotrun"
        graph[short] = {t.removeprefix("spotrun.") for t in targets
                        if t.startswith("spotrun.") and t in paths and t != name}
    return graph


def _own_package(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def test_the_layout_table_lists_every_module_once() -> None:
    listed = [n for cells in _table("## Layout: one line per module") for n in _names(cells[0])]
    assert len(listed) == len(set(listed)), "a module listed twice"
    on_disk = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and "versions" not in p.parts}
    on_disk |= {"store/__init__.py", "migrations/__init__.py"}  # they hold code of their own
    assert on_disk - set(listed) == set(), "modules missing from docs/architecture.md"
    assert set(listed) - on_disk == set(), "docs/architecture.md lists modules not in src"


def test_every_import_keeps_to_the_documented_rules() -> None:
    rules = documented_rules()
    graph = all_imports()
    broken = []
    for module, targets in sorted(graph.items()):
        if ".migrations.versions." in f".{module}.":
            continue
        rule = next((allowed for patterns, allowed in rules
                     if any(_matches(module, p) for p in patterns)), False)
        assert rule is not False, f"{module}: no row of the allowed imports names it"
        if rule is None:
            continue
        # A package's own modules are its own; a module's are its package's.
        own = module if any(m.startswith(module + ".") for m in graph) else \
            _own_package(module)
        for t in sorted(targets):
            inside = own and (t == own or t.startswith(own + "."))
            if not inside and not any(_matches(t, p) for p in rule):
                broken.append(f"{module} imports {t}")
    assert not broken, ("imports outside docs/architecture.md's rules:\n  "
                        + "\n  ".join(broken))


def test_the_rules_checker_sees_a_broken_rule() -> None:
    assert _matches("store.leases", "store.*") and not _matches("store", "store.*")
    assert _matches("store", "store") and not _matches("store.leases", "store")
    rules = dict((tuple(p), a) for p, a in documented_rules())
    assert rules[("events",)] == ["jobs"]
    assert rules[("serve", "cli", "__main__", "spotrun")] is None
