"""What the CLI prints for scripts and for people: --version, --json of inspect and snapshots list,
and inspect's suggestions for a misspelled dataset name. Every case runs the real CLI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from corpusforge.data.datasets import DatasetWriter
from corpusforge.snapshots import SnapshotStore, build_manifest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = pa.schema([("chunk_id", pa.string()), ("n", pa.int32()), ("tags", pa.list_(pa.string()))])


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "corpusforge.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A spec and its workspace holding `chunks` and `quarantine/clean` datasets."""
    tmp = tmp_path_factory.mktemp("cli-output")
    spec = tmp / "spec.yaml"
    spec.write_text(f"name: shop\nsource: {{format: beir, path: {ROOT / 'examples' / 'demo'}}}\n")
    ws = tmp / "ws"
    for name, rows in (("chunks", 3), ("quarantine/clean", 1)):
        with DatasetWriter(ws / "shop" / name, SCHEMA) as writer:
            writer.write_rows({"chunk_id": f"c{i}", "n": i, "tags": ["a", "b"][: i]} for i in range(rows))
            writer.commit()
    return {"spec": spec, "ws": ws}


def test_version_matches_the_installed_distribution():
    out = cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"corpusforge {importlib.metadata.version('corpusforge')}"


def test_inspect_json(workspace):
    out = cli("inspect", "chunks", "--spec", workspace["spec"], "-w", workspace["ws"], "--rows", "2", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["path"] == str(workspace["ws"] / "shop" / "chunks") and data["rows"] == 3
    assert data["schema"] == [{"name": "chunk_id", "type": "string", "nullable": True},
                              {"name": "n", "type": "int32", "nullable": True},
                              {"name": "tags", "type": "list<element: string>", "nullable": True}]
    assert data["head"] == [{"chunk_id": "c0", "n": 0, "tags": []}, {"chunk_id": "c1", "n": 1, "tags": ["a"]}]


def test_inspect_suggests_the_workspace_datasets_for_a_misspelled_name(workspace):
    out = cli("inspect", "chunkz", "--spec", workspace["spec"], "-w", workspace["ws"])
    assert out.returncode == 2
    text = " ".join(out.stderr.split())
    assert "not a complete dataset; did you mean 'chunks'?" in text
    assert f"(datasets in {workspace['ws'] / 'shop'}: chunks, quarantine/clean)" in text
    typo = cli("inspect", "quarantine/claen", "--spec", workspace["spec"], "-w", workspace["ws"])
    assert typo.returncode == 2 and "did you mean 'quarantine/clean'?" in " ".join(typo.stderr.split())
    empty_ws = workspace["ws"].parent / ("empty-ws-" + "x" * 100)  # a message longer than a terminal line
    empty = cli("inspect", "chunks", "--spec", workspace["spec"], "-w", empty_ws)
    assert empty.returncode == 2 and "no datasets in" in empty.stderr and "run the spec first" in empty.stderr


def test_snapshots_list_json(tmp_path):
    build = tmp_path / "build"
    (build / "chunks").mkdir(parents=True)
    (build / "chunks" / "part-0.txt").write_text("rows")
    store = SnapshotStore(tmp_path / "store")
    versions = []
    for ndcg in (0.5, 0.625):
        manifest = build_manifest(build, index_name="shop", spec={"name": "shop"}, model={}, corpus_hash=str(ndcg),
                                  index={}, metrics={"bm25": {"ndcg@10": ndcg}})
        versions.append(store.publish(build, manifest))
    store.promote("shop", versions[1], "production")
    (tmp_path / "store" / "shop" / ".tmp-unfinished").mkdir()

    out = cli("snapshots", "list", "--root", tmp_path / "store", "--index", "shop", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["index"] == "shop" and data["root"] == str(tmp_path / "store")
    assert data["aliases"] == {"production": versions[1]}
    assert [v["version"] for v in data["versions"]] == versions
    assert [v["aliases"] for v in data["versions"]] == [[], ["production"]]
    assert [v["metrics"] for v in data["versions"]] == [{"bm25.ndcg@10": 0.5}, {"bm25.ndcg@10": 0.625}]
    assert all(v["complete"] and v["n_files"] == 1 for v in data["versions"])
    assert [i["name"] for i in data["incomplete"]] == [".tmp-unfinished"]
