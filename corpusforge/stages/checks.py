"""The data contracts of a stage's outputs, checked inside the stage so every runner checks them."""

from __future__ import annotations

from typing import Any

from corpusforge.data import datasets
from corpusforge.spec import PipelineSpec
from corpusforge.workspace import Workspace

def suite_of(dataset: str) -> str:
    """The expectation suite (`contracts.SUITES` key) of a dataset."""
    return "embeddings" if dataset == "embeddings_trained" else dataset


def dataset_path(ws: Workspace, dataset: str):
    """The directory of a contract-checked dataset."""
    if dataset in ("hard_negatives", "training_pairs"):
        return ws.train_dir / dataset
    return ws.dataset(dataset)


def row_count(ws: Workspace, dataset: str) -> int | None:
    """Rows of a contract-checked dataset (every stage's quarantine for ``quarantine``), or None if absent."""
    from corpusforge.data.contracts import QUARANTINE_STAGES

    paths = ([ws.quarantine(s) for s in QUARANTINE_STAGES] if dataset == "quarantine"
             else [dataset_path(ws, dataset)])
    present = [p for p in paths if datasets.is_complete(p)]
    return sum(datasets.count_rows(p) for p in present) if present else None


def check_dataset(spec: PipelineSpec, ws: Workspace, dataset: str):
    """Validate one of a pipeline's datasets against its expectation suite.

    Args:
        spec: the pipeline spec (parameters such as the chunking budget come from it).
        ws: the workspace.
        dataset: a dataset with a suite in `contracts.SUITES`; ``quarantine`` validates every
            stage's quarantine together.

    Returns:
        The `contracts.ContractReport`.
    """
    import pyarrow as pa

    from corpusforge.data.contracts import QUARANTINE_STAGES, validate

    if dataset == "quarantine":
        from corpusforge.data.schemas import QUARANTINE

        parts = [datasets.read_table(ws.quarantine(s)) for s in QUARANTINE_STAGES
                 if datasets.is_complete(ws.quarantine(s))]
        return validate("quarantine", pa.concat_tables(parts) if parts else QUARANTINE.empty_table())
    table = dataset_path(ws, dataset)  # validate streams it
    params: dict[str, Any] = {}
    if dataset == "chunks":
        params = {"max_tokens": spec.chunk.max_tokens, "documents": ws.dataset("documents_clean")}
    elif dataset in ("embeddings", "embeddings_trained"):
        params = {"normalized": spec.model.normalize}
    return validate(suite_of(dataset), table, **params)


def enforce(spec: PipelineSpec, ws: Workspace, names: tuple[str, ...] | list[str]) -> None:
    """Check each dataset's contract and raise on the first failure.

    Raises:
        contracts.ContractError: naming the dataset, the expectation and failing examples.
    """
    from corpusforge.data.contracts import ContractError

    for name in names:
        report = check_dataset(spec, ws, name)
        if not report.success:
            raise ContractError(report)
