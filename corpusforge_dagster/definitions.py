"""The Dagster code location. From the repository root, with no flags: ``dg dev``, ``dagster dev``,
``dg check defs`` (``pyproject.toml``'s ``[tool.dg]`` names this module)."""

import dagster as dg

from corpusforge_dagster.assets import ASSETS
from corpusforge_dagster.jobs import build_job, nightly_build, source_changed
from corpusforge_dagster.resources import resources_from_env

defs = dg.Definitions(
    assets=ASSETS,
    jobs=[build_job],
    schedules=[nightly_build],
    sensors=[source_changed],
    resources=resources_from_env(),
)
