"""Every script in bench/ runs in its smoke mode and prints its table, so none rots unseen.

The smoke runs are benchmarks (about 300 s of CPU together), so they run in `make test-all`
(`slow`); the default suite checks that each script has one.

The smoke modes run the scripts' real code paths on tiny inputs; their figures mean nothing and
are not checked (no timing assertions), only that each script finishes and prints its results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.orchestration_runs import cli_build

# these modules share the session's demo builds (tests/orchestration_runs.py): one xdist worker
pytestmark = pytest.mark.xdist_group("demo-builds")

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

# script -> lines its output must contain (its results table and ratios)
EXPECTED = {
    "embed.py": ["ours texts/s", "median ratio ours/ST:", "cosine ours vs ST: min", "embed_chunks warm:"],
    "data_stages.py": ["stage       docs  median s    docs/s", "extract", "chunk", "total"],
    "index.py": ["ratio vs raw faiss =", "IVF-PQ best recall@10", "worst search-layer / raw FAISS ratio"],
    "serve.py": ["x library", "load from", "total errors: 0"],
    "serve_limits.py": ["healthz max ms", "well-formed search"],
    "train.py": ["peak RSS", "train_retriever", "1/1 steps"],
}
# scripts whose smoke run is checked more closely by a module of their own
OWN_MODULE = {"scale.py": ROOT / "tests" / "bench" / "test_scale.py"}


def test_every_bench_script_has_a_smoke_test():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted([*EXPECTED, *OWN_MODULE])
    for script, module in OWN_MODULE.items():
        assert f'"{script}"' in module.read_text() and "--smoke" in module.read_text(), module


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_bench_script_smoke(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TMPDIR": str(tmp_path)}
    args = ["--smoke"]
    if script in ("serve.py", "serve_limits.py"):  # serve the session's demo snapshot instead of building another
        args += ["--root", str(cli_build() / "snapshots")]
    out = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for line in EXPECTED[script]:
        assert line in out.stdout, f"{script} --smoke did not print {line!r}:\n{out.stdout[-3000:]}"
