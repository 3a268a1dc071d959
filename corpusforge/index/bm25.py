"""BM25 over chunk texts with bm25s: build, save as .npy + JSON, memory-map, search.

Row ``i`` of the index is row ``i`` of the chunks dataset, as for the dense index. On disk::

    data.csc.index.npy indices.csc.index.npy indptr.csc.index.npy   # bm25s score matrix (CSC)
    vocab.index.json params.index.json                              # bm25s
    bm25.json                                                       # our config and facts

`BM25Index.build` indexes a list of texts in one process, in memory. Both engines' index stage
builds in two passes over parts instead: `shard_stats` per part (document frequencies and
lengths), `CorpusStats.merge` (global vocabulary, IDF and average length), `shard_postings` per
part (its rows' scores under the global statistics), written by `BM25Index.write_postings`
straight into the score matrix's files (`ScoreMatrixWriter`); the files equal those of `build`
on the concatenated texts, and no process holds the matrix.

No pickles (bm25s writes with ``allow_pickle=False``). Only documents sharing at least one query
token count as hits, so a query returns fewer than k rows (padded with -1) when fewer documents
match; this holds for every BM25 variant, including bm25l/bm25+ whose non-matching documents get
a non-zero floor score.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s import scoring as bm25s_scoring

from corpusforge.data.datasets import atomic_dir
from corpusforge.spec import Bm25Config

META_FILE = "bm25.json"
VOCAB_FILE = "vocab.index.json"  # bm25s's name
FORMAT_VERSION = 1


def _stemmer(name: str | None) -> Any:
    """A PyStemmer stemmer for `name`, or None when no stemming is configured.

    Raises:
        ImportError: stemming is configured but PyStemmer is not installed (we refuse rather
            than silently building an unstemmed index the config did not ask for).
        ValueError: PyStemmer does not know the language.
    """
    if not name:
        return None
    try:
        import Stemmer  # PyStemmer
    except ImportError:
        raise ImportError(f"bm25 stemmer={name!r} needs PyStemmer (pip install PyStemmer), "
                          "or set index.bm25.stemmer to null") from None
    try:
        return Stemmer.Stemmer(name)
    except KeyError:
        raise ValueError(f"unknown PyStemmer language {name!r}; known: {Stemmer.algorithms()}") from None


def _tokenize(texts: list[str], cfg: Bm25Config, stemmer: Any) -> list[list[str]]:
    """Lower-cased word tokens per text, stopwords removed, stemmed if configured."""
    return bm25s.tokenize(texts, stopwords=cfg.stopwords or [], stemmer=stemmer,
                          return_ids=False, show_progress=False)


def _sorted_vocab(tokens: "bm25s.tokenization.Tokenized") -> "bm25s.tokenization.Tokenized":
    """The same tokens with ids in sorted-token order.

    bm25s numbers tokens as it meets them through a set, so the ids (and the saved files) would
    depend on the interpreter's hash seed; sorted ids make equal corpora give equal files.
    """
    order = sorted(tokens.vocab, key=tokens.vocab.__getitem__)
    rank = {tok: i for i, tok in enumerate(sorted(tokens.vocab))}
    remap = np.array([rank[tok] for tok in order], dtype=np.int64)
    ids = [remap[np.asarray(doc, dtype=np.int64)].tolist() for doc in tokens.ids]
    return type(tokens)(ids=ids, vocab={tok: i for i, tok in enumerate(sorted(tokens.vocab))})


def shard_stats(texts: list[str], cfg: Bm25Config) -> dict[str, Any]:
    """Pass 1 over one part of a corpus: document frequency per token, and document lengths.

    Args:
        texts: the part's chunk texts, in row order.
        cfg: the tokenisation settings.

    Returns:
        ``{"df": {token: documents}, "lengths": int64 array}``.
    """
    df: dict[str, int] = {}
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, doc in enumerate(_tokenize(list(texts), cfg, _stemmer(cfg.stemmer))):
        lengths[i] = len(doc)
        for tok in set(doc):
            df[tok] = df.get(tok, 0) + 1
    return {"df": df, "lengths": lengths}


@dataclass
class CorpusStats:
    """The corpus-wide statistics BM25 scores depend on, merged from every part's `shard_stats`.

    Attributes:
        vocab: token -> id, ids in sorted-token order (as `build` numbers them).
        n_docs: documents in the corpus.
        avg_doc_len: mean document length in tokens.
        idf: float32 IDF per token id.
        nonoccurrence: BM25L / BM25+ floor per token id (None for the other variants).
        df: documents per token id (int64): the length of each column of the score matrix.
    """

    vocab: dict[str, int]
    n_docs: int
    avg_doc_len: float
    idf: np.ndarray
    nonoccurrence: np.ndarray | None
    df: np.ndarray

    @classmethod
    def merge(cls, parts: Iterable[dict[str, Any]], cfg: Bm25Config) -> "CorpusStats":
        """Reduce the parts' statistics (in any order) into the corpus's.

        Args:
            parts: `shard_stats` results; read once, so a generator keeps one part's in memory.
            cfg: the scoring settings (k1, b, variant).

        Returns:
            The statistics; IDF and floors computed by bm25s's own functions.

        Raises:
            ValueError: the parts hold no documents.
        """
        total: dict[str, int] = {}
        part_lengths = []
        for part in parts:
            for tok, n in part["df"].items():
                total[tok] = total.get(tok, 0) + n
            part_lengths.append(part["lengths"])
        vocab = {tok: i for i, tok in enumerate(sorted(total))}
        df = {vocab[tok]: n for tok, n in total.items()}
        lengths = np.concatenate(part_lengths) if part_lengths else np.zeros(0, dtype=np.int64)
        if len(lengths) == 0:
            raise ValueError("cannot build a BM25 index from 0 texts")
        n_docs, avg = len(lengths), lengths.mean()  # as bm25s computes it: equal floats, equal scores
        model = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
        idf_fn = bm25s_scoring._select_idf_scorer(model.idf_method)
        idf = bm25s_scoring._build_idf_array(df, n_docs, compute_idf_fn=idf_fn, dtype=model.dtype)
        floor = None
        if model.method in model.methods_requiring_nonoccurrence:
            floor = bm25s_scoring._build_nonoccurrence_array(
                df, n_docs, compute_idf_fn=idf_fn, calculate_tfc_fn=bm25s_scoring._select_tfc_scorer(model.method),
                l_d=avg, l_avg=avg, k1=model.k1, b=model.b, delta=model.delta, dtype=model.dtype)
        df_array = np.zeros(len(vocab), dtype=np.int64)
        for tok_id, n in df.items():
            df_array[tok_id] = n
        return cls(vocab=vocab, n_docs=n_docs, avg_doc_len=avg, idf=idf, nonoccurrence=floor, df=df_array)


def shard_postings(texts: list[str], cfg: Bm25Config, stats: CorpusStats, first_row: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 2 over one part: its rows' BM25 scores under the corpus's statistics.

    Args:
        texts: the part's chunk texts, in row order.
        cfg: the settings `stats` was merged with.
        stats: the merged corpus statistics.
        first_row: the corpus row of the part's first text.

    Returns:
        ``(scores, rows, token_ids)``: one entry per (document, distinct token), rows global.
    """
    ids = [[stats.vocab[t] for t in doc] for doc in _tokenize(list(texts), cfg, _stemmer(cfg.stemmer))]
    model = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
    postings = sum(len(set(doc)) for doc in ids)
    scores, rows, tokens = bm25s_scoring._build_scores_and_indices_for_matrix(
        corpus_token_ids=ids, idf_array=stats.idf, avg_doc_len=stats.avg_doc_len, doc_frequencies={0: postings},
        k1=model.k1, b=model.b, delta=model.delta, nonoccurrence_array=stats.nonoccurrence, method=model.method,
        dtype=model.dtype, int_dtype=model.int_dtype, show_progress=False)
    return scores, rows + np.asarray(first_row, dtype=rows.dtype), tokens


def _check_strings(texts: list, first: int = 0) -> None:
    """Raise ValueError naming the first text that is not a string (`first`: its part's first row)."""
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"texts[{first + bad}] is {type(texts[bad]).__name__}, expected str")


class ScoreMatrixWriter:
    """Writes bm25s's CSC score files (data, indices, indptr) part by part, never holding the matrix.

    A column of the matrix holds one entry per document containing its token, so the column
    pointers follow from the document frequencies (`CorpusStats.df`) before any score is known,
    and every part's entries go straight to their place in the files (``os.pwrite``, one write per
    token of the part; no mapping, so the written pages never count in this process's memory).
    Parts come in row order, so rows ascend within each column, the order bm25s sorts them in:
    the files equal those of `BM25Index.build`.

    Args:
        directory: where to write (temporary names until `move_into_place`).
        stats: the merged statistics.
        model: a bm25s model with the index's dtypes.
    """

    NAMES = {"data": "data.csc.index.npy", "indices": "indices.csc.index.npy", "indptr": "indptr.csc.index.npy"}

    def __init__(self, directory: Path, stats: CorpusStats, model: bm25s.BM25):
        self.directory = directory
        self.indptr = np.zeros(len(stats.df) + 1, dtype=np.int64)
        np.cumsum(stats.df, out=self.indptr[1:])
        self.cursor = self.indptr[:-1].copy()
        self.dtypes = {"data": np.dtype(model.dtype), "indices": np.dtype(model.int_dtype)}
        nnz = int(self.indptr[-1])
        np.save(self._tmp("indptr"), self.indptr, allow_pickle=False)
        self._files: dict[str, tuple[int, int]] = {}  # name -> (descriptor, offset of the data)
        for name, dtype in self.dtypes.items():
            # open_memmap writes np.save's header for the final shape; the data goes after it
            header = np.lib.format.open_memmap(self._tmp(name), mode="w+", dtype=dtype, shape=(nnz,))
            offset = header.offset
            del header
            self._files[name] = (os.open(self._tmp(name), os.O_WRONLY), offset)

    def _tmp(self, name: str) -> Path:
        return self.directory / f".partial-{self.NAMES[name]}"

    def add(self, scores: np.ndarray, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Write one part's `shard_postings` (parts in row order).

        Raises:
            ValueError: a token with more entries than its document frequency.
        """
        if len(tokens) == 0:
            return
        order = np.lexsort((rows, tokens))
        tokens = tokens[order]
        columns = {"data": np.ascontiguousarray(scores[order], dtype=self.dtypes["data"]),
                   "indices": np.ascontiguousarray(rows[order], dtype=self.dtypes["indices"])}
        starts = np.concatenate([[0], np.flatnonzero(np.diff(tokens)) + 1])
        ends = np.concatenate([starts[1:], [len(tokens)]])
        toks = tokens[starts].astype(np.int64)
        at = self.cursor[toks]
        if (at + (ends - starts) > self.indptr[toks + 1]).any():
            raise ValueError("BM25 postings do not match the merged statistics (more entries than the "
                             "document frequency)")
        for name, values in columns.items():
            fd, offset = self._files[name]
            view = memoryview(values).cast("B")
            size = values.itemsize
            for a, b, pos in zip(starts.tolist(), ends.tolist(), at.tolist()):
                os.pwrite(fd, view[a * size:b * size], offset + pos * size)
        self.cursor[toks] += ends - starts

    def __enter__(self) -> "ScoreMatrixWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close the files; when every part was added, check that each column is full.

        Raises:
            ValueError: a token with fewer entries than its document frequency.
        """
        for fd, _ in self._files.values():
            os.close(fd)
        self._files = {}
        if exc_type is None and not np.array_equal(self.cursor, self.indptr[1:]):
            raise ValueError("BM25 postings do not match the merged statistics (fewer entries than the "
                             "document frequency)")

    def move_into_place(self) -> None:
        """Give the finished files their bm25s names (replacing bm25s's placeholders)."""
        for name, final in self.NAMES.items():
            os.replace(self._tmp(name), self.directory / final)


@dataclass
class BM25Index:
    """A bm25s index over chunk rows ``0..num_docs-1``.

    Attributes:
        model: the bm25s model (score matrix and vocabulary).
        cfg: tokenisation and scoring config.
        info: build facts.
    """

    model: bm25s.BM25
    cfg: Bm25Config
    info: dict[str, Any] = field(default_factory=dict)
    _stem: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._stem = _stemmer(self.cfg.stemmer)

    @classmethod
    def build(cls, texts: list[str], cfg: Bm25Config) -> "BM25Index":
        """Tokenise and index `texts`.

        Args:
            texts: one string per chunk row.
            cfg: k1, b, BM25 variant, stopwords ('en' or null) and optional stemmer language.

        Returns:
            The index.

        Raises:
            ValueError: no texts, or a text that is not a string.
            ImportError: a stemmer is configured and PyStemmer is missing.
        """
        t0 = time.perf_counter()
        texts = list(texts)
        if not texts:
            raise ValueError("cannot build a BM25 index from 0 texts")
        _check_strings(texts)
        stem = _stemmer(cfg.stemmer)
        tokens = _sorted_vocab(bm25s.tokenize(texts, stopwords=cfg.stopwords or [], stemmer=stem,
                                              show_progress=False))
        model = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
        model.index(tokens, show_progress=False)
        info = {"build_seconds": round(time.perf_counter() - t0, 3)}
        return cls(model=model, cfg=cfg, info=info)

    @classmethod
    def build_in_parts(cls, parts: Callable[[], Iterable[list[str]]], cfg: Bm25Config,
                       directory: str | Path) -> "BM25Index":
        """`build` over a corpus read in parts, twice, written straight to `directory`.

        Statistics per part, merged; then scores per part, each written into the score matrix's
        files (`ScoreMatrixWriter`). Holds one part's texts, tokens and scores at a time, and the
        merged vocabulary with its per-token arrays: never the corpus's texts (whose Python token
        lists `build` holds whole, several times the text's size) nor the score matrix.

        Args:
            parts: returns a fresh iterator over the corpus's texts in row order, in lists.
            cfg: as for `build`.
            directory: the index directory (replaced atomically).

        Returns:
            The saved index, memory-mapped: the files `build` then `save` give for the concatenated
            texts.

        Raises:
            ValueError: no texts, or a text that is not a string.
        """
        t0 = time.perf_counter()

        def checked() -> Iterator[list[str]]:
            seen = 0
            for texts in parts():
                _check_strings(texts, seen)
                seen += len(texts)
                if texts:
                    yield texts

        stats = CorpusStats.merge((shard_stats(texts, cfg) for texts in checked()), cfg)

        def postings() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            first = 0
            for texts in filter(None, parts()):
                yield shard_postings(texts, cfg, stats, first)
                first += len(texts)

        index = cls.write_postings(postings(), stats, cfg, directory)
        index.info = {"build_seconds": round(time.perf_counter() - t0, 3)}
        return index

    @classmethod
    def write_postings(cls, parts: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], stats: CorpusStats,
                       cfg: Bm25Config, directory: str | Path) -> "BM25Index":
        """Save the index of a corpus built in parts: every part's `shard_postings`, in row order.

        Args:
            parts: `shard_postings` results, ordered by their first row; read once.
            stats: the merged statistics they were scored with.
            cfg: the settings.
            directory: the index directory (replaced atomically).

        Returns:
            The saved index, memory-mapped: the files `build` then `save` give for the
            concatenated texts.

        Raises:
            ValueError: the parts do not hold the postings `stats` counted.
        """
        t0 = time.perf_counter()
        model = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
        with atomic_dir(directory) as tmp:
            with ScoreMatrixWriter(tmp, stats, model) as writer:
                for part in parts:
                    writer.add(*part)
            # bm25s writes its parameters, vocabulary and floors (placeholder score arrays, replaced
            # below by the streamed ones), so those files are exactly the ones `save` writes
            model.scores = {"data": np.zeros(0, dtype=model.dtype), "indices": np.zeros(0, dtype=model.int_dtype),
                            "indptr": np.zeros(1, dtype=np.int64), "num_docs": stats.n_docs}
            model.nonoccurrence_array = stats.nonoccurrence
            model.vocab_dict = {**stats.vocab, "": len(stats.vocab)}  # bm25s's empty token, as `index` adds it
            cls(model=model, cfg=cfg)._write(tmp)
            writer.move_into_place()
        index = cls.load(directory)
        index.info = {"build_seconds": round(time.perf_counter() - t0, 3)}
        return index

    @property
    def num_docs(self) -> int:
        """Number of indexed rows."""
        return int(self.model.scores["num_docs"])

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows per query by BM25 score.

        Args:
            queries: query strings.
            k: results per query (may exceed the corpus size).

        Returns:
            ``(scores, rows)``: float32 and int64 ``(len(queries), k)``, best first (ties by
            lower row); rows -1 and scores -inf past the documents that match a query token.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not a single string")
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_r = np.full((len(queries), k), -1, dtype=np.int64)
        indptr = self.model.scores["indptr"]
        indices = self.model.scores["indices"]
        vocab = self.model.vocab_dict
        hit = np.zeros(self.num_docs, dtype=bool)
        for qi, toks in enumerate(_tokenize(list(queries), self.cfg, self._stem)):
            ids = [vocab[t] for t in toks if t in vocab]
            if not ids:
                continue
            hit[:] = False  # a mask, not np.unique of the postings: O(docs) but no sort
            for t in set(ids):
                hit[indices[indptr[t]:indptr[t + 1]]] = True
            matched = np.flatnonzero(hit)
            if matched.size == 0:
                continue
            scores = self.model.get_scores_from_ids(ids)[matched]
            if matched.size > k:  # partial selection first: O(matched) rather than a full sort
                part = np.argpartition(-scores, k - 1)[:k]
                matched, scores = matched[part], scores[part]
            order = np.lexsort((matched, -scores))
            n = order.size
            out_s[qi, :n] = scores[order]
            out_r[qi, :n] = matched[order]
        return out_s, out_r

    def report(self) -> dict[str, Any]:
        """Plain-data facts: config, corpus size, vocabulary size, build time, bm25s version."""
        return {
            "format_version": FORMAT_VERSION,
            "num_docs": self.num_docs,
            "vocab_size": len(self.model.vocab_dict),
            "config": self.cfg.model_dump(mode="json"),
            "bm25s_version": bm25s.__version__,
            **self.info,
        }

    def save(self, directory: str | Path) -> Path:
        """Write the bm25s files and ``bm25.json`` into `directory` atomically (temp dir + rename).

        Args:
            directory: destination; replaced if it exists.

        Returns:
            The directory path.
        """
        with atomic_dir(directory) as tmp:
            self._write(tmp)
        return Path(directory)

    def _write(self, directory: Path) -> None:
        meta = {k: v for k, v in self.report().items() if k != "build_seconds"}  # equal data, equal files
        self.model.save(str(directory), allow_pickle=False, show_progress=False)
        # bm25s writes the vocabulary with orjson when it is installed and with json's spaced
        # separators otherwise: one canonical (compact) form, so the files do not depend on it
        (directory / VOCAB_FILE).write_text(json.dumps(self.model.vocab_dict, ensure_ascii=False, separators=(",", ":")),
                                            encoding="utf-8")
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "BM25Index":
        """Load an index written by `save`.

        Args:
            directory: the index directory.
            mmap: memory-map the score arrays instead of reading them.

        Returns:
            The index.

        Raises:
            FileNotFoundError: ``bm25.json`` is missing.
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory} is not a BM25 index (no {META_FILE})")
        meta = json.loads(meta_path.read_text())
        model = bm25s.BM25.load(str(directory), mmap=mmap, allow_pickle=False, show_progress=False)
        # Plain ndarray views of the mapped files: still backed by the mapping, but slicing a
        # np.memmap subclass costs ~2 us of Python per slice, which was a third of a query's time.
        model.scores = {k: v.view(np.ndarray) if isinstance(v, np.memmap) else v for k, v in model.scores.items()}
        if int(model.scores["num_docs"]) != meta["num_docs"]:
            raise ValueError(f"BM25 index {directory}: score matrix has {model.scores['num_docs']} docs, "
                             f"{META_FILE} says {meta['num_docs']}")
        return cls(model=model, cfg=Bm25Config(**meta["config"]))
