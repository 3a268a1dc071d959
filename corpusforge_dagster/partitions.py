"""One Dagster partition per pipeline spec (``pipelines/<stem>.yaml``), and the asset key prefix."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from corpusforge.spec import check_unique_names, discover_specs

ROOT = Path(__file__).resolve().parent.parent
# Every asset key starts with it (``corpusforge/documents``), so keys do not collide with other
# code locations in a larger deployment.
PREFIX = "corpusforge"


def asset_key(name: str) -> dg.AssetKey:
    """The Dagster key of a corpusforge asset, e.g. ``corpusforge/chunks``.

    Args:
        name: the asset's name in the stage graph (`Stage.assets`).

    Returns:
        The prefixed key.
    """
    return dg.AssetKey([PREFIX, name])


def pipelines_dir() -> Path:
    """The folder of specs: ``$CORPUSFORGE_PIPELINES_DIR``, else the repository's ``pipelines/``."""
    return Path(os.environ.get("CORPUSFORGE_PIPELINES_DIR") or ROOT / "pipelines")


check_unique_names(pipelines_dir())  # two specs sharing a name would share a workspace and an index
SPEC_PATHS = discover_specs(pipelines_dir())
SPECS = dg.StaticPartitionsDefinition(list(SPEC_PATHS))


def spec_path(partition_key: str) -> Path:
    """The spec file of a partition.

    Args:
        partition_key: a spec stem, e.g. ``demo``.

    Returns:
        The spec's path.
    """
    try:
        return SPEC_PATHS[partition_key]
    except KeyError:
        raise KeyError(f"no pipeline spec {partition_key!r} in {pipelines_dir()}; "
                       f"known: {', '.join(SPEC_PATHS)}") from None
