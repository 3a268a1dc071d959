"""Request and response bodies of the query endpoint (pydantic, so the OpenAPI schema is exact).

The request models carry the server's input limits (query length, k, batch size, filters) in
their schema, so they are built per server from its `ServeSettings` by `make_request_models`.
"""


from types import SimpleNamespace
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, StringConstraints,
                      field_validator)

from corpusforge.serve.cache import normalise_query
from corpusforge.serve.settings import ServeSettings

Mode = Literal["dense", "bm25", "hybrid"]
Level = Literal["doc", "chunk"]
Fusion = Literal["rrf", "weighted"]
Scalar = Union[StrictStr, StrictInt, StrictFloat, StrictBool]


class HitModel(BaseModel):
    """One result: a document's best chunk (level 'doc') or a chunk (level 'chunk')."""

    doc_id: str
    chunk_id: str
    score: float
    text: str
    metadata: dict[str, Any]
    rank: int = Field(description="1-based position in the result list")


class SearchResponse(BaseModel):
    """The answer to one query."""

    version: str = Field(description="the snapshot version that answered")
    mode: Mode
    k: int
    cached: bool = Field(description="served from the result cache")
    took_ms: float
    hits: list[HitModel]


class BatchItem(BaseModel):
    """The hits of one query of a batch."""

    cached: bool
    hits: list[HitModel]


class SearchBatchResponse(BaseModel):
    """The answers to a batch of queries, in request order."""

    version: str
    mode: Mode
    k: int
    took_ms: float
    results: list[BatchItem]


class ErrorBody(BaseModel):
    """An error: what went wrong, and the request id to quote when asking about it."""

    detail: Union[str, list[dict[str, Any]]]
    request_id: Optional[str] = None


class Refusal(BaseModel):
    """A version the server refused to serve."""

    version: str
    reason: str
    at: float


class SnapshotResponse(BaseModel):
    """What is being served."""

    index: str
    alias: str
    version: Optional[str]
    loaded_at: Optional[float]
    load_seconds: Optional[float]
    manifest: Optional[dict[str, Any]] = Field(description="manifest summary: model, index parameters, files")
    metrics: Optional[dict[str, Any]] = Field(description="evaluation metrics recorded when the snapshot was built")
    last_refusal: Optional[Refusal]


class ReloadResponse(BaseModel):
    """The outcome of an alias check."""

    status: Literal["unchanged", "swapped", "refused", "skipped", "error"]
    version: Optional[str]
    target: Optional[str] = None
    detail: Optional[str] = None


class StatusResponse(BaseModel):
    """Liveness / readiness."""

    status: str
    version: Optional[str] = None


def make_request_models(s: ServeSettings) -> SimpleNamespace:
    """Build the request models with the server's limits in their schema.

    Args:
        s: the serve settings.

    Returns:
        A namespace with ``SearchRequest`` and ``SearchBatchRequest``.
    """
    FilterValue = Union[Scalar, list[Scalar]]
    Query = Field(min_length=1, max_length=s.max_query_chars,
                  description=f"the query text (at most {s.max_query_chars} characters)")

    def _query_ok(q: str) -> str:
        if not normalise_query(q):
            raise ValueError("query is empty after whitespace normalisation")
        return q

    def _filters_ok(f: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        for key, value in (f or {}).items():
            if isinstance(value, list) and not 1 <= len(value) <= s.max_filters:
                raise ValueError(f"filter {key!r}: a list of wanted values must hold 1 to {s.max_filters} values")
        return f

    class _Common(BaseModel):
        model_config = ConfigDict(extra="forbid")

        k: int = Field(default=10, ge=1, le=s.max_k, description=f"hits to return (1 to {s.max_k})")
        mode: Mode = "dense"
        level: Level = Field(default="doc", description="'doc': one hit per document (its best chunk); 'chunk'")
        fusion: Optional[Fusion] = Field(default=None, description="hybrid fusion (default: the snapshot's)")
        rerank: bool = Field(default=False, description="rerank with the snapshot's reranker (422 when it has none)")
        filters: Optional[dict[str, FilterValue]] = Field(
            default=None, max_length=s.max_filters,
            description="metadata exact-match filters; a list value means any of")

        _check_filters = field_validator("filters")(staticmethod(_filters_ok))

    class SearchRequest(_Common):
        """One query."""

        query: str = Query
        _check_query = field_validator("query")(staticmethod(_query_ok))

    class SearchBatchRequest(_Common):
        """Several queries sharing the same parameters."""

        queries: list[Annotated[str, StringConstraints(min_length=1, max_length=s.max_query_chars)]] = Field(
            min_length=1, max_length=s.max_batch, description=f"1 to {s.max_batch} queries")

        @field_validator("queries")
        @classmethod
        def _queries_ok(cls, qs: list[str]) -> list[str]:
            for i, q in enumerate(qs):
                if not normalise_query(q):
                    raise ValueError(f"queries[{i}] is empty after whitespace normalisation")
            return qs

    return SimpleNamespace(SearchRequest=SearchRequest, SearchBatchRequest=SearchBatchRequest)
