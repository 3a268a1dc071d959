"""MLflow model registry for trained retrievers: log a loadable model, register it, move `champion` only when better.

Each trained model is logged as an MLflow model of its training run, with a signature and an input
example, and registered as a new version of ``<prefix>-biencoder`` / ``<prefix>-colbert``:

- the bi-encoder with the ``sentence_transformers`` flavor:
  ``mlflow.sentence_transformers.load_model("models:/<prefix>-biencoder@champion")`` is a
  ``SentenceTransformer`` (``mlflow.pyfunc.load_model`` encodes a list of strings);
- the late-interaction reranker as a ``pyfunc`` (`train.reranker_pyfunc.RerankerModel`, logged as
  model code: `train.reranker_model_code`, no pickle):
  ``mlflow.pyfunc.load_model("models:/<prefix>-colbert@champion").predict(df)`` scores a DataFrame
  of ``query`` / ``passage`` rows.

MLflow 3 logs a model as a LoggedModel (``models:/<model id>``) linked to the run; the version's
source is that URI. The model's dev nDCG@10 is a metric of the run linked to the LoggedModel
(``<family>/dev/ndcg_10``) and the version's tag ``dev_ndcg_10``; the ``champion`` alias moves to
the new version only when that value is strictly higher than the current champion's (or there is
no champion yet).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

CHAMPION = "champion"
DEV_TAG = "dev_ndcg_10"
Kind = Literal["biencoder", "reranker"]

# Example inputs stored with every logged model (and run through it once when it is logged).
EXAMPLE_QUERY = "what causes the tides"
EXAMPLE_PASSAGES = ["The moon's gravity lifts the oceans twice a day.", "Yeast makes bread dough rise."]
# What a logged model needs installed to load (pinned to what trained it); MLflow adds itself.
_BIENCODER_REQUIREMENTS = ("sentence-transformers", "transformers", "torch")
_RERANKER_REQUIREMENTS = ("torch", "transformers", "numpy", "pandas", "pyarrow", "pydantic", "PyYAML", "tqdm")


@dataclass(frozen=True)
class RegisteredVersion:
    """What registering a model did.

    Attributes:
        name: the registered model name.
        version: the new version number.
        dev_ndcg_10: its dev metric.
        champion: the champion version after the decision.
        promoted: True when the alias moved to the new version.
        previous_dev: the former champion's dev metric (None when there was none).
        model_uri: the logged model (``models:/<model id>``); empty when registered from a plain source.
    """

    name: str
    version: str
    dev_ndcg_10: float
    champion: str
    promoted: bool
    previous_dev: float | None
    model_uri: str = ""

    def as_dict(self) -> dict:
        """The outcome as plain data (a stage summary's ``registry``)."""
        return {"name": self.name, "version": self.version, "dev_ndcg_10": self.dev_ndcg_10,
                "champion": self.champion, "promoted": self.promoted, "previous_dev": self.previous_dev,
                "model_uri": self.model_uri}


def champion_dev(client, name: str) -> tuple[str | None, float | None]:
    """The current champion version and its dev metric, or (None, None).

    Args:
        client: an ``mlflow.MlflowClient``.
        name: the registered model.

    Returns:
        ``(version, dev_ndcg_10)``.
    """
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    value = mv.tags.get(DEV_TAG)
    return str(mv.version), float(value) if value is not None else None


def register_model(tracker, model_dir: str | Path, name: str, dev_ndcg_10: float, kind: Kind,
                   tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None,
                   metric: str | None = None) -> RegisteredVersion:
    """Log a trained model to the tracker's run as a loadable MLflow model, register it, maybe move `champion`.

    Args:
        tracker: a started `tracking.RunTracker` (the training run).
        model_dir: the saved model: a sentence-transformers directory (``biencoder``) or a
            `LateInteraction.save` directory (``reranker``).
        name: the registered model name.
        dev_ndcg_10: the model's dev nDCG@10 (the only metric that can promote it).
        kind: ``biencoder`` (sentence_transformers flavor) or ``reranker`` (pyfunc).
        tags: extra tags of the logged model and the model version.
        params: the training configuration, recorded on the logged model.
        metric: the run metric the dev score is logged as (default ``<kind>/dev/ndcg_10``).

    Returns:
        The registration and promotion outcome.
    """
    from mlflow.entities import LoggedModelOutput

    client = tracker.client
    text_tags = {k: str(v) for k, v in (tags or {}).items()}
    logged = client.create_logged_model(
        tracker.experiment_id, name=kind, source_run_id=tracker.run_id, tags=text_tags,
        params={k: str(v)[:500] for k, v in (params or {}).items()},
        model_type="sentence-transformer" if kind == "biencoder" else "late-interaction-reranker")
    # Logged with the model's id, the dev score shows on the LoggedModel (and the version page) too.
    client.log_metric(tracker.run_id, metric or f"{kind}/dev/ndcg_10", float(dev_ndcg_10), model_id=logged.model_id)
    with _tracking_uri(tracker.tracking_uri):  # MLflow's model logging and registry read the global URI
        if kind == "biencoder":
            info = _log_biencoder(model_dir, logged.model_id)
        elif kind == "reranker":
            info = _log_reranker(model_dir, logged.model_id)
        else:
            raise ValueError(f"unknown model kind {kind!r}: biencoder or reranker")
        client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        version = register_version(client, name, info.model_uri, tracker.run_id, dev_ndcg_10, text_tags,
                                   model_id=logged.model_id)
    return promote_if_better(client, name, version, dev_ndcg_10, model_uri=info.model_uri)


def register_version(client, name: str, source: str, run_id: str, dev_ndcg_10: float,
                     tags: Mapping[str, str] | None = None, model_id: str | None = None) -> str:
    """Create the registered model when missing and a new version of it, tagged with its dev metric.

    Args:
        client: an ``mlflow.MlflowClient``.
        name: the registered model.
        source: the model's location (``models:/<model id>`` for a logged model).
        run_id: the training run.
        dev_ndcg_10: the version's dev metric (tag `DEV_TAG`).
        tags: extra version tags.
        model_id: the LoggedModel the version points at.

    Returns:
        The new version number.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="trained by corpusforge train")
    except MlflowException:
        pass  # already registered
    mv = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id,
                                     tags={DEV_TAG: repr(float(dev_ndcg_10)), **(tags or {})})
    return str(mv.version)


def promote_if_better(client, name: str, version: str, dev_ndcg_10: float, model_uri: str = "") -> RegisteredVersion:
    """Point `champion` at `version` only when its dev metric beats the current champion's.

    Args:
        client: an ``mlflow.MlflowClient``.
        name: the registered model.
        version: the candidate version.
        dev_ndcg_10: the candidate's dev metric.
        model_uri: the candidate's logged model, reported back.

    Returns:
        The outcome.
    """
    current, previous = champion_dev(client, name)
    promoted = current is None or previous is None or dev_ndcg_10 > previous
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return RegisteredVersion(name, str(version), float(dev_ndcg_10), str(version) if promoted else str(current),
                             promoted, previous, model_uri)


def _log_biencoder(model_dir: str | Path, model_id: str):
    """The bi-encoder with MLflow's sentence_transformers flavor (strings in, unit vectors out)."""
    import mlflow.sentence_transformers
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    dim = model.get_embedding_dimension()
    signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))
    return mlflow.sentence_transformers.log_model(
        model, model_id=model_id, signature=signature, input_example=[EXAMPLE_QUERY],
        pip_requirements=_pinned(_BIENCODER_REQUIREMENTS))


def _log_reranker(model_dir: str | Path, model_id: str):
    """The reranker as a pyfunc: a DataFrame of (query, passage) rows in, one score per row out."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import corpusforge
    from corpusforge.train import reranker_model_code
    from corpusforge.train.reranker_pyfunc import ARTIFACT

    signature = ModelSignature(inputs=Schema([ColSpec("string", "query"), ColSpec("string", "passage")]),
                               outputs=Schema([ColSpec("double", "score")]))
    example = pd.DataFrame({"query": [EXAMPLE_QUERY] * len(EXAMPLE_PASSAGES), "passage": EXAMPLE_PASSAGES})
    return mlflow.pyfunc.log_model(
        python_model=reranker_model_code.__file__, artifacts={ARTIFACT: str(model_dir)}, model_id=model_id,
        signature=signature, input_example=example, pip_requirements=_pinned(_RERANKER_REQUIREMENTS),
        code_paths=[str(Path(corpusforge.__file__).parent)])  # the model's code travels with it


def _pinned(distributions: tuple[str, ...]) -> list[str]:
    """``name==version`` of installed distributions, without local labels (``torch==2.13.0``, not ``+cpu``)."""
    out = []
    for dist in distributions:
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Make `uri` MLflow's global tracking URI for the block, restoring the previous one after.

    MLflow's ``log_model`` and its registry's resolution of ``models:/<id>`` sources use the
    global URI, not the client's.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield
