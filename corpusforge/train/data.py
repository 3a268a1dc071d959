"""Training data for retriever training: pairs from the TRAIN qrels, and a dev split carved from them.

The rules that keep evaluation honest:

* Only ``qrels/train.tsv`` (the spec's training split) feeds training, hard-negative mining,
  early stopping, model selection and promotion. A seeded shuffle of the training query ids puts
  ``dev_fraction`` of them (at least one) into the dev split; the rest are the training queries.
* The test split is read only by :func:`load_test_split`, which the closed loop calls for the final
  report. Training queries that also appear in the test qrels are dropped (and counted), so a
  dataset whose splits overlap cannot leak test judgments into training.

Passages are the chunks of the pipeline's chunk store (they carry the document title); a
document's training passage is its first chunk, the one holding the title and the opening text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path


from corpusforge.data import datasets
from corpusforge.text.extract import read_qrels, read_queries

TRAIN_SPLIT = "train"
TEST_SPLIT = "test"


@dataclass
class TrainingData:
    """Queries, judgments and passages for training, with the dev split carved out.

    Attributes:
        queries: query id -> text, for training and dev queries only.
        train_qrels: judgments of the training queries (``{qid: {doc_id: grade}}``, grade > 0).
        dev_qrels: judgments of the dev queries.
        passages: doc id -> training passage text (the document's first chunk).
        seed: the seed of the dev split.
        dropped_overlap: training query ids dropped because the test qrels judge them too.
    """

    queries: dict[str, str]
    train_qrels: dict[str, dict[str, int]]
    dev_qrels: dict[str, dict[str, int]]
    passages: dict[str, str]
    seed: int
    dropped_overlap: list[str] = field(default_factory=list)

    @property
    def train_ids(self) -> list[str]:
        """Training query ids, sorted."""
        return sorted(self.train_qrels)

    @property
    def dev_ids(self) -> list[str]:
        """Dev query ids, sorted."""
        return sorted(self.dev_qrels)

    def pairs(self) -> list[tuple[str, str]]:
        """``(query id, positive doc id)`` for every judged-relevant training pair whose passage exists.

        Returns:
            Sorted pairs.
        """
        return sorted((q, d) for q, docs in self.train_qrels.items() for d in docs if d in self.passages)

    def positives(self, qid: str) -> set[str]:
        """Every doc judged relevant for a training or dev query."""
        return set(self.train_qrels.get(qid) or self.dev_qrels.get(qid) or {})

    def summary(self) -> dict[str, int]:
        """Counts for logs and MLflow params."""
        return {"train_queries": len(self.train_qrels), "dev_queries": len(self.dev_qrels),
                "train_pairs": len(self.pairs()), "passages": len(self.passages),
                "dropped_test_overlap": len(self.dropped_overlap)}


def split_dev(qids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split query ids into (train, dev) with a seeded shuffle; the same inputs give the same split.

    Args:
        qids: the training query ids.
        fraction: share of them for dev, in (0, 1).
        seed: the shuffle seed.

    Returns:
        ``(train_ids, dev_ids)``, each sorted; dev has at least one id when there are two or more.

    Raises:
        ValueError: fraction outside (0, 1), or fewer than two queries.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"dev fraction must be in (0, 1), got {fraction}")
    if len(qids) < 2:
        raise ValueError(f"need at least 2 training queries to carve a dev split, got {len(qids)}")
    ordered = sorted(qids)
    random.Random(seed).shuffle(ordered)
    n_dev = min(len(ordered) - 1, max(1, math.ceil(fraction * len(ordered))))
    return sorted(ordered[n_dev:]), sorted(ordered[:n_dev])


def first_chunk_passages(chunks_path: str | Path) -> dict[str, str]:
    """Each document's first chunk text (ordinal 0; the lowest ordinal when 0 is missing).

    Args:
        chunks_path: a chunks dataset (schemas.CHUNKS).

    Returns:
        doc id -> passage text.
    """
    table = datasets.read_table(chunks_path, columns=["doc_id", "ordinal", "text"])
    table = table.sort_by([("doc_id", "ascending"), ("ordinal", "ascending")])
    out: dict[str, str] = {}
    for doc, text in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True):
        out.setdefault(doc, text)
    return out


def load_training_data(source_uri: str, chunks_path: str | Path, dev_fraction: float = 0.1, seed: int = 13,
                       endpoint_url: str | None = None) -> TrainingData:
    """Read the training split, carve the dev split, and attach passages.

    The test qrels are read only to find (and drop) training queries they also judge.

    Args:
        source_uri: the BEIR folder of the spec's source.
        chunks_path: the pipeline's chunks dataset.
        dev_fraction: share of training queries held out for dev.
        seed: the dev split seed.
        endpoint_url: S3 endpoint for s3:// sources.

    Returns:
        The training data.

    Raises:
        ValueError: no usable training judgments (the message names the source).
    """
    queries = read_queries(source_uri, endpoint_url)
    train = {q: {d: g for d, g in docs.items() if g > 0}
             for q, docs in read_qrels(source_uri, TRAIN_SPLIT, endpoint_url).items()}
    train = {q: docs for q, docs in train.items() if docs and q in queries}
    try:
        test_ids = set(read_qrels(source_uri, TEST_SPLIT, endpoint_url))
    except FileNotFoundError:
        test_ids = set()
    dropped = sorted(set(train) & test_ids)
    for q in dropped:
        del train[q]
    if len(train) < 2:
        raise ValueError(f"{source_uri}: qrels/{TRAIN_SPLIT}.tsv has {len(train)} usable training queries; need >= 2")
    train_ids, dev_ids = split_dev(list(train), dev_fraction, seed)
    passages = first_chunk_passages(chunks_path)
    return TrainingData(
        queries={q: queries[q] for q in sorted(train)},
        train_qrels={q: train[q] for q in train_ids},
        dev_qrels={q: train[q] for q in dev_ids},
        passages=passages, seed=seed, dropped_overlap=dropped,
    )


def load_test_split(source_uri: str, endpoint_url: str | None = None) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The test queries and judgments, for the FINAL report only (never training or selection).

    Args:
        source_uri: the BEIR folder.
        endpoint_url: S3 endpoint for s3:// sources.

    Returns:
        ``(queries, qrels)`` of the test split.
    """
    queries = read_queries(source_uri, endpoint_url)
    qrels = read_qrels(source_uri, TEST_SPLIT, endpoint_url)
    return {q: queries[q] for q in qrels if q in queries}, qrels


def training_data_for(spec, ws) -> TrainingData:
    """A pipeline's training data: its source's judgments, dev carved with its seed, passages from its chunks.

    Args:
        spec: the pipeline spec (`train.dev_fraction`, `train.seed`, the source).
        ws: its workspace (the chunks dataset must be built).

    Returns:
        The training data.

    Raises:
        FileNotFoundError: the source has no training split.
        ValueError: too few usable training judgments.
    """
    return load_training_data(spec.source_uri, ws.dataset("chunks"), spec.train.dev_fraction, spec.train.seed,
                              spec.source.s3_endpoint_url)
