"""The build job over every corpusforge asset, its nightly schedule and the source-change sensor."""

import json
import warnings

import dagster as dg

from corpusforge.data.fs import changed_sources
from corpusforge_dagster.assets import GROUP
from corpusforge_dagster.partitions import SPECS, SPEC_PATHS

# Every stage and every check, one partition (= one spec) per run; a backfill picks several.
# The spec observation comes first in every run, so the versions it compares against are current.
with warnings.catch_warnings():  # include_sources is a beta parameter in Dagster 1.13
    warnings.simplefilter("ignore", dg.BetaWarning)
    _EVERYTHING = dg.AssetSelection.groups(GROUP, include_sources=True)
build_job = dg.define_asset_job("corpusforge_build", selection=_EVERYTHING,
                                partitions_def=SPECS,
                                description="Build one pipeline spec end to end: raw source to published snapshot.")


@dg.schedule(cron_schedule="0 2 * * *", job=build_job, execution_timezone="UTC", name="nightly_build",
             description="Every night at 02:00 UTC, one run per pipeline spec (unchanged stages are skipped).")
def nightly_build(context: dg.ScheduleEvaluationContext):
    """One run request per spec, keyed by spec and date so a tick never launches twice."""
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return [dg.RunRequest(run_key=f"{key}-{day}", partition_key=key) for key in SPECS.get_partition_keys()]


@dg.sensor(job=build_job, name="source_changed", minimum_interval_seconds=300,
           description="Starts a build of a spec when its source's fingerprint (corpusforge.data.fs.fingerprint) "
                       "changes. The cursor holds the last fingerprint per spec.")
def source_changed(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Compare each spec's source fingerprint with the cursor; request a run per changed source."""
    previous = json.loads(context.cursor) if context.cursor else {}
    changed, current, errors = changed_sources(SPEC_PATHS, previous)
    for name, error in errors.items():
        context.log.warning("source of spec %s unreadable: %s", name, error)
    requests = [dg.RunRequest(run_key=f"{name}-{current[name]}", partition_key=name,
                              tags={"corpusforge.source_fingerprint": current[name]}) for name in changed]
    skip = None if requests else f"no source changed ({len(current)} watched, {len(errors)} unreadable)"
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(current, sort_keys=True), skip_reason=skip)
