"""The Dagster assets, generated from the stage graph (`corpusforge.graph.GRAPH`).

One multi-asset per stage: its `Stage.assets` as asset specs, downstream of the assets of its
upstream stages, with a blocking ``contract`` check per dataset the stage guards (the stage has
already enforced it; the check shows the suite's outcomes in the UI) and the ``verified`` check on
the snapshot. Each calls `Pipeline.run_stage` for the partition's spec. No stage list, order or
decision lives here: a new stage in the graph is a new asset.

A stage that the partition's spec does not run (the training branch of a spec without
``train.enabled``) materialises nothing new: it reports ``enabled: false``.
"""

import dagster as dg

from assets.checks import SNAPSHOT_SPEC, contract_result, contract_spec, snapshot_result
from assets.partitions import SPECS, spec_path
from assets.resources import DeviceResource, StorageResource, TrackingResource, pipeline_for
from corpusforge.graph import GRAPH, Stage
from corpusforge.stages.checks import row_count

GROUP = "corpusforge"
_OWNER = {s.name: s for s in GRAPH}
_ASSET_STAGE = {asset: s for s in GRAPH for asset in s.assets}


def _deps(stage: Stage) -> list[str]:
    return [asset for dep in stage.deps for asset in _OWNER[dep].assets]


def _stage_asset(stage: Stage) -> dg.AssetsDefinition:
    checks = [contract_spec(name) for name in stage.contracts]
    if stage.name == "publish":
        checks.append(SNAPSHOT_SPEC)
    specs = [dg.AssetSpec(asset, deps=_deps(stage), description=stage.description, group_name=GROUP,
                          kinds={"faiss"} if "dense_index" in asset else {"python"},
                          metadata={"corpusforge/stage": stage.name}) for asset in stage.assets]

    @dg.multi_asset(name=stage.name, specs=specs, check_specs=checks, partitions_def=SPECS,
                    description=stage.description, op_tags={"corpusforge/stage": stage.name})
    def _run(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
             device: DeviceResource):
        pipeline = pipeline_for(spec_path(context.partition_key), storage, tracking, device)
        if not stage.enabled(pipeline.spec):
            for asset in stage.assets:
                yield dg.MaterializeResult(asset_key=asset, metadata={"enabled": False, "stage": stage.name})
            for check in checks:
                yield dg.AssetCheckResult(asset_key=check.asset_key, check_name=check.name, passed=True,
                                          metadata={"enabled": False})
            return
        result = pipeline.run_stage_tracked(stage.name, "dagster", context.run_id)
        metadata = result.flat()
        context.log.info("%s %s: %s", pipeline.spec.name, stage.name, metadata)
        for asset in stage.assets:
            rows = row_count(pipeline.ws, asset) if asset in stage.contracts else None
            yield dg.MaterializeResult(asset_key=asset, metadata={
                **metadata, **({"dagster/row_count": rows} if rows is not None else {})})
        for name in stage.contracts:
            yield contract_result(pipeline, name)
        if stage.name == "publish":
            yield snapshot_result(pipeline)

    return _run


STAGE_ASSETS = [_stage_asset(s) for s in GRAPH]
