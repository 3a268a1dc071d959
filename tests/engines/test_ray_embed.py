"""The Ray embed driver's plan (`engines.ray_embed.write_blocks`): the local engine's blocks, no Ray needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from corpusforge.data.hashing import text_hash
from corpusforge.encoding.embed import EmbeddingCache
from corpusforge.engines.ray_embed import write_blocks
from tests.encoding.test_embed import write_chunks


def _blocks(paths: list[Path]) -> list[list[str]]:
    out = []
    for p in paths:
        table = pq.read_table(p)
        assert table.column("text_hash").to_pylist() == [text_hash(t) for t in table.column("text").to_pylist()]
        out.append(table.column("text").to_pylist())
    return out


def test_blocks_hold_first_occurrences_of_uncached_texts_cut_at_window_boundaries(tmp_path):
    # windows of 5 rows:  a b a c d | e a f g h | b i i j c      (c is cached)
    texts = list("abacd") + list("eafgh") + list("biijc")
    chunks = write_chunks(tmp_path / "chunks", texts)
    cache = EmbeddingCache(tmp_path / "cache", "fp", 4)
    cache.add([text_hash("c")], np.ones((1, 4), dtype=np.float32))
    cache.flush()

    (tmp_path / "scratch").mkdir()
    blocks, counts = write_blocks(chunks, cache, tmp_path / "scratch", block=3, window_rows=5)

    # per window, as the local engine encodes: [a b d] | [e f g] [h] | [i j]; a block never spans
    # two windows (one spanning block, [h i j], would batch h with i and j and change h's last bits)
    assert _blocks(blocks) == [["a", "b", "d"], ["e", "f", "g"], ["h"], ["i", "j"]]
    assert [p.name for p in blocks] == [f"block-{i:06d}.parquet" for i in range(4)]
    assert counts == {"rows": 15, "cached": 2, "todo": 9}


def test_an_empty_cache_and_one_window(tmp_path):
    texts = ["x", "y", "x", "z"]
    chunks = write_chunks(tmp_path / "chunks", texts)
    cache = EmbeddingCache(tmp_path / "cache", "fp", 4)
    (tmp_path / "scratch").mkdir()
    blocks, counts = write_blocks(chunks, cache, tmp_path / "scratch", block=16)
    assert _blocks(blocks) == [["x", "y", "z"]]
    assert counts == {"rows": 4, "cached": 0, "todo": 3}
