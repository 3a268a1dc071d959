"""MLflow registry: every trained model becomes a version; `champion` moves only when dev improves."""

from __future__ import annotations

from corpusforge.tracking import RunTracker
from corpusforge.train.registry import CHAMPION, champion_dev, register_model


def test_champion_moves_only_when_dev_improves(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    outcomes = []
    for dev in (0.50, 0.45, 0.50, 0.62):
        with RunTracker(uri, "train-test", run_name=f"dev-{dev}") as t:
            outcomes.append(register_model(t, model, "tiny-biencoder", dev))
    assert [o.version for o in outcomes] == ["1", "2", "3", "4"]
    assert [o.promoted for o in outcomes] == [True, False, False, True]  # equal is not better
    assert [o.champion for o in outcomes] == ["1", "1", "1", "4"]
    client = t.client
    assert str(client.get_model_version_by_alias("tiny-biencoder", CHAMPION).version) == "4"
    assert champion_dev(client, "tiny-biencoder") == ("4", 0.62)
    assert champion_dev(client, "no-such-model") == (None, None)
    # the version points at the run's logged model
    mv = client.get_model_version("tiny-biencoder", "2")
    assert mv.run_id and mv.source.endswith("/model")
