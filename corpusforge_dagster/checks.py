"""Asset checks: each dataset's expectation suite (corpusforge.data.contracts), snapshot verification and
the promotion gate.

The check specs are generated from `contracts.SUITES`: one blocking ``contract`` check per dataset
asset, its description listing the suite's expectations. The asset that writes the dataset runs
the check in the same step (the dataset is on local disk there), so a broken contract fails the
check and, being blocking, stops everything downstream, publishing included. The result's
metadata names every expectation with its outcome and up to five failing examples.

Every check is partitioned like its asset (one partition per spec), so each spec's result is kept
apart from the others' (``evaluation.partition`` is the spec).
"""

import warnings

import dagster as dg

from corpusforge.data.contracts import SUITES
from corpusforge.pipeline import Pipeline, StageResult
from corpusforge.snapshots.build import verify_published
from corpusforge.stages.checks import check_dataset, suite_of
from corpusforge_dagster.partitions import SPECS, asset_key


def _suite_description(dataset: str) -> str:
    suite = suite_of(dataset)
    notes = "\n".join(f"- {e['type']}: {e['meta']['notes']}" for e in SUITES[suite])
    return f"The `{suite}` expectation suite (schemas/expectations/{suite}.json):\n{notes}"


def _spec(name: str, asset: str, description: str, blocking: bool = False) -> dg.AssetCheckSpec:
    with warnings.catch_warnings():  # partitioned checks are a preview feature of Dagster 1.13
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(name, asset=asset_key(asset), blocking=blocking, description=description,
                                 partitions_def=SPECS)


def contract_spec(dataset: str) -> dg.AssetCheckSpec:
    """The blocking ``contract`` check of a dataset asset, described from its suite.

    Args:
        dataset: a key of `contracts.SUITES` (also the asset's name).

    Returns:
        The check spec (partitioned by spec).
    """
    return _spec("contract", dataset, _suite_description(dataset), blocking=True)


def contract_result(pipeline: Pipeline, dataset: str) -> dg.AssetCheckResult:
    """Validate a pipeline's dataset against its suite.

    Args:
        pipeline: the pipeline whose stage just wrote `dataset`.
        dataset: the dataset (and asset) name.

    Returns:
        The check's result, with each expectation's outcome as metadata.
    """
    report = check_dataset(pipeline.spec, pipeline.ws, dataset)
    outcomes = {f"{i}. {r.expectation}({r.kwargs.get('column') or r.kwargs.get('column_A') or ''})":
                ("passed" if r.success else r.describe()) for i, r in enumerate(report.results, 1)}
    return dg.AssetCheckResult(
        asset_key=asset_key(dataset), check_name="contract", passed=report.success,
        severity=dg.AssetCheckSeverity.ERROR, description=report.describe(),
        metadata={"rows": report.rows, "expectations": len(report.results), "failed": len(report.failures),
                  "skipped": "; ".join(report.skipped) or "none", "outcomes": outcomes})


SNAPSHOT_SPEC = _spec("verified", "snapshot",
                      "Every file of the published snapshot matches its manifest size and sha256 "
                      "(read back from the store).")
PROMOTION_SPEC = _spec("promotion", "snapshot",
                       "The promotion gate (publish.promote): passes when publish applied its rule, and "
                       "records the decision (alias moved or not, and why).")


def snapshot_result(pipeline: Pipeline) -> dg.AssetCheckResult:
    """Re-verify the published snapshot from its store (local folder or S3).

    Args:
        pipeline: a pipeline whose publish stage has run.

    Returns:
        The ``verified`` check's result.
    """
    version, problems = verify_published(pipeline.spec, pipeline.ws)
    return dg.AssetCheckResult(asset_key=asset_key("snapshot"), check_name="verified", passed=not problems,
                               severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"version": version, "problems": "; ".join(problems) or "none"})


def promotion_result(pipeline: Pipeline, result: StageResult) -> dg.AssetCheckResult:
    """The promotion gate's decision, as publish recorded it.

    Args:
        pipeline: the pipeline whose publish stage just ran (or was found unchanged).
        result: the publish stage's result (its summary has ``promoted`` and ``promotion``, the reason).

    Returns:
        The ``promotion`` check's result: passed when a decision was recorded; a WARN when none was.
    """
    s = result.summary
    decided = "promoted" in s and bool(s.get("promotion"))
    publish = pipeline.spec.publish
    metadata = {"rule": publish.promote, "alias": s.get("alias") or publish.alias,
                "promoted": bool(s.get("promoted")), "reason": s.get("promotion") or "none recorded",
                "version": s.get("version", ""), "candidate_alias": s.get("candidate_alias") or "none",
                "promote_metric": publish.promote_metric}
    if s.get("dev_score") is not None:
        metadata["dev_score"] = round(float(s["dev_score"]), 4)
    moved = "moved to" if s.get("promoted") else "NOT moved to"
    return dg.AssetCheckResult(
        asset_key=asset_key("snapshot"), check_name="promotion", passed=decided,
        severity=dg.AssetCheckSeverity.WARN, metadata=metadata,
        description=f"{metadata['alias']} {moved} {metadata['version']}: {metadata['reason']}")
