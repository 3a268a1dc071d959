"""The import boundary: the core library never imports an orchestrator."""

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
    result[name] = sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'airflow'))
print(json.dumps(result))
"""


def _imported_orchestrators(modules):
    out = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_imports_no_orchestrator():
    assert _imported_orchestrators(["corpusforge"]) == {"corpusforge": []}


def test_no_core_module_imports_dagster_or_airflow():
    assert len(CORE_MODULES) >= 5
    found = _imported_orchestrators(CORE_MODULES)
    assert {m: mods for m, mods in found.items() if mods} == {}


def test_no_orchestrator_imports_in_core_sources():
    offenders = [
        str(p) for p in (ROOT / "corpusforge").rglob("*.py")
        if any(line.lstrip().startswith(("import dagster", "from dagster", "import airflow", "from airflow"))
               for line in p.read_text().splitlines())
    ]
    assert offenders == []
