"""The Dagster code location: ``dagster dev -m assets.definitions`` (from the repository root)."""

import dagster as dg

from assets.resources import resources_from_env
from assets.stages import STAGE_ASSETS
from jobs.build import build_job, nightly_build, source_changed

defs = dg.Definitions(
    assets=STAGE_ASSETS,
    jobs=[build_job],
    schedules=[nightly_build],
    sensors=[source_changed],
    resources=resources_from_env(),
)
