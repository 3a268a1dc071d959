"""The Dagster assets, generated from the stage graph (`corpusforge.graph.GRAPH`).

One multi-asset per stage: its `Stage.assets` as asset specs (keys ``corpusforge/<name>``),
downstream of the assets of its upstream stages and of the observable ``corpusforge/spec``, with
a blocking ``contract`` check per dataset the stage guards (the stage has already enforced it; the
check shows the suite's outcomes in the UI) and the ``verified`` and ``promotion`` checks on the
snapshot. Each calls `Pipeline.run_stage_tracked` for the partition's spec. No stage list, order or
decision lives here: a new stage in the graph is a new asset.

Versions. Each asset's code version is its stage's `Stage.code_version`, and each materialisation
records the stage's fingerprint as its data version. ``corpusforge/spec`` is observed (at the start
of every build, or with *Observe sources*) with a data version per spec covering the spec file and
its source listing. So the UI shows an asset as stale when its code version, its spec or its source
changed since it was materialised, and as fresh otherwise. A stage whose fingerprint is unchanged
records no new materialisation (it did no work) -- unless Dagster does not see it as fresh (never
recorded in this instance, or its spec changed elsewhere), or a stage downstream of it in the same
run will record one (Dagster skips the steps downstream of an asset that was not materialised).

A stage that the partition's spec does not run (the training branch of a spec without
``train.enabled``) records a materialisation with ``enabled: false`` and a constant data version
only when a stage downstream of it will record one, for the same reason.
"""


import warnings
from collections.abc import Callable, Iterator

import dagster as dg

from corpusforge.graph import GRAPH, Stage
from corpusforge.data.hashing import config_fingerprint
from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec
from corpusforge_dagster.checks import (PROMOTION_SPEC, SNAPSHOT_SPEC, contract_result, contract_spec,
                                        promotion_result, snapshot_result)
from corpusforge_dagster.metadata import dataset_metadata, mlflow_metadata, rounded, snapshot_metadata
from corpusforge_dagster.partitions import SPEC_PATHS, SPECS, asset_key, spec_path
from dagster_ray import RayResource

from corpusforge_dagster.resources import (DeviceResource, StorageResource, TrackingResource, connect_ray,
                                           pipeline_for, workspace_pool)

GROUP = "corpusforge"
SPEC_KEY = asset_key("spec")
DISABLED = dg.DataVersion("disabled")
_OWNER = {s.name: s for s in GRAPH}
_DOWNSTREAM = {s.name: [d.name for d in GRAPH if s.name in d.deps] for s in GRAPH}
_KINDS = {"dense_index": {"faiss"}, "dense_index_trained": {"faiss"}, "bm25_index": {"bm25s"},
          "evaluation": {"mlflow"}, "retriever_model": {"pytorch"}, "reranker_model": {"pytorch"}}


def spec_version(path) -> str:
    """The data version of ``corpusforge/spec`` for one spec: its configuration and its source listing.

    Args:
        path: the spec file.

    Returns:
        A fingerprint that changes when the spec's content or its source's files change.
    """
    from corpusforge.data import fs

    spec = load_spec(path)
    return config_fingerprint(spec.model_dump(mode="json"),
                              fs.fingerprint(spec.source_uri, endpoint_url=spec.source.s3_endpoint_url))


def _observe_specs(context) -> dg.DataVersionsByPartition:
    """Observe the specs of the run's partitions (all of them outside a partitioned run)."""
    keys = [context.partition_key] if context.has_partition_key else list(SPEC_PATHS)
    versions = {}
    for key in keys:
        try:
            versions[key] = dg.DataVersion(spec_version(spec_path(key)))
        except Exception as exc:  # noqa: BLE001 - one unreadable spec or source must not hide the others
            context.log.warning("spec %s: cannot observe: %s: %s", key, type(exc).__name__, exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.DataVersionsByPartition(versions)


with warnings.catch_warnings():  # observable source assets are beta in Dagster 1.13
    warnings.simplefilter("ignore", dg.BetaWarning)
    spec = dg.observable_source_asset(
        key=SPEC_KEY, partitions_def=SPECS, group_name=GROUP,
        description="A pipeline spec (pipelines/<partition>.yaml) and its source corpus. Its data version "
                    "changes when the spec or a source file changes, which marks every asset of that spec stale.",
    )(_observe_specs)


def _deps(stage: Stage) -> list[dg.AssetKey]:
    return [SPEC_KEY] + [asset_key(a) for dep in stage.deps for a in _OWNER[dep].assets]


def _downstream(stage: str) -> set[str]:
    """Every stage that depends on `stage`, directly or not."""
    out, todo = set(), list(_DOWNSTREAM[stage])
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += _DOWNSTREAM[name]
    return out


def _freshness(context: dg.AssetExecutionContext) -> Callable[[dg.AssetKey], bool]:
    """key -> whether Dagster sees the run's partition of that asset as fresh (materialised, same code
    version, inputs' data versions unchanged). Uses Dagster's own staleness resolver; should its
    internals move, every asset counts as not fresh (the stage records, as before)."""
    try:
        from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
        from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
        from dagster._time import get_current_datetime

        graph = context.job_def.asset_layer.asset_graph
        view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                              instance=context.instance, asset_graph=graph)
        resolver = CachingStaleStatusResolver(context.instance, graph, view)
    except Exception as exc:  # noqa: BLE001
        context.log.warning("staleness unavailable (%s: %s): recording every stage", type(exc).__name__, exc)
        return lambda key: False

    def fresh(key: dg.AssetKey) -> bool:
        try:
            return resolver.get_status(key, context.partition_key) == StaleStatus.FRESH
        except Exception:  # noqa: BLE001 - e.g. a key outside this job's graph
            return False

    return fresh


def _must_record(context: dg.AssetExecutionContext, pipeline: Pipeline, stage: Stage) -> bool:
    """Whether a stage that did no work records a materialisation anyway (see the module docstring)."""
    fresh = _freshness(context)
    selection = context.run.asset_selection or None  # empty: the job's every asset

    def acts(name: str) -> bool:
        st = _OWNER[name]
        keys = [asset_key(a) for a in st.assets]
        if selection is not None and not any(k in selection for k in keys):
            return False  # not part of this run
        return st.enabled(pipeline.spec) and (not pipeline.unchanged(name) or not all(fresh(k) for k in keys))

    if stage.enabled(pipeline.spec) and not all(fresh(asset_key(a)) for a in stage.assets):
        return True
    return any(acts(name) for name in _downstream(stage.name))


def _stage_asset(stage: Stage, pool: str) -> dg.AssetsDefinition:
    checks = [contract_spec(name) for name in stage.contracts]
    if stage.name == "publish":
        checks += [SNAPSHOT_SPEC, PROMOTION_SPEC]
    specs = [dg.AssetSpec(asset_key(asset), deps=_deps(stage), description=stage.description, group_name=GROUP,
                          kinds=_KINDS.get(asset, {"parquet"} if asset in stage.contracts else {"python"}),
                          code_version=str(stage.code_version), skippable=True,
                          metadata={"corpusforge/stage": stage.name}) for asset in stage.assets]

    # can_subset: every output is optional (an unchanged stage may record nothing), and the UI can
    # materialise one asset of a stage (the stage runs whole; only the selected assets are recorded).
    @dg.multi_asset(name=stage.name, specs=specs, check_specs=checks, partitions_def=SPECS, pool=pool,
                    can_subset=True, description=stage.description, op_tags={"corpusforge/stage": stage.name})
    def _run(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
             device: DeviceResource, ray_cluster: RayResource) -> Iterator:
        pipeline = pipeline_for(spec_path(context.partition_key), storage, tracking, device)
        selected = [a for a in stage.assets if asset_key(a) in context.selected_asset_keys]
        checked = context.selected_asset_check_keys
        if not stage.enabled(pipeline.spec):
            if _must_record(context, pipeline, stage):
                for asset in selected:
                    yield dg.MaterializeResult(asset_key=asset_key(asset), data_version=DISABLED,
                                               metadata={"enabled": False, "stage": stage.name})
                for check in checks:  # nothing to check; a result keeps the blocking checks' gates explicit
                    if check.key in checked:
                        yield dg.AssetCheckResult(asset_key=check.asset_key, check_name=check.name, passed=True,
                                                  metadata={"enabled": False})
            return
        if connect_ray(context, ray_cluster, pipeline):
            context.log.info("%s %s: on the Ray of resource ray_cluster", pipeline.spec.name, stage.name)
        result = pipeline.run_stage_tracked(stage.name, "dagster", context.run_id)
        if result.skipped and not _must_record(context, pipeline, stage):
            context.log.info("%s %s: unchanged and up to date in Dagster: no new materialization",
                             pipeline.spec.name, stage.name)
            return
        metadata = {**rounded(result.flat()), **mlflow_metadata(result)}
        if stage.name == "publish":
            metadata.update(snapshot_metadata(result))
        for asset in selected:
            extra = dataset_metadata(pipeline, asset) if asset in stage.contracts else {}
            yield dg.MaterializeResult(asset_key=asset_key(asset), metadata={**metadata, **extra},
                                       data_version=dg.DataVersion(result.fingerprint))
        for name in stage.contracts:
            if contract_spec(name).key in checked:
                yield contract_result(pipeline, name)
        if SNAPSHOT_SPEC.key in checked:
            yield snapshot_result(pipeline)
        if PROMOTION_SPEC.key in checked:
            yield promotion_result(pipeline, result)

    return _run


STAGE_ASSETS = [_stage_asset(s, workspace_pool()) for s in GRAPH]
ASSETS = [spec, *STAGE_ASSETS]
