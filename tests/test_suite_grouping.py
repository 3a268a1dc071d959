"""`make test` relies on pytest-xdist's ``--dist loadgroup`` keeping an ``xdist_group`` on one
worker: the Ray modules must not start two local Rays at once, and the modules sharing the
session's demo builds (`tests.orchestration_runs`) must make them once. With pytest 9.2 and
pytest-xdist 3.8 the grouping silently stopped (pytest-xdist #1386: xdist still writes the nodeid
field pytest 9.2 no longer reads), so every test became its own unit, two Ray clusters ran at
once and the shared builds were made on both workers. This runs a small suite under the same
options and checks that each group stayed on one worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

MODULE = '''
import json, os
import pytest

pytestmark = pytest.mark.xdist_group("{group}")


@pytest.mark.parametrize("i", range(6))
def test_where(i):
    with open(os.environ["WHERE_LOG"], "a") as f:
        f.write(json.dumps(["{group}", os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")
'''


def test_loadgroup_keeps_each_group_on_one_worker(tmp_path):
    for name, group in (("test_a.py", "one"), ("test_b.py", "one"), ("test_c.py", "two"), ("test_d.py", "two")):
        (tmp_path / name).write_text(MODULE.format(group=group))
    log = tmp_path / "where.jsonl"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                          "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, env={**_env(), "WHERE_LOG": str(log)}, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    seen: dict[str, set[str]] = {}
    for group, worker in runs:
        seen.setdefault(group, set()).add(worker)
    assert len(runs) == 24
    assert all(len(workers) == 1 for workers in seen.values()), seen


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
