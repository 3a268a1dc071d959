"""MLflow model registry for trained retrievers: register a version, move `champion` only when better on dev.

Each trained model is logged as an artifact directory of its training run and registered as a new
version of a registered model (``<prefix>-biencoder``, ``<prefix>-colbert``). The version carries
its dev metric as the tag ``dev_ndcg_10``; the ``champion`` alias moves to it only when that
value is strictly higher than the current champion's (or there is no champion yet). Uses the
MLflow 3.x client APIs: ``create_registered_model``, ``create_model_version``,
``get_model_version_by_alias``, ``set_registered_model_alias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHAMPION = "champion"
DEV_TAG = "dev_ndcg_10"


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
    """

    name: str
    version: str
    dev_ndcg_10: float
    champion: str
    promoted: bool
    previous_dev: float | None

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "dev_ndcg_10": self.dev_ndcg_10,
                "champion": self.champion, "promoted": self.promoted, "previous_dev": self.previous_dev}


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


def register_model(tracker, model_dir: str | Path, name: str, dev_ndcg_10: float, artifact_path: str = "model",
                   tags: dict[str, str] | None = None) -> RegisteredVersion:
    """Log a model directory to the tracker's run, register it, and maybe move `champion`.

    Args:
        tracker: a started `tracking.RunTracker` (the training run).
        model_dir: the saved model directory.
        name: the registered model name.
        dev_ndcg_10: the model's dev nDCG@10 (the only metric that can promote it).
        artifact_path: where in the run's artifacts the model goes.
        tags: extra model-version tags.

    Returns:
        The registration and promotion outcome.
    """
    from mlflow.exceptions import MlflowException

    client = tracker.client
    tracker.log_artifact(model_dir, artifact_path)
    try:
        client.create_registered_model(name, description="trained by corpusforge train")
    except MlflowException:
        pass  # already registered
    source = f"{tracker.artifact_uri}/{artifact_path}"
    mv = client.create_model_version(name, source=source, run_id=tracker.run_id,
                                     tags={DEV_TAG: repr(float(dev_ndcg_10)), **(tags or {})})
    return promote_if_better(client, name, mv.version, dev_ndcg_10)


def promote_if_better(client, name: str, version: str, dev_ndcg_10: float) -> RegisteredVersion:
    """Point `champion` at `version` only when its dev metric beats the current champion's.

    Args:
        client: an ``mlflow.MlflowClient``.
        name: the registered model.
        version: the candidate version.
        dev_ndcg_10: the candidate's dev metric.

    Returns:
        The outcome.
    """
    current, previous = champion_dev(client, name)
    promoted = current is None or previous is None or dev_ndcg_10 > previous
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return RegisteredVersion(name, str(version), float(dev_ndcg_10), str(version) if promoted else str(current),
                             promoted, previous)
