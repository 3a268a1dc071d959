"""The import boundary: the core library never imports an orchestrator, nor ray (an optional engine)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_MODULES = sorted(
    "corpusforge." + p.relative_to(ROOT / "corpusforge").with_suffix("").as_posix().replace("/", ".")
    for p in (ROOT / "corpusforge").rglob("*.py")
    if p.name != "__init__.py"
)

_PROBE = """
import importlib, json, sys
result = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    result[name] = sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'airflow', 'ray'))
print(json.dumps(result))
"""


def _imported_orchestrators(modules):
    out = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_imports_no_orchestrator():
    assert _imported_orchestrators(["corpusforge"]) == {"corpusforge": []}


def test_no_core_module_imports_dagster_airflow_or_ray():
    assert len(CORE_MODULES) >= 5
    found = _imported_orchestrators(CORE_MODULES)
    assert {m: mods for m, mods in found.items() if mods} == {}


def test_no_orchestrator_imports_in_core_sources():
    offenders = [
        str(p) for p in (ROOT / "corpusforge").rglob("*.py")
        if any(line.startswith(("import dagster", "from dagster", "import airflow", "from airflow", "import ray",
                                "from ray"))  # module level only: the Ray engine imports ray inside functions
               for line in p.read_text().splitlines())
    ]
    assert offenders == []


def _import_graph() -> dict[str, set[str]]:
    """{module: corpusforge modules it imports}, every import statement counted (module level or not)."""
    import ast

    files = {}
    for p in (ROOT / "corpusforge").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def owner(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.startswith("corpusforge")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                if base.startswith("corpusforge"):
                    deps |= {owner(f"{base}.{a.name}") if f"{base}.{a.name}" in files else owner(base)
                             for a in node.names}
        graph[module] = deps - {module, ""}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_core():
    graph = _import_graph()
    assert len(graph) > 20 and "corpusforge.graph" in graph
    assert _cycles(graph) == []


def test_serving_imports_nothing_from_training():
    graph = _import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("corpusforge.train"))
                 for m, deps in graph.items() if m.startswith("corpusforge.serve")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_importing_the_package_is_cheap_and_the_api_loads_on_first_use():
    probe = ("import json, sys, corpusforge\n"
             "heavy = sorted(m for m in ('torch', 'faiss', 'numpy', 'pyarrow', 'fastapi', 'mlflow', 'corpusforge.api')"
             " if m in sys.modules)\n"
             "from corpusforge import Index, open_index\n"
             "print(json.dumps([heavy, open_index.__module__, Index.__module__, corpusforge.__all__]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    heavy, fn_module, cls_module, exported = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [] and fn_module == cls_module == "corpusforge.api"
    assert set(exported) == {"Index", "open_index", "__version__"}
