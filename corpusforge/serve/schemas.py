"""Request and response bodies of the query endpoint (pydantic, so the OpenAPI schema is exact).

The request models carry the server's input limits (query length, k, batch size, filters) in
their schema, so they are built per server from its `ServeSettings` by `make_request_models`,
together with `RequestLimits`: the pre-scan of a parsed body that refuses, before pydantic sees
it, what would make validation itself expensive.
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
    error_count: Optional[int] = Field(default=None, description="validation errors: how many there were in all "
                                       "(detail lists the first ones)")
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


class RequestLimits:
    """The shape and size limits of a search body, checked on the parsed JSON before pydantic
    sees it, so that validating a body never costs more than a valid one.

    Pydantic validates every member of a dict and tries every member of a union on every item
    before it applies a size limit, and builds an error per item and member: a 1 MB filter list
    used to take seconds and answer a 110 MB 422. The checks here stop at the first problem: the
    body is an object of the model's fields, each a single value except ``filters`` (an object of
    at most ``max_filters`` keys, each a value or a list of at most ``max_filter_values`` values)
    and ``queries`` (a list of at most ``max_batch`` strings); nothing nests deeper, and filter
    keys and string values are at most ``max_filter_value_chars`` long. What passes is at most a
    few hundred JSON values (long strings aside), whatever pydantic then finds wrong with them.
    A well-formed body costs a dict lookup and a type check per field.

    Args:
        s: the serve settings (``max_batch``, ``max_filters``, ``max_filter_values``,
            ``max_filter_value_chars``).
        model: the request model, whose field names are the accepted keys.
    """

    def __init__(self, s: ServeSettings, model: type[BaseModel]) -> None:
        self.names = frozenset(model.model_fields)
        self.keys, self.values, self.chars, self.batch = (s.max_filters, s.max_filter_values,
                                                          s.max_filter_value_chars, s.max_batch)

    def check(self, data: Any) -> Optional[dict[str, Any]]:
        """The body's first problem of shape or size, or None.

        Args:
            data: the parsed JSON body.

        Returns:
            None when the body is within the limits (it may still be invalid: pydantic decides),
            else one error ``{"loc", "msg", "type"}`` with ``loc`` inside the body.
        """
        if type(data) is not dict:
            return _problem((), "a search request is a JSON object", "model_attributes_type")
        for key, value in data.items():
            if key not in self.names:
                return _problem((key,), "Extra inputs are not permitted", "extra_forbidden")
            if type(value) in _NESTED:
                if key == "filters":
                    problem = self._check_filters(value)
                elif key == "queries":
                    problem = self._check_queries(value)
                else:
                    problem = _problem((key,), f"{key} is a single value, not a JSON {_kind(value)}", "too_deep")
                if problem:
                    return problem
        return None

    def _check_queries(self, queries: Any) -> Optional[dict[str, Any]]:
        if type(queries) is not list:
            return _problem(("queries",), "queries is a JSON array of strings", "list_type")
        if len(queries) > self.batch:
            return _problem(("queries",), f"a batch has at most {self.batch} items, got {len(queries)}", "too_long")
        for i, query in enumerate(queries):
            if type(query) in _NESTED:
                return _problem(("queries", i), f"a query is a string, not a JSON {_kind(query)}", "too_deep")
        return None

    def _check_filters(self, filters: Any) -> Optional[dict[str, Any]]:
        if type(filters) is not dict:
            return _problem(("filters",), "filters is a JSON object of key: value or key: [values]", "dict_type")
        if len(filters) > self.keys:
            return _problem(("filters",), f"at most {self.keys} filter keys, got {len(filters)}", "too_long")
        for key, value in filters.items():
            if len(key) > self.chars:
                return _problem(("filters",), f"filter keys are at most {self.chars} characters, got {len(key)}",
                                "string_too_long")
            if type(value) is list:
                if len(value) > self.values:
                    return _problem(("filters", key), f"a filter lists at most {self.values} wanted values, "
                                    f"got {len(value)}", "too_long")
                for i, item in enumerate(value):
                    problem = self._check_value(item, ("filters", key, i))
                    if problem:
                        return problem
            else:
                problem = self._check_value(value, ("filters", key))
                if problem:
                    return problem
        return None

    def _check_value(self, value: Any, loc: tuple) -> Optional[dict[str, Any]]:
        if type(value) is str and len(value) > self.chars:
            return _problem(loc, f"filter values are at most {self.chars} characters, got {len(value)}",
                            "string_too_long")
        if type(value) in _NESTED:
            return _problem(loc, "a filter value is a string, number or boolean, or a list of them; nothing nests "
                            f"deeper (got a JSON {_kind(value)})", "too_deep")
        return None


_NESTED = (list, dict)


def _kind(value: Any) -> str:
    return "array" if type(value) is list else "object"


def _problem(loc: tuple, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ("body", *loc), "msg": msg, "type": kind}


def make_request_models(s: ServeSettings) -> SimpleNamespace:
    """Build the request models with the server's limits in their schema.

    Args:
        s: the serve settings.

    Returns:
        A namespace with ``SearchRequest`` and ``SearchBatchRequest`` and their `RequestLimits`
        (``search_limits``, ``batch_limits``).
    """
    FilterString = Annotated[StrictStr, StringConstraints(max_length=s.max_filter_value_chars)]
    FilterScalar = Union[FilterString, StrictInt, StrictFloat, StrictBool]
    FilterValue = Union[FilterScalar, Annotated[list[FilterScalar], Field(max_length=s.max_filter_values)]]
    Query = Field(min_length=1, max_length=s.max_query_chars,
                  description=f"the query text (at most {s.max_query_chars} characters)")

    def _query_ok(q: str) -> str:
        if not normalise_query(q):
            raise ValueError("query is empty after whitespace normalisation")
        return q

    def _filters_ok(f: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        for key, value in (f or {}).items():
            if isinstance(value, list) and not value:
                raise ValueError(f"filter {key!r}: a list of wanted values must hold at least one value")
        return f

    class _Common(BaseModel):
        model_config = ConfigDict(extra="forbid")

        k: int = Field(default=10, ge=1, le=s.max_k, description=f"hits to return (1 to {s.max_k})")
        mode: Mode = "dense"
        level: Level = Field(default="doc", description="'doc': one hit per document (its best chunk); 'chunk'")
        fusion: Optional[Fusion] = Field(default=None, description="hybrid fusion (default: the snapshot's)")
        rerank: bool = Field(default=False, description="rerank with the snapshot's reranker (422 when it has none)")
        filters: Optional[dict[Annotated[str, StringConstraints(max_length=s.max_filter_value_chars)], FilterValue]] = (
            Field(default=None, max_length=s.max_filters,
                  description=f"metadata exact-match filters; a list value means any of (at most {s.max_filters} "
                  f"keys, {s.max_filter_values} values per key, {s.max_filter_value_chars} characters per key "
                  "or value)"))

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

    return SimpleNamespace(SearchRequest=SearchRequest, SearchBatchRequest=SearchBatchRequest,
                           search_limits=RequestLimits(s, SearchRequest),
                           batch_limits=RequestLimits(s, SearchBatchRequest))
