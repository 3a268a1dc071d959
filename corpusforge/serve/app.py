"""The FastAPI app of the query endpoint: a thin HTTP shell over `Searcher` and `SnapshotStore`.

Request path of ``POST /search``: authenticate (API key -> caller with ACL tags) and charge the
rate limit from the headers alone, then read the body (size-capped), parse it, pre-scan its shape
and sizes (`models.RequestLimits`, so that validating it costs no more than a valid body) and
validate it (pydantic limits), look up the LRU cache, search through the micro-batcher
(concurrent queries with the same parameters share one `Searcher.search_batch` call on a search
thread), cache and return. The served snapshot is read once per request from
`SnapshotHolder.current`, so a hot swap never mixes two versions in one answer. The two search
routes are FastAPI routes whose well-formed requests skip FastAPI's per-request dependency
machinery (`_hot_route`); everything else takes FastAPI's own path.

Every response carries an ``X-Request-ID``; an unexpected error answers a generic 500 with that id
and logs the details (stack trace included) server-side only.
"""


import asyncio
import functools
import gc
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Optional

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from corpusforge.serve.auth import ANONYMOUS, Caller, KeyStore, RateLimiter, retry_after_header
from corpusforge.serve.batcher import BatcherClosed, MicroBatcher
from corpusforge.serve.cache import LRUCache, cache_key, normalise_query
from corpusforge.serve.holder import Refusal, SnapshotHolder
from corpusforge.serve.loader import LoadedSnapshot
from corpusforge.serve.metrics import ServeMetrics
from corpusforge.serve.schemas import (ErrorBody, ReloadResponse, SearchBatchResponse, SearchResponse,
                                      SnapshotResponse, StatusResponse, make_request_models)
from corpusforge.serve.settings import ServeSettings, auto_search_threads
from corpusforge.retrieval.rerank import RerankingSearcher

log = logging.getLogger("corpusforge.serve")

MAX_BODY_BYTES = ServeSettings.model_fields["max_body_bytes"].default
ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 413, 422, 429, 503)}
# A 422 lists at most this many errors, and stops earlier once their JSON passes the byte budget
# (it used to list all of them: a 1 MB body got a 110 MB answer); error_count says how many in all.
MAX_ERRORS_SHOWN = 20
MAX_ERROR_BYTES = 4096


class NothingToServe(RuntimeError):
    """`run_server` without ``wait_for_snapshot``: the first alias check or load left nothing to serve."""


class _BodyTooLarge(Exception):
    pass


class _FastJSON(JSONResponse):
    """A JSON response rendered by orjson: hit lists carry ~10 KB of chunk text, and the stdlib
    encoder's time there is held under the GIL that the search threads need."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _request_ids():
    """Unique request ids without a syscall per request: a random per-process prefix + a counter."""
    prefix = os.urandom(4).hex()
    return (f"{prefix}{n:08x}" for n in itertools.count())


class GuardMiddleware:
    """Outermost ASGI layer: request ids, request metrics, body size limit, and the catch-all
    that turns any unhandled exception into a generic 500 (details logged, never sent).

    Args:
        app: the wrapped ASGI app.
        metrics: the metrics to count requests in.
        known_paths: the route paths; any other path is counted as 'other' (bounded labels).
        max_body: the largest accepted request body in bytes.
    """

    def __init__(self, app, metrics: ServeMetrics, known_paths: set[str], max_body: int = MAX_BODY_BYTES) -> None:
        self.app, self.metrics, self.known, self.max_body = app, metrics, known_paths, max_body
        self._ids = _request_ids()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next(self._ids)
        scope.setdefault("state", {})["request_id"] = rid
        endpoint = scope["path"] if scope["path"] in self.known else "other"
        state = {"status": 500, "started": False, "received": 0}
        t0 = time.perf_counter()

        async def send_tagged(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    raise _BodyTooLarge
            return message

        try:
            length = Headers(scope=scope).get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise _BodyTooLarge
            await self.app(scope, receive_limited, send_tagged)
        except _BodyTooLarge:
            if not state["started"]:
                await _send_json(send_tagged, 413, {"detail": f"request body larger than {self.max_body} bytes",
                                                    "request_id": rid})
        except Exception:
            log.exception("unhandled error in request %s (%s %s)", rid, scope.get("method"), scope["path"])
            if not state["started"]:
                await _send_json(send_tagged, 500, {"detail": "internal server error", "request_id": rid})
        finally:
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(state["status"])).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - t0)


def _init_search_thread(faiss_threads: int) -> None:
    """Limit FAISS's OpenMP threads in this search thread. OpenMP's thread count is per calling
    thread: set on the event loop it does not reach the search threads, and a batched search
    would start a team of one OpenMP thread per CPU next to every search thread (measured: ~10%
    of the searches' CPU spent in those extra threads)."""
    import faiss

    faiss.omp_set_num_threads(faiss_threads)


def _search_as_dicts(searcher, params: dict[str, Any], queries: list[str]) -> list[list[dict[str, Any]]]:
    """One batched search, its hits in JSON-ready form (runs on a search thread)."""
    return [[h.as_dict() for h in hits] for hits in searcher.search_batch(queries, **params)]


def _full_model_queries(snap: LoadedSnapshot) -> bool:
    """Queries go through the full passage model (no distilled query tower)."""
    info = snap.query_encoder or {}
    return bool(info) and not info.get("query_tower")


def _clip(value: Any, limit: int = 64) -> Any:
    return value[:limit] + "…" if isinstance(value, str) and len(value) > limit else value


def _shown_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first validation errors, clipped: loc, msg and type only (pydantic's 'input' would
    echo the body, 'url' is noise), at most `MAX_ERRORS_SHOWN` and about `MAX_ERROR_BYTES`."""
    shown, size = [], 0
    for e in errors[:MAX_ERRORS_SHOWN]:
        item = {"loc": [_clip(part) for part in e.get("loc", ())[:8]], "msg": _clip(str(e.get("msg", "")), 240),
                "type": _clip(str(e.get("type", "")))}
        size += len(orjson.dumps(item))
        if shown and size > MAX_ERROR_BYTES:
            break
        shown.append(item)
    return shown


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    payload = JSONResponse(body).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _rid(request: Request) -> Optional[str]:
    return getattr(request.state, "request_id", None)


class Engine:
    """The serving state shared by the routes: snapshot holder, cache, batcher, limits, metrics.

    Args:
        settings: the serve settings.
        keys: the API key store, or None for anonymous serving.
    """

    def __init__(self, settings: ServeSettings, keys: KeyStore | None) -> None:
        self.settings, self.keys = settings, keys
        self.metrics = ServeMetrics()
        self.cache = LRUCache(settings.cache_size)
        self.limiter = RateLimiter()
        self.batcher: MicroBatcher | None = None
        self.holder = SnapshotHolder(settings, on_swap=self._swapped, on_refusal=self._refused)
        # Called with the reason when the first alias check or load leaves nothing to serve;
        # None keeps polling (`run_server` sets it unless told to wait for a snapshot).
        self.on_nothing_to_serve: Callable[[str], None] | None = None
        self._threads_lock = threading.Lock()

    def _swapped(self, snap: LoadedSnapshot) -> None:
        self.cache.clear()  # entries carry the version anyway; this just frees the memory
        self.size_search_threads(self.settings.search_threads or auto_search_threads(_full_model_queries(snap)))
        self.metrics.snapshot.info({"index": snap.index, "version": snap.version, "alias": self.settings.alias,
                                    "query_runtime": (snap.query_encoder or {}).get("runtime", "none")})
        self.metrics.snapshot_loaded.set(snap.loaded_at)
        self.metrics.swaps.inc()
        if self.settings.freeze_gc:
            # A loaded server tracks ~450k long-lived objects (modules, models, the snapshot). A
            # full cyclic collection walks them all and stalls every request for ~200 ms, which
            # under load set the p99 (204 ms at concurrency 16). Frozen objects are skipped by the
            # collector and still freed by reference counting when a swap drops them.
            gc.freeze()
            self.metrics.gc_frozen.set(gc.get_freeze_count())

    def size_search_threads(self, threads: int) -> None:
        """Run searches on `threads` threads from now on (the first call starts the batcher).
        Surplus threads exit after their current batch; queued requests go to those that remain."""
        with self._threads_lock:
            if self.batcher is None:
                self.batcher = MicroBatcher(threads, self.settings.micro_batch, self.settings.micro_batch_wait_ms,
                                            on_batch=self.metrics.search_batch.observe,
                                            thread_init=functools.partial(_init_search_thread,
                                                                          self.settings.faiss_threads))
            elif threads == self.batcher.threads:
                return
            else:
                self.batcher.resize(threads)
        self.metrics.search_threads.set(threads)
        log.info("search threads: %d%s", threads, "" if self.settings.search_threads else " (auto)")

    def close_search_threads(self) -> None:
        """Stop the search threads after their current batch (queued searches fail)."""
        with self._threads_lock:
            if self.batcher is not None:
                self.batcher.close()
                self.batcher = None

    def _refused(self, refusal: Refusal) -> None:
        self.metrics.refusals.inc()

    # ------------------------------------------------------------------ checks
    def snapshot(self) -> LoadedSnapshot:
        """The served snapshot (503 before the first one is loaded)."""
        snap = self.holder.current
        if snap is None:
            raise HTTPException(503, "no snapshot loaded yet", headers={"Retry-After": "5"})
        return snap

    def authenticate(self, bearer: Optional[str], api_key: Optional[str]) -> Caller:
        """The caller behind a request's credentials (anonymous when serving without keys).

        Args:
            bearer: the token of an ``Authorization: Bearer`` header, if any.
            api_key: the ``X-API-Key`` header, if any.

        Returns:
            The caller.

        Raises:
            HTTPException: 401 for a missing or unknown key.
        """
        if self.keys is None:
            return ANONYMOUS
        token = bearer or api_key
        if not token:
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        caller = self.keys.lookup(token)
        if caller is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return caller

    def admit(self, request: Request) -> Caller:
        """Authenticate a search request and charge it one unit of rate limit, from its headers
        alone: a refused caller's body is never read.

        Args:
            request: the request.

        Returns:
            The caller.

        Raises:
            HTTPException: 401 for a missing or unknown key, 429 past the caller's rate limit.
        """
        caller = self.authenticate(_bearer_token(request), request.headers.get("x-api-key"))
        self.rate_limit(caller)
        return caller

    def rate_limit(self, caller: Caller, cost: int = 1, paid: int = 0) -> None:
        """Charge the caller's rate limit (429 with Retry-After when exhausted).

        Args:
            caller: the caller.
            cost: the request's whole cost (one per query).
            paid: what the request was charged already (`admit`); refunded when refused.
        """
        wait = self.limiter.acquire(caller, cost, paid)
        if wait:
            raise HTTPException(429, f"rate limit of {caller.rate_limit_per_minute} queries per minute exceeded "
                                f"for key {caller.name!r}", headers={"Retry-After": retry_after_header(wait)})

    @staticmethod
    def check_request(snap: LoadedSnapshot, mode: str, rerank: bool) -> None:
        """422 for a mode or rerank the snapshot cannot do."""
        if mode not in snap.modes:
            raise HTTPException(422, f"mode {mode!r} is not available in snapshot {snap.version} "
                                f"(available: {', '.join(snap.modes)})")
        if rerank and snap.reranker is None:
            raise HTTPException(422, f"rerank=true is not possible: snapshot {snap.version} has no reranker; "
                                "send rerank=false")

    # ------------------------------------------------------------------ search
    async def search_many(self, snap: LoadedSnapshot, queries: list[str], req, caller: Caller
                          ) -> list[tuple[list[dict[str, Any]], bool]]:
        """Answer queries sharing one request's parameters: cache first, the rest in one search.

        Args:
            snap: the snapshot to search (fixed for the whole request).
            queries: the raw queries.
            req: the request model (k, mode, level, fusion, rerank, filters).
            caller: the caller (its ACL tags restrict the hits).

        Returns:
            ``(hits, cached)`` per query, in order.
        """
        norm = [normalise_query(q) for q in queries]
        filters = req.filters or None
        keys = [cache_key(snap.version, q, f"{req.mode}/{req.level}/{req.fusion}", req.k, filters, caller.acl,
                          req.rerank) for q in norm]
        out: list[Any] = [self.cache.get(key) for key in keys]
        miss = [i for i, v in enumerate(out) if v is None]
        self.metrics.cache_hits.inc(len(queries) - len(miss))
        if miss:
            self.metrics.cache_misses.inc(len(miss))
            searcher = RerankingSearcher(snap.searcher, snap.reranker) if req.rerank else snap.searcher
            params = dict(k=req.k, mode=req.mode, filters=filters, acl=caller.acl, level=req.level, fusion=req.fusion)
            # Requests with equal keys share one search call (see `MicroBatcher`): the cache key
            # minus the query is everything that shapes an answer; the searcher pins the snapshot.
            key = (snap.version, id(snap.searcher), *keys[miss[0]][2:])
            fn = functools.partial(_search_as_dicts, searcher, params)
            batcher = self.batcher
            try:
                if batcher is None:
                    raise BatcherClosed
                if len(miss) == 1:  # the common case; gather would wrap the one query in a task
                    hits = [await batcher.submit(key, fn, norm[miss[0]])]
                else:
                    hits = await asyncio.gather(*(batcher.submit(key, fn, norm[i]) for i in miss))
            except BatcherClosed:
                raise HTTPException(503, "the server is shutting down", headers={"Retry-After": "5"}) from None
            for i, h in zip(miss, hits):
                out[i] = h
                self.cache.put(keys[i], h)
        return [(v, i not in miss) for i, v in enumerate(out)]

    # ------------------------------------------------------------------ lifecycle
    async def poll(self) -> None:
        """Load the first snapshot, then follow the alias every ``poll_seconds`` (or, when that
        left nothing to serve and `on_nothing_to_serve` is set, call it and stop)."""
        await asyncio.to_thread(self.holder.refresh)
        if self.holder.current is None and self.on_nothing_to_serve is not None:
            self.on_nothing_to_serve(self.holder.last_failure or "no snapshot loaded")
            return
        while self.settings.poll_seconds > 0:
            await asyncio.sleep(self.settings.poll_seconds)
            # Until something is served, a refused version is retried: there is nothing else to serve.
            await asyncio.to_thread(self.holder.refresh, self.holder.current is None)


def _bearer_token(request: Request) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, read as `HTTPBearer` reads it."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    return token if scheme.lower() == "bearer" and token else None


def _hot_route(admit: Callable[[Request], Caller],
               check: Callable[[Any], Optional[dict[str, Any]]] | None = None) -> type[APIRoute]:
    """An `APIRoute` class for the search routes, whose endpoints take ``(body model, caller)``
    and return a `Response`.

    Every request first passes ``admit`` (authentication and rate limit, from the headers alone,
    so a refused caller's body is never read), then its body is read (`GuardMiddleware` caps its
    size), parsed and given to ``check`` (`models.RequestLimits.check`: a problem found there is
    the 422, before pydantic sees the body).

    FastAPI documents the route from the endpoint's signature as usual. A well-formed request
    (``Content-Type: application/json``, a body that parses and validates) then skips FastAPI's
    per-request machinery -- the dependency solver, its security sub-dependencies, body
    introspection -- which cost ~60 us of the event loop's time per request (91 against 30 us in
    an in-process ASGI benchmark of the bare route; the event loop spends ~0.5 ms per search,
    and its time holds the GIL the search threads need). Every other request goes on to FastAPI's
    own handler, so errors keep FastAPI's exact shape; the body is validated by the same pydantic
    model either way, and ``check`` has seen what FastAPI's handler will parse. A body that is not
    standard JSON (orjson's reading: UTF-8, no NaN or Infinity) is a 422 ``json_invalid`` here,
    where FastAPI's handler would have tried Python's more lenient (and, on hostile bodies, much
    slower) json module.

    Args:
        admit: the caller of a request (raises HTTPException 401 like the dependency does, 429).
        check: the body's first limit violation (``{"loc", "msg", "type"}``) or None.

    Returns:
        The route class, for ``route_class_override``.
    """

    class HotRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            full = super().get_route_handler()
            endpoint, body_name, model = self.endpoint, self.body_field.name, self.body_field.field_info.annotation

            async def handler(request: Request) -> Response:
                caller = admit(request)
                raw = await request.body()  # cached on the request for FastAPI's handler
                if not raw:
                    return await full(request)  # FastAPI's answer: the body is missing
                try:
                    data, hot = orjson.loads(raw), request.headers.get("content-type") == "application/json"
                except orjson.JSONDecodeError as exc:
                    # Standard JSON only (RFC 8259: UTF-8, no NaN): FastAPI's own handler would try
                    # Python's json, which took 0.2-0.3 s here to build a 1 MB body of empty lists before
                    # anything could look at it. The error has FastAPI's shape for a bad body.
                    raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos),
                                                   "msg": "JSON decode error", "input": {},
                                                   "ctx": {"error": exc.msg}}]) from None
                if check is not None:
                    problem = check(data)
                    if problem is not None:
                        raise RequestValidationError([problem])
                if hot:
                    try:
                        body = model.model_validate(data)
                    except ValidationError:
                        return await full(request)  # FastAPI shapes the 422
                    return await endpoint(**{body_name: body, "caller": caller})
                return await full(request)

            return handler

    return HotRoute


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the query endpoint app.

    The first snapshot loads in the background: ``/healthz`` answers at once, ``/readyz`` and the
    search routes answer 503 until the snapshot is verified and open.

    Args:
        settings: the serve settings.

    Returns:
        The FastAPI app (run it with uvicorn; see `run_server`).

    Raises:
        KeyFileError: the keys file is malformed.
    """
    keys = KeyStore.from_file(settings.keys_file) if settings.keys_file else None
    engine = Engine(settings, keys)
    models = make_request_models(settings)
    SearchRequest, SearchBatchRequest = models.SearchRequest, models.SearchBatchRequest

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine.batcher is None:  # sized again when a snapshot is swapped in
            engine.size_search_threads(settings.search_threads or auto_search_threads(True))
        poller = asyncio.create_task(engine.poll())
        try:
            yield
        finally:
            poller.cancel()
            engine.close_search_threads()

    # FastAPI's native OpenTelemetry looks up the global providers on every request (~13 us, a
    # few percent of a search's event-loop time) even when none is configured; it is opt-in here.
    otel = settings.opentelemetry
    app = FastAPI(title="corpusforge query endpoint", version="1", lifespan=lifespan,
                  description="Search over a published, verified corpusforge snapshot.",
                  telemetry={"tracing": otel, "metrics": otel, "logs": otel})
    app.state.engine = engine

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
    api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")

    async def caller_of(cred: Optional[HTTPAuthorizationCredentials] = Security(bearer),
                        key: Optional[str] = Security(api_key)) -> Caller:
        return engine.authenticate(cred.credentials if cred is not None else None, key)

    async def admin_of(caller: Caller = Depends(caller_of)) -> Caller:
        if engine.keys is None:
            raise HTTPException(403, "admin endpoints need an admin API key; this server runs without a keys file")
        if not caller.admin:
            raise HTTPException(403, f"key {caller.name!r} is not an admin key")
        return caller

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail, "request_id": _rid(request)}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return JSONResponse({"detail": _shown_errors(errors), "error_count": len(errors),
                             "request_id": _rid(request)}, 422)

    async def search(req: SearchRequest, caller: Caller = Depends(caller_of)):
        """Search one query over the served snapshot."""
        t0 = time.perf_counter()
        snap = engine.snapshot()
        engine.check_request(snap, req.mode, req.rerank)
        [(hits, cached)] = await engine.search_many(snap, [req.query], req, caller)
        took = time.perf_counter() - t0
        engine.metrics.search_latency.labels(req.mode).observe(took)
        return _FastJSON({"version": snap.version, "mode": req.mode, "k": req.k, "cached": cached,
                             "took_ms": round(took * 1000, 3), "hits": hits})

    async def search_batch(req: SearchBatchRequest, caller: Caller = Depends(caller_of)):
        """Search several queries with shared parameters (each costs one unit of rate limit)."""
        t0 = time.perf_counter()
        snap = engine.snapshot()
        engine.check_request(snap, req.mode, req.rerank)
        engine.rate_limit(caller, len(req.queries), paid=1)  # `admit` charged the first query
        results = await engine.search_many(snap, req.queries, req, caller)
        took = time.perf_counter() - t0
        per_query = took / len(req.queries)
        for _ in req.queries:
            engine.metrics.search_latency.labels(req.mode).observe(per_query)
        return _FastJSON({"version": snap.version, "mode": req.mode, "k": req.k, "took_ms": round(took * 1000, 3),
                             "results": [{"cached": c, "hits": h} for h, c in results]})

    app.router.add_api_route("/search", search, methods=["POST"], response_model=SearchResponse, responses=ERRORS,
                             tags=["search"], route_class_override=_hot_route(engine.admit, models.search_limits.check))
    app.router.add_api_route("/search/batch", search_batch, methods=["POST"], response_model=SearchBatchResponse,
                             responses=ERRORS, tags=["search"],
                             route_class_override=_hot_route(engine.admit, models.batch_limits.check))

    @app.get("/healthz", response_model=StatusResponse, tags=["ops"])
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok", "version": engine.holder.current.version if engine.holder.current else None}

    @app.get("/readyz", response_model=StatusResponse, responses={503: {"model": StatusResponse}}, tags=["ops"])
    async def readyz():
        """Readiness: 200 once a snapshot is fully loaded, else 503."""
        snap = engine.holder.current
        if snap is None:
            return JSONResponse({"status": "loading", "version": None}, 503)
        return {"status": "ready", "version": snap.version}

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus metrics"}})
    async def metrics():
        """Prometheus metrics."""
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/snapshot", response_model=SnapshotResponse, responses=ERRORS, tags=["ops"])
    async def snapshot(caller: Caller = Depends(caller_of)):
        """The served version, its manifest summary, its build-time metrics and the last refusal."""
        snap, refusal = engine.holder.current, engine.holder.last_refusal
        return {"index": settings.index, "alias": settings.alias,
                "version": snap.version if snap else None,
                "loaded_at": snap.loaded_at if snap else None,
                "load_seconds": snap.load_seconds if snap else None,
                "manifest": snap.summary() if snap else None,
                "metrics": snap.manifest.get("metrics") if snap else None,
                "last_refusal": refusal.to_dict() if refusal else None}

    @app.post("/admin/reload", response_model=ReloadResponse, responses={**ERRORS, 409: {"model": ReloadResponse}},
              tags=["admin"])
    async def reload(caller: Caller = Depends(admin_of)):
        """Check the alias now and swap to its version if it moved (409 when that version is refused)."""
        result = await asyncio.to_thread(engine.holder.refresh, True)
        body = {"status": result.status, "version": result.version, "target": result.target, "detail": result.detail}
        status = {"refused": 409, "error": 503}.get(result.status, 200)
        return JSONResponse(body, status)

    known = {route.path for route in app.routes}
    app.add_middleware(GuardMiddleware, metrics=engine.metrics, known_paths=known, max_body=settings.max_body_bytes)
    return app


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True,
               log_level: str = "info", wait_for_snapshot: bool = False) -> None:
    """Serve the app with uvicorn until interrupted.

    Args:
        settings: the serve settings.
        host: the interface to bind.
        port: the TCP port.
        access_log: log one line per request.
        log_level: uvicorn's log level.
        wait_for_snapshot: when the first alias check or load leaves nothing to serve (no such
            index or alias, its snapshot refused), keep running -- 503 on ``/readyz``, the alias
            polled -- instead of stopping.

    Raises:
        NothingToServe: without ``wait_for_snapshot``, the first alias check or load left
            nothing to serve; the message says why.
        KeyFileError: the keys file is malformed.
        SystemExit: uvicorn could not start (the port is taken...), with uvicorn's status 3.
    """
    import uvicorn

    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level,
                                           timeout_graceful_shutdown=10))
    failures: list[str] = []
    if not wait_for_snapshot:
        def give_up(reason: str) -> None:
            failures.append(reason)
            server.should_exit = True

        app.state.engine.on_nothing_to_serve = give_up
    server.run()
    if failures:
        raise NothingToServe(failures[0])
    if not server.started:
        sys.exit(3)  # what uvicorn.run exits with when the server could not start
