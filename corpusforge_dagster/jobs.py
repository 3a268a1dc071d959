"""The build job over every corpusforge asset, its nightly schedule and the source-change sensor."""

import json

import dagster as dg

from assets.partitions import SPECS, SPEC_PATHS
from assets.stages import GROUP
from corpusforge.fs import changed_sources

# Every stage and every check, one partition (= one spec) per run; a backfill picks several.
build_job = dg.define_asset_job("corpusforge_build", selection=dg.AssetSelection.groups(GROUP),
                                partitions_def=SPECS,
                                description="Build one pipeline spec end to end: raw source to published snapshot.")


@dg.schedule(cron_schedule="0 2 * * *", job=build_job, execution_timezone="UTC", name="nightly_build",
             description="Every night at 02:00 UTC, one run per pipeline spec (unchanged stages are skipped).")
def nightly_build(context: dg.ScheduleEvaluationContext):
    """One run request per spec, keyed by spec and date so a tick never launches twice."""
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return [dg.RunRequest(run_key=f"{key}-{day}", partition_key=key) for key in SPECS.get_partition_keys()]


@dg.sensor(job=build_job, name="source_changed", minimum_interval_seconds=300,
           description="Starts a build of a spec when its source's fingerprint (corpusforge.fs.fingerprint) "
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
