"""The int8 ONNX query encoder: export, agreement with torch, grouping, caching and fallback."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from corpusforge.encoding.encoder import Encoder
from corpusforge.encoding.onnx_query import (MODEL_FILE, Agreement, OnnxQueryEncoder, agreement, cached_export, export_key,
                                    load_int8)
from corpusforge.serve.loader import shared_encoder
from corpusforge.spec import ModelConfig

QUERIES = [
    "0-dimensional biomaterials show inductive properties.",
    "ALDH1 expression is associated with poorer prognosis for breast cancer primary tumors.",
    "what is the boiling point of water at altitude",
    "Vitamin D deficiency raises the risk of multiple sclerosis",
    "how to train a dense retriever with hard negatives",
    "a",
    "The effect of statins on cholesterol synthesis in hepatocytes " * 6,
]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(ModelConfig(precision="fp32"))


@pytest.fixture(scope="module")
def first_use(encoder, tmp_path_factory) -> tuple[Path, list]:
    """Two threads load the int8 encoder from one empty export cache at once (as two servers
    starting together would): (the cache directory, what each thread got)."""
    cache = tmp_path_factory.mktemp("onnx")
    got: list = [None, None]

    def load(i: int) -> None:
        try:
            got[i] = load_int8(encoder, cache)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            got[i] = exc

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return cache, got


@pytest.fixture(scope="module")
def int8(first_use) -> OnnxQueryEncoder:
    return first_use[1][0]


def test_concurrent_first_uses_export_once_and_both_load(first_use):
    cache, got = first_use
    assert all(isinstance(g, OnnxQueryEncoder) for g in got), got
    (export,) = [p for p in cache.iterdir() if p.is_dir()]  # one export, no temporary leftovers
    assert sorted(p.name for p in cache.iterdir()) == sorted([export.name, export.name + ".lock"])
    np.testing.assert_array_equal(got[0].encode_queries(QUERIES), got[1].encode_queries(QUERIES))


def test_int8_vectors_agree_with_torch(encoder, int8):
    got = int8.encode_queries(QUERIES)
    want = encoder.encode_queries(QUERIES)
    assert got.shape == want.shape == (len(QUERIES), encoder.dim) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)  # normalised in the graph
    found = agreement(encoder.encode_queries, int8.encode_queries, QUERIES)
    assert found.ok and found.min_cosine >= 0.95 and found.mean_cosine >= 0.985, found
    # the ranking signal survives: each query's nearest neighbour among the torch vectors is itself
    assert (np.argmax(got @ want.T, axis=1) == np.arange(len(QUERIES))).all()


def test_a_query_vector_does_not_depend_on_its_batch(int8):
    batched = int8.encode_queries(QUERIES)
    for i, q in enumerate(QUERIES):  # same bits alone, in a batch, and in a reordered batch
        np.testing.assert_array_equal(int8.encode_queries([q])[0], batched[i])
    np.testing.assert_array_equal(int8.encode_queries(QUERIES[::-1]), batched[::-1])
    assert int8.encode_queries([]).shape == (0, int8.dim)


def test_long_queries_are_truncated_like_torch(encoder, int8):
    long = "protein folding " * 400
    assert len(encoder.tokenize([long], "")[0]) == encoder.max_seq_length
    v = int8.encode_queries([long])[0]
    assert float(v @ encoder.encode_queries([long])[0]) > 0.95


def test_agreement_rejects_an_unrelated_encoder(encoder):
    rng = np.random.default_rng(0)
    found = agreement(encoder.encode_queries, lambda texts: rng.normal(size=(len(texts), encoder.dim)), QUERIES)
    assert isinstance(found, Agreement) and not found.ok and found.mean_cosine < 0.5
    with pytest.raises(ValueError):
        agreement(encoder.encode_queries, encoder.encode_queries, [])


def test_export_is_cached_by_key_and_a_damaged_file_is_exported_again(encoder, tmp_path):
    path = cached_export(encoder, tmp_path)
    assert path.name == MODEL_FILE and path.parent.name == export_key(encoder)
    stamp = path.stat().st_mtime_ns
    assert cached_export(encoder, tmp_path) == path and path.stat().st_mtime_ns == stamp  # reused
    path.write_bytes(b"not an onnx model")
    again = load_int8(encoder, tmp_path)  # loads after re-exporting
    assert again.encode_queries(["a query"]).shape == (1, encoder.dim)
    assert path.stat().st_size > 1_000_000


def test_shared_encoder_falls_back_to_torch_when_int8_cannot_be_built(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the export cache should be")
    cfg = ModelConfig(precision="fp32", query_prefix="fallback-test: ")  # a config no other test shares
    found = shared_encoder(cfg, runtime="onnx-int8", probes=QUERIES, export_dir=blocker)
    assert found.info["runtime"] == "torch" and "int8 export failed" in found.info["fallback"]
    assert found.encode(["a query"]).shape == (1, 384)
    torch_only = shared_encoder(cfg, runtime="torch")
    assert torch_only.info == {"runtime": "torch", "precision": "fp32"}
