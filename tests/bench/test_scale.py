"""bench/scale.py --smoke: the generator is deterministic and the whole measured path runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_corpus_is_deterministic_with_a_long_tail():
    scale = _scale()
    a = [r for rows in scale.synthetic_documents(400, batch=150) for r in rows]
    b = [r for rows in scale.synthetic_documents(400, batch=400) for r in rows]
    assert a == b and len(a) == 400 and len({r["doc_id"] for r in a}) == 400
    lengths = sorted(len(r["text"].split()) for r in a)
    assert 80 < lengths[200] < 260  # median ~150 words
    assert lengths[-1] > 4 * lengths[200]  # a long tail


@pytest.mark.slow  # a benchmark run (~50 s of CPU): `make test-all`, like every bench smoke run
def test_smoke_run_prints_the_table(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--smoke", "--work", str(tmp_path),
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| local | 200 |" in out.stdout
    import json

    (result,) = json.loads((tmp_path / "r.json").read_text())
    assert result["stages"]["chunk"]["rows"] > 200 and result["stages"]["embed"]["rows"] == \
        result["stages"]["chunk"]["rows"]
    assert result["driver_peak_rss_mb"] > 0


def test_rss_sampler_reports_worker_peaks_per_task_name():
    """A child process named like a Ray task (as Ray's workers rename themselves) is sampled, by name."""
    import time

    scale = _scale()
    child = ("import ctypes, sys, time\n"
             "ctypes.CDLL(None).prctl(15, b'ray::fake_task', 0, 0, 0)\n"  # PR_SET_NAME, as Ray does
             "block = bytearray(96 * 2**20)\n"
             "block[::4096] = b'x' * len(block[::4096])\n"  # touch every page: resident, not just reserved
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    with scale.RssSampler() as rss:
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(1.0)  # several 0.2 s samples
        finally:
            proc.kill()
            proc.wait()
    by_name = rss.peaks_by_name_mb()
    assert list(by_name) == ["ray::fake_task"], by_name
    assert by_name["ray::fake_task"] >= 96 and rss.worker_peak_mb() == by_name["ray::fake_task"]
