"""Retrieval indexes: sharded FAISS dense indexes and BM25 (bm25s), saved as plain files."""

from corpusforge.index.bm25 import BM25Index
from corpusforge.index.dense import DenseIndex
from corpusforge.index.factory import choose_factory

__all__ = ["BM25Index", "DenseIndex", "choose_factory"]
