"""The trained late-interaction reranker as an MLflow ``pyfunc`` model: (query, passage) rows -> score.

`train.registry.register_model` logs `RerankerModel` with the reranker directory (saved by
`LateInteraction.save`) as its artifact, so ``mlflow.pyfunc.load_model("models:/<name>@champion")``
gives a model whose ``predict`` takes a DataFrame with ``query`` and ``passage`` columns and returns
one ``score`` per row: the raw MaxSim score that `train.rerank.Reranker.scores` computes when the
endpoint reranks hits (document vectors encoded as they are precomputed for a snapshot). The
fusion with the first-stage score (``reranker.json``'s tuned weight) is the caller's, as it is the
endpoint's.

This module imports MLflow at import time (the class must subclass ``PythonModel``); only the
registry imports it, when a model is logged. The model is logged as code
(`train.reranker_model_code` builds it when MLflow loads it: no pickled object) and carries the
corpusforge package, so it loads wherever its pip requirements are installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

ARTIFACT = "reranker"  # the name of the reranker directory among the model's artifacts
BATCH = 64  # passages encoded per forward pass


@dataclass(frozen=True)
class _Passage:
    """What `Reranker.scores` reads of a hit: no chunk id (no precomputed vectors), the text."""

    text: str
    chunk_id: None = None


class RerankerModel(mlflow.pyfunc.PythonModel):
    """Scores (query, passage) pairs with a trained `LateInteraction` reranker through `Reranker`."""

    def load_context(self, context: Any) -> None:
        """Load the reranker from the model's ``reranker`` artifact (on CUDA when present).

        Args:
            context: MLflow's model context (``context.artifacts["reranker"]`` is the directory).
        """
        from corpusforge.retrieval.rerank import Reranker

        self._reranker = Reranker(context.artifacts[ARTIFACT], fusion_weight=1.0)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score every row.

        Args:
            context: MLflow's model context (unused: the reranker is loaded).
            model_input: ``query`` and ``passage`` columns (strings), one pair per row.
            params: unused.

        Returns:
            A DataFrame with one float ``score`` column, row for row (higher is more relevant).
        """
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"query", "passage"} - set(frame.columns)
        if missing:
            raise ValueError(f"reranker input needs columns 'query' and 'passage'; missing {sorted(missing)}")
        queries = frame["query"].astype(str).tolist()
        passages = frame["passage"].astype(str).tolist()
        scores = np.zeros(len(frame), dtype=np.float64)
        rows_of: dict[str, list[int]] = {}
        for i, query in enumerate(queries):
            rows_of.setdefault(query, []).append(i)
        for query, rows in rows_of.items():  # one query encoding per distinct query
            for start in range(0, len(rows), BATCH):
                part = rows[start:start + BATCH]
                scores[part] = self._score(query, [passages[i] for i in part])
        return pd.DataFrame({"score": scores}, index=frame.index)

    def _score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return self._reranker.scores(query, [_Passage(p) for p in passages])
