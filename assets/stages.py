"""One Dagster asset per pipeline stage; each calls `Pipeline.run_stage` and reports metadata.

The stages keep their own state in the workspace (skip when unchanged, atomic commits), so the
assets carry no IO managers: each returns a `MaterializeResult` with the stage's counts,
quarantine, metrics or published version as metadata, and the results of its checks (the
dataset's expectation suite; the snapshot's verification), see `assets.checks`.
"""

import dagster as dg

from assets.checks import SNAPSHOT_SPEC, contract_result, contract_spec, snapshot_result
from assets.partitions import SPECS, spec_path
from assets.resources import DeviceResource, StorageResource, TrackingResource, pipeline_for
from corpusforge.orchestration_support import quarantine_counts, run_stage_tracked, stage_metadata
from corpusforge.pipeline import Pipeline

GROUP = "corpusforge"
_MULTI = {"partitions_def": SPECS, "group_name": GROUP}  # multi_asset takes kinds per AssetSpec
_COMMON = {**_MULTI, "kinds": {"python"}}


def run(context: dg.AssetExecutionContext, stage: str, storage: StorageResource,
        tracking: TrackingResource, device: DeviceResource) -> tuple[Pipeline, dict]:
    """Run one stage of the partition's spec and return the pipeline and the stage's metadata.

    Args:
        context: the asset's execution context (its partition key names the spec).
        stage: the pipeline stage.
        storage: the storage resource.
        tracking: the MLflow resource.
        device: the device resource.

    Returns:
        (pipeline, metadata).
    """
    pipeline = pipeline_for(spec_path(context.partition_key), storage, tracking, device)
    result = run_stage_tracked(pipeline, stage, "dagster", context.run_id)
    metadata = stage_metadata(result)
    context.log.info("%s %s: %s", pipeline.spec.name, stage, metadata)
    return pipeline, metadata


@dg.asset(description="Extracted documents (extract stage).", check_specs=[contract_spec("documents")],
          **_COMMON)
def documents(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
              device: DeviceResource) -> dg.MaterializeResult:
    pipeline, metadata = run(context, "extract", storage, tracking, device)
    return dg.MaterializeResult(metadata=metadata, check_results=[contract_result(pipeline, "documents")])


@dg.multi_asset(specs=[dg.AssetSpec("documents_clean", deps=[documents], description="Cleaned documents.", kinds={"python"}),
                       dg.AssetSpec("quarantine", deps=[documents],
                                    description="Records rejected by extract and clean, with reasons.",
                                    kinds={"python"})],
                check_specs=[contract_spec("documents_clean"), contract_spec("quarantine")], **_MULTI)
def clean(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
          device: DeviceResource):
    pipeline, metadata = run(context, "clean", storage, tracking, device)
    yield dg.MaterializeResult(asset_key="documents_clean", metadata=metadata)
    yield contract_result(pipeline, "documents_clean")
    counts = quarantine_counts(pipeline, ("extract", "clean"))
    yield dg.MaterializeResult(asset_key="quarantine", metadata={
        "rows": sum(counts.values()), **{f"quarantined/{s}": n for s, n in counts.items()},
        **{k: v for k, v in metadata.items() if k.startswith("quarantine/")}})
    yield contract_result(pipeline, "quarantine")


@dg.asset(deps=["documents_clean"], description="Token-bounded chunks (chunk stage).",
          check_specs=[contract_spec("chunks")], **_COMMON)
def chunks(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
           device: DeviceResource) -> dg.MaterializeResult:
    pipeline, metadata = run(context, "chunk", storage, tracking, device)
    return dg.MaterializeResult(metadata=metadata, check_results=[contract_result(pipeline, "chunks")])


@dg.asset(deps=[chunks], description="Chunk embeddings (embed stage, cached by model x text).",
          check_specs=[contract_spec("embeddings")], **_COMMON)
def embeddings(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
               device: DeviceResource) -> dg.MaterializeResult:
    pipeline, metadata = run(context, "embed", storage, tracking, device)
    return dg.MaterializeResult(metadata=metadata, check_results=[contract_result(pipeline, "embeddings")])


@dg.multi_asset(specs=[dg.AssetSpec("dense_index", deps=[embeddings], description="FAISS shards.", kinds={"faiss"}),
                       dg.AssetSpec("bm25_index", deps=[chunks], description="BM25 (bm25s) index.", kinds={"python"})],
                **_MULTI)
def index(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
          device: DeviceResource):
    # One stage builds both indexes (see Pipeline._index), so one step materialises both assets.
    _, metadata = run(context, "index", storage, tracking, device)
    common = {k: v for k, v in metadata.items() if not k.startswith(("dense/", "bm25/"))}
    for kind in ("dense", "bm25"):
        yield dg.MaterializeResult(asset_key=f"{kind}_index", metadata={
            **common, **{k: v for k, v in metadata.items() if k.startswith(f"{kind}/")}})


@dg.asset(deps=["dense_index", "bm25_index"], description="Offline evaluation of every retrieval mode.",
          **_COMMON)
def evaluation(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
               device: DeviceResource) -> dg.MaterializeResult:
    _, metadata = run(context, "evaluate", storage, tracking, device)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(deps=[evaluation], description="The published, verified snapshot and its alias.",
          check_specs=[SNAPSHOT_SPEC], **_COMMON)
def snapshot(context: dg.AssetExecutionContext, storage: StorageResource, tracking: TrackingResource,
             device: DeviceResource) -> dg.MaterializeResult:
    pipeline, metadata = run(context, "publish", storage, tracking, device)
    return dg.MaterializeResult(metadata=metadata, check_results=[snapshot_result(pipeline)])


STAGE_ASSETS = [documents, clean, chunks, embeddings, index, evaluation, snapshot]
