"""Under an orchestrator (`Pipeline.open`), library progress bars stay out of the task logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corpusforge.progress import QUIET_ENV

ROOT = Path(__file__).resolve().parents[2]

# Loads the packaged encoder the way the embed stage does; transformers draws a "Loading weights" bar.
_LOAD = """
import sys
from transformers import AutoModel
if sys.argv[1] == "orchestrated":
    from corpusforge.pipeline import Pipeline
    Pipeline.open(sys.argv[2], sys.argv[3])
from corpusforge.encoding.models import resolve_model_path
AutoModel.from_pretrained(str(resolve_model_path("default")))
"""


@pytest.mark.parametrize("mode", ["plain", "orchestrated"])
def test_library_progress_bars_are_quiet_only_under_an_orchestrator(mode, tmp_path):
    out = subprocess.run([sys.executable, "-c", _LOAD, mode, str(ROOT / "pipelines" / "demo.yaml"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**{k: v for k, v in os.environ.items() if k not in QUIET_ENV},  # an earlier
                              # in-process orchestrated run (Dagster tests) quieted this process's environment
                              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    bars = "it/s]" in out.stderr or "%|" in out.stderr
    # the plain run shows that the library does draw a bar here, so the quiet run's silence means something
    assert bars is (mode == "plain"), out.stderr[-2000:]
