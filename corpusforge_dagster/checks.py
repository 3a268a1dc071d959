"""Asset checks: each dataset's expectation suite (corpusforge.contracts), and snapshot verification.

The check specs are generated from `contracts.SUITES`: one blocking ``contract`` check per dataset
asset, its description listing the suite's expectations. The asset that writes the dataset runs
the check in the same step (the dataset is on local disk there), so a broken contract fails the
check and, being blocking, stops everything downstream, publishing included. The result's
metadata names every expectation with its outcome and up to five failing examples.
"""

import dagster as dg

from corpusforge.contracts import SUITES
from corpusforge.pipeline import Pipeline
from corpusforge.snapshot_build import verify_published
from corpusforge.stages.checks import check_dataset, suite_of


def _suite_description(dataset: str) -> str:
    suite = suite_of(dataset)
    notes = "\n".join(f"- {e['type']}: {e['meta']['notes']}" for e in SUITES[suite])
    return f"The `{suite}` expectation suite (schemas/expectations/{suite}.json):\n{notes}"


def contract_spec(dataset: str) -> dg.AssetCheckSpec:
    """The blocking ``contract`` check of a dataset asset, described from its suite.

    Args:
        dataset: a key of `contracts.SUITES` (also the asset's key).

    Returns:
        The check spec.
    """
    return dg.AssetCheckSpec("contract", asset=dataset, blocking=True, description=_suite_description(dataset))


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
        asset_key=dataset, check_name="contract", passed=report.success, severity=dg.AssetCheckSeverity.ERROR,
        description=report.describe(),
        metadata={"rows": report.rows, "expectations": len(report.results), "failed": len(report.failures),
                  "skipped": "; ".join(report.skipped) or "none", "outcomes": outcomes})


SNAPSHOT_SPEC = dg.AssetCheckSpec(
    "verified", asset="snapshot",
    description="Every file of the published snapshot matches its manifest size and sha256 (read back from the store).")


def snapshot_result(pipeline: Pipeline) -> dg.AssetCheckResult:
    """Re-verify the published snapshot from its store (local folder or S3).

    Args:
        pipeline: a pipeline whose publish stage has run.

    Returns:
        The ``verified`` check's result.
    """
    version, problems = verify_published(pipeline.spec, pipeline.ws)
    return dg.AssetCheckResult(asset_key="snapshot", check_name="verified", passed=not problems,
                               severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"version": version, "problems": "; ".join(problems) or "none"})
