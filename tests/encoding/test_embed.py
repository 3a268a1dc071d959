"""Tests of the encoder and the embed stage, on the packaged all-MiniLM-L6-v2 and tiny chunk sets."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pyarrow as pa
import pytest

from corpusforge.data import datasets
from corpusforge.encoding.embed import SHARD_GLOB, EmbeddingCache, embed_chunks
from corpusforge.encoding.encoder import Encoder, read_layout
from corpusforge.data.hashing import text_hash
from corpusforge.encoding.models import resolve_model_path
from corpusforge.data.schemas import CHUNKS
from corpusforge.spec import ModelConfig

ROOT = Path(__file__).resolve().parents[2]

# Varied lengths, including one far over max_seq_length (truncation) and one empty text.
TEXTS = [
    "Mitochondria are the powerhouse of the cell.",
    "BRCA1 mutations raise the lifetime risk of breast cancer. " * 30,  # > 256 tokens
    "",
    "A short one.",
    "Vitamin D supplementation did not reduce fracture risk in older adults living at home.",
    "Tumour necrosis factor alpha drives inflammation in rheumatoid arthritis; blocking it helps.",
    "CRISPR-Cas9 edits genomes by cutting DNA at sites matched by a guide RNA.",
]


# Exactness tests run in fp32: in bf16 a vector's last bits depend on the shape of its batch.
FP32 = ModelConfig(precision="fp32")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(FP32)


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model_path("default")), device="cpu")


def write_chunks(path: Path, texts: list[str], ids: list[str] | None = None) -> Path:
    """A chunks dataset (schemas.CHUNKS) with one row per text."""
    ids = ids or [f"c{i:04d}" for i in range(len(texts))]
    rows = [{"chunk_id": cid, "doc_id": f"d{i // 3}", "ordinal": i % 3, "text": t, "n_tokens": max(1, len(t.split())),
             "char_start": 0, "char_end": len(t), "acl": [], "metadata": "{}"} for i, (cid, t) in enumerate(zip(ids, texts))]
    with datasets.DatasetWriter(path, CHUNKS) as w:
        w.write_rows(rows)
        w.commit()
    return path


def read_vectors(path: Path) -> tuple[list[str], np.ndarray]:
    table = datasets.read_table(path)
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    return table.column("chunk_id").to_pylist(), vectors


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------------------- encoder


def test_encoder_matches_sentence_transformers(encoder, st_model):
    ours = encoder.encode_passages(TEXTS, batch_size=3)
    ref = st_model.encode(TEXTS, batch_size=3, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384) == (len(TEXTS), encoder.dim)
    assert cosine(ours, ref).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # Rows come back in input order whatever the batching: reversed input, other batches, same rows.
    backwards = encoder.encode_passages(TEXTS[::-1], batch_size=2)[::-1]
    np.testing.assert_allclose(ours, backwards, atol=1e-5)
    assert encoder.encode_passages([]).shape == (0, 384)


def test_vectors_do_not_depend_on_the_thread_count(encoder):
    """A Ray actor encodes with one CPU, the local engine with all of them: the same batches must give
    the same bits. A one-text batch did not (its last bits changed with the threads): the last,
    one-text block of a corpus differed between the engines."""
    texts = ["w12 w7 w901 w3 w44 w5 w6 w7 w8", "a short one", TEXTS[0]]
    threads = torch.get_num_threads()
    try:
        runs = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            runs[n] = [encoder.encode_passages(texts[:k], batch_size=b) for k, b in ((1, 1), (3, 1), (3, 2), (3, 3))]
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(runs[1], runs[2]):
        assert one.tobytes() == two.tobytes()


def test_encoder_non_default_pooling_and_no_normalisation(tmp_path, encoder):
    from sentence_transformers import SentenceTransformer

    src = resolve_model_path("default")
    model_dir = tmp_path / "minilm-cls"
    model_dir.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "modules.json":
            (model_dir / f.name).symlink_to(f)
    # Transformer + CLS pooling, no Normalize module: sentence-transformers will not normalise either.
    modules = [m for m in json.loads((src / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    cfg = ModelConfig(name=str(model_dir), normalize=False, precision='fp32')
    cls_encoder = Encoder(cfg)
    ours = cls_encoder.encode_passages(TEXTS)
    ref = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)
    assert cls_encoder.pooling == "cls"
    assert cosine(ours, ref).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-3)
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-3)  # really not normalised
    assert cls_encoder.fingerprint != encoder.fingerprint


def test_read_layout_pooling_configs(tmp_path):
    plain = tmp_path / "plain"  # a Hugging Face directory without sentence-transformers files
    plain.mkdir()
    assert read_layout(plain).pooling == "mean"
    new_style = tmp_path / "new"
    (new_style / "1_Pooling").mkdir(parents=True)
    (new_style / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    assert read_layout(new_style).pooling == "max"
    two = tmp_path / "two"
    (two / "1_Pooling").mkdir(parents=True)
    (two / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    with pytest.raises(ValueError, match="pooling"):
        read_layout(two)


def test_prefixes_and_fingerprint(encoder):
    prefixed = Encoder(ModelConfig(query_prefix="query: ", passage_prefix="passage: ", precision="fp32"))
    np.testing.assert_allclose(prefixed.encode_queries(["vitamin d and bones"]),
                               encoder.encode_passages(["query: vitamin d and bones"]), atol=1e-5)
    np.testing.assert_allclose(prefixed.encode_passages(["vitamin d and bones"]),
                               encoder.encode_passages(["passage: vitamin d and bones"]), atol=1e-5)
    # The passage prefix changes stored vectors, so it changes the fingerprint; the query prefix does not.
    assert prefixed.fingerprint != encoder.fingerprint
    assert Encoder(ModelConfig(query_prefix="q: ", batch_size=7, precision="fp32")).fingerprint == encoder.fingerprint
    assert Encoder(ModelConfig(max_seq_length=128, precision="fp32")).fingerprint != encoder.fingerprint
    report = encoder.report()
    assert report["dim"] == 384 and report["device"] == "cpu" and report["pooling"] == "mean"
    assert report["fingerprint"] == encoder.fingerprint


# ---------------------------------------------------------------------------------- embed stage


def test_embed_chunks_order_normalised_and_cached(tmp_path, encoder, st_model):
    texts = [f"{t} (variant {i})" for i, t in enumerate(TEXTS * 2)] + [TEXTS[0]] * 3  # 3 duplicate rows
    chunks = write_chunks(tmp_path / "chunks", texts)
    cfg = FP32
    first = embed_chunks(chunks, tmp_path / "emb", tmp_path / "cache", cfg, progress=False, encoder=encoder)
    assert first["rows"] == len(texts) and first["embedded"] == len(texts) - 2 and first["cached"] == 0
    assert first["duplicates"] == 2 and first["dim"] == 384 and first["model_fingerprint"] == encoder.fingerprint
    ids, vectors = read_vectors(tmp_path / "emb")
    assert ids == [f"c{i:04d}" for i in range(len(texts))]
    assert cosine(vectors, st_model.encode(texts, batch_size=16)).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert datasets.dataset_info(tmp_path / "emb")["model_fingerprint"] == encoder.fingerprint

    second = embed_chunks(chunks, tmp_path / "emb2", tmp_path / "cache", cfg, progress=False, encoder=encoder)
    assert second["embedded"] == 0 and second["cached"] == len(texts)
    ids2, vectors2 = read_vectors(tmp_path / "emb2")
    assert ids2 == ids and np.array_equal(vectors2, vectors)


def test_embedding_in_windows_gives_the_rows_of_one_window_and_encodes_a_repeat_once(tmp_path, encoder):
    """The stage reads, embeds and writes a window of rows at a time (its memory does not grow with
    the corpus); a text an earlier window encoded is found in the cache, not encoded again."""
    texts = [f"{t} (variant {i})" for i, t in enumerate(TEXTS * 3)] + [TEXTS[0]] * 2
    texts[17] = texts[1]  # a repeat three windows later
    chunks = write_chunks(tmp_path / "chunks", texts)
    whole = embed_chunks(chunks, tmp_path / "whole", tmp_path / "cache-a", FP32, progress=False, encoder=encoder)
    windowed = embed_chunks(chunks, tmp_path / "windowed", tmp_path / "cache-b", FP32, progress=False,
                            encoder=encoder, window_rows=5)
    assert whole["rows"] == windowed["rows"] == len(texts)
    assert whole["embedded"] == windowed["embedded"] == len(set(texts))  # every distinct text encoded once
    assert (windowed["cached"], windowed["duplicates"]) == (1, 1)  # texts[17] from window 1; the last row in-window
    assert (whole["cached"], whole["duplicates"]) == (0, 2)
    ids_a, vec_a = read_vectors(tmp_path / "whole")
    ids_b, vec_b = read_vectors(tmp_path / "windowed")
    assert ids_a == ids_b == [f"c{i:04d}" for i in range(len(texts))]
    np.testing.assert_allclose(vec_a, vec_b, atol=1e-5)
    np.testing.assert_array_equal(vec_b[17], vec_b[1])


def test_changed_chunk_reembeds_only_that_chunk(tmp_path, encoder):
    texts = [f"Finding {i}: protein {i} binds receptor {i * 7}." for i in range(20)]
    cfg = FP32
    embed_chunks(write_chunks(tmp_path / "v1", texts), tmp_path / "emb1", tmp_path / "cache", cfg,
                 progress=False, encoder=encoder)
    changed = list(texts)
    changed[11] = "Finding 11 was retracted after the images were found to be duplicated."
    summary = embed_chunks(write_chunks(tmp_path / "v2", changed), tmp_path / "emb2", tmp_path / "cache", cfg,
                           progress=False, encoder=encoder)
    assert summary["embedded"] == 1 and summary["cached"] == 19
    _, before = read_vectors(tmp_path / "emb1")
    _, after = read_vectors(tmp_path / "emb2")
    assert np.array_equal(np.delete(after, 11, axis=0), np.delete(before, 11, axis=0))
    np.testing.assert_allclose(after[11], encoder.encode_passages([changed[11]])[0], atol=1e-5)


def test_cache_shared_across_specs(tmp_path, encoder):
    cfg = FP32
    a = [f"Shared abstract {i} on sepsis outcomes." for i in range(10)]
    b = a[::-1][:6] + [f"New abstract {i} on asthma." for i in range(4)]
    embed_chunks(write_chunks(tmp_path / "a" / "chunks", a), tmp_path / "a" / "emb", tmp_path / "cache", cfg,
                 progress=False, encoder=encoder)
    summary = embed_chunks(write_chunks(tmp_path / "b" / "chunks", b, ids=[f"b{i}" for i in range(10)]),
                           tmp_path / "b" / "emb", tmp_path / "cache", cfg, progress=False, encoder=encoder)
    assert summary["cached"] == 6 and summary["embedded"] == 4
    ids, vectors = read_vectors(tmp_path / "b" / "emb")
    assert ids == [f"b{i}" for i in range(10)]
    np.testing.assert_allclose(vectors, encoder.encode_passages(b), atol=1e-5)


def test_unreadable_cache_shard_is_skipped_and_reembedded(tmp_path, encoder, caplog):
    cfg = FP32
    texts = [f"Sentence {i} about T cells." for i in range(5)]
    shard_dir = tmp_path / "cache" / encoder.fingerprint
    shard_dir.mkdir(parents=True)
    (shard_dir / "shard-00000000000000000000-1-deadbeef.parquet").write_bytes(b"not parquet at all")
    with caplog.at_level(logging.WARNING, logger="corpusforge.encoding.embed"):
        summary = embed_chunks(write_chunks(tmp_path / "chunks", texts), tmp_path / "emb", tmp_path / "cache", cfg,
                               progress=False, encoder=encoder)
    assert summary["embedded"] == 5 and "unreadable shard" in caplog.text
    found, _ = EmbeddingCache(tmp_path / "cache", encoder.fingerprint, encoder.dim).lookup(map(text_hash, texts))
    assert sorted(found) == sorted(map(text_hash, texts))


def test_empty_and_bad_inputs(tmp_path, encoder):
    cfg = FP32
    summary = embed_chunks(write_chunks(tmp_path / "empty", []), tmp_path / "emb", tmp_path / "cache", cfg,
                           progress=False, encoder=encoder)
    assert summary["rows"] == 0 and datasets.count_rows(tmp_path / "emb") == 0
    with pytest.raises(FileNotFoundError, match="chunk stage"):
        embed_chunks(tmp_path / "nope", tmp_path / "emb2", tmp_path / "cache", cfg, progress=False, encoder=encoder)
    no_text = tmp_path / "no_text"
    with datasets.DatasetWriter(no_text, pa.schema([pa.field("chunk_id", pa.string())])) as w:
        w.write_rows([{"chunk_id": "c1"}])
        w.commit()
    with pytest.raises(ValueError, match="lacks column.*text"):
        embed_chunks(no_text, tmp_path / "emb3", tmp_path / "cache", cfg, progress=False, encoder=encoder)
    with pytest.raises(ValueError, match="encoder was built for"):
        embed_chunks(no_text, tmp_path / "emb4", tmp_path / "cache", ModelConfig(normalize=False, precision="fp32"), encoder=encoder)
    with pytest.raises(TypeError, match="text #1"):
        encoder.encode_passages(["fine", None])  # type: ignore[list-item]
    assert not datasets.is_complete(tmp_path / "emb3")


# The killed run: a real subprocess embedding with small shards, throttled per batch so that the
# parent reliably kills it between the first committed shard and the end.
_KILLED_RUN = r"""
import sys, time
from corpusforge.encoding.embed import embed_chunks
from corpusforge.encoding.encoder import Encoder
from corpusforge.spec import ModelConfig

class Throttled(Encoder):
    def iter_encode(self, *args, **kwargs):
        for item in super().iter_encode(*args, **kwargs):
            time.sleep(0.05)
            yield item

chunks, out, cache = sys.argv[1:4]
cfg = ModelConfig(batch_size=8, precision='fp32')
embed_chunks(chunks, out, cache, cfg, progress=False, encoder=Throttled(cfg), shard_size=32)
"""


def test_sigkill_mid_run_resumes_from_committed_shards(tmp_path, encoder):
    texts = [f"Chunk {i}: " + " ".join(f"w{(i * 31 + k) % 97}" for k in range(3 + i % 9)) for i in range(160)]
    chunks = write_chunks(tmp_path / "chunks", texts)
    out, cache = tmp_path / "emb", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(chunks), str(out), str(cache)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(cache.glob(f"*/{SHARD_GLOB}")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not datasets.is_complete(out), "a killed run must not leave a visible output dataset"
    shards = list(cache.glob(f"*/{SHARD_GLOB}"))
    assert shards, "the parent killed the run after the first committed shard"

    resumed = embed_chunks(chunks, out, cache, FP32, progress=False, encoder=encoder)
    assert resumed["cached"] > 0 and resumed["embedded"] < len(texts)
    assert resumed["cached"] + resumed["embedded"] == len(texts)
    assert not list(cache.glob("*/.tmp-*.parquet")), "the rerun removes the dead writer's temp shard"

    fresh = embed_chunks(chunks, tmp_path / "emb_fresh", tmp_path / "cache_fresh", FP32, progress=False,
                         encoder=encoder)
    assert fresh["embedded"] == len(texts)
    ids, vectors = read_vectors(out)
    ids_fresh, vectors_fresh = read_vectors(tmp_path / "emb_fresh")
    assert ids == ids_fresh
    np.testing.assert_allclose(vectors, vectors_fresh, atol=1e-5)


def test_bf16_precision_is_close_to_fp32_and_keyed_separately(encoder):
    from corpusforge.encoding.encoder import pick_precision

    bf16 = Encoder(ModelConfig(precision="bf16"))
    assert bf16.precision == "bf16" and bf16.fingerprint != encoder.fingerprint  # separate cache keys
    ours, ref = bf16.encode_passages(TEXTS, batch_size=3), encoder.encode_passages(TEXTS, batch_size=3)
    assert ours.dtype == np.float32
    assert cosine(ours, ref).min() >= 0.9995
    assert pick_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        pick_precision("fp16", torch.device("cpu"))
