"""The query endpoint over real HTTP: a uvicorn server on 127.0.0.1 serving a snapshot that the
demo pipeline published (run once per session), with real snapshot stores (local and S3)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import faiss
import httpx
import pytest
import uvicorn
import yaml
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from corpusforge.pipeline import Pipeline
from corpusforge.serve import ServeSettings, create_app, open_snapshot
from corpusforge.serve.app import GuardMiddleware, _hot_route
from corpusforge.serve.metrics import ServeMetrics
from corpusforge.serve.settings import auto_search_threads, usable_cpus
from corpusforge.snapshots import SnapshotStore, build_manifest
from corpusforge.spec import load_spec
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
INTERNAL_DOCS = {"cs-6", "phys-4"}  # the demo corpus's docs tagged 'internal'
KEYS = {
    "public-key-0001": {"name": "public"},
    "internal-key-001": {"name": "internal", "acl": ["internal"]},
    "admin-key-00001": {"name": "ops", "admin": True, "acl": ["internal"]},
    "limited-key-001": {"name": "limited", "rate_limit_per_minute": 3},
    "limited-key-002": {"name": "limited-batch", "rate_limit_per_minute": 3},
}
PUBLIC = {"X-API-Key": "public-key-0001"}
INTERNAL = {"Authorization": "Bearer internal-key-001"}
ADMIN = {"Authorization": "Bearer admin-key-00001"}
QUERIES = ["what happens when a massive star collapses into an object light cannot escape",
           "how do plants turn sunlight into sugar", "how are planets around other stars discovered",
           "approximate nearest neighbour vector search", "coherent light from stimulated emission",
           "black hole event horizon", "neural network training", "photosynthesis chlorophyll"]


# ------------------------------------------------------------------------------------ helpers


class LiveServer:
    """A uvicorn server in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, app, ready: bool = True, timeout: float = 180.0, lifespan: str = "on") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            assert self.thread.is_alive(), "server thread died while starting"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        if ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def republish(src: SnapshotStore, version: str, dest: SnapshotStore, tag: str, tmp: Path) -> str:
    """Publish the files of ``src``'s version as a new version in ``dest`` (a fresh manifest)."""
    m = src.manifest("demo", version)
    build = tmp / f"build-{tag}"
    shutil.copytree(Path(src.root) / "demo" / version, build, ignore=shutil.ignore_patterns("manifest.json"))
    manifest = build_manifest(build, index_name="demo", spec=m["spec"], model=m["model"], corpus_hash=m["corpus_hash"],
                              index=m["index"], metrics=m["metrics"], extra={"republished": tag})
    new = dest.publish(build, manifest)
    shutil.rmtree(build)
    return new


def corrupt_file(store_root: Path, version: str, rel: str) -> None:
    """Flip bytes in the middle of a published (read-only) file, keeping its size."""
    path = store_root / "demo" / version / rel
    path.parent.chmod(path.parent.stat().st_mode | stat.S_IWUSR)
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


def point_alias_unchecked(store: SnapshotStore, version: str) -> None:
    """Write the alias record directly (what a buggy or hostile publisher could do): no verification."""
    record = {"index": "demo", "alias": "production", "version": version, "updated_at": "2026-01-01T00:00:00Z",
              "history": []}
    store.backend.write_bytes("demo/aliases/production.json", json.dumps(record).encode())


def search(server: LiveServer, headers=None, **body) -> httpx.Response:
    return httpx.post(server.url + "/search", json=body, headers=headers or {}, timeout=60)


def doc_ids(resp: httpx.Response) -> list[str]:
    return [h["doc_id"] for h in resp.json()["hits"]]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo pipeline run once: its store, index version, and the library-side snapshot."""
    ws = tmp_path_factory.mktemp("serve-ws")
    pipeline = Pipeline(load_spec(ROOT / "pipelines" / "demo.yaml"), workspace=ws, progress=False)
    pipeline.run()
    store = SnapshotStore(pipeline.ws.publish_root(pipeline.spec))
    version = store.resolve("demo", "production")
    return {"store": store, "root": Path(store.root), "version": version, "ws": ws}


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump(KEYS))
    return path


@pytest.fixture(scope="module")
def server(demo, keys_file):
    """A server with API keys and small input limits, over the demo store (alias never moved)."""
    settings = ServeSettings(root=str(demo["root"]), index="demo", keys_file=keys_file, poll_seconds=0,
                             max_query_chars=200, max_batch=8, max_k=50)
    srv = LiveServer(create_app(settings))
    yield srv
    srv.stop()


@pytest.fixture
def own_store(demo, tmp_path):
    """A fresh local store holding a copy of the demo snapshot, aliased production (for swaps)."""
    store = SnapshotStore(tmp_path / "store")
    v1 = republish(demo["store"], demo["version"], store, "v1", tmp_path)
    store.set_alias("demo", "production", v1)
    return store, v1


class Load:
    """Client threads querying through a swap; records (status, version) of every request."""

    def __init__(self, server: LiveServer, n_threads: int = 6) -> None:
        self.server, self.stop_flag, self.results, self.errors = server, threading.Event(), [], []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n_threads)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        mine = []
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            n = 0
            while not self.stop_flag.is_set():
                mode = ("dense", "bm25", "hybrid")[n % 3]
                query = f"{QUERIES[(n + i) % len(QUERIES)]} {n}"  # distinct: exercises the encoder, not the cache
                try:
                    r = client.post("/search", json={"query": query, "k": 5, "mode": mode}, headers=PUBLIC)
                    mine.append((r.status_code, r.json().get("version")))
                except Exception as exc:  # a dropped connection is a failed request too
                    self.errors.append(repr(exc))
                n += 1
        self.results.append(mine)

    def finish(self) -> list[list[tuple[int, str]]]:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)
        return self.results


# ------------------------------------------------------------------------------------ endpoints
def test_health_ready_and_snapshot(server, demo):
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "version": demo["version"]}
    snap = httpx.get(server.url + "/snapshot", headers=PUBLIC)
    assert snap.status_code == 200
    body = snap.json()
    assert body["version"] == demo["version"] and body["alias"] == "production" and body["last_refusal"] is None
    assert body["manifest"]["model"]["name"] == "default" and body["manifest"]["n_files"] > 3
    assert body["manifest"]["modes"] == ["dense", "bm25", "hybrid"]
    encoder = body["manifest"]["query_encoder"]  # int8 on this CPU, after clearing the agreement check
    assert encoder["runtime"] == "onnx-int8" and encoder["agreement"]["min_cosine"] >= 0.95
    assert set(body["metrics"]) == {"bm25", "dense", "hybrid"} and 0 < body["metrics"]["dense"]["ndcg@10"] <= 1
    assert str(demo["ws"]) not in snap.text and "/tmp" not in snap.text  # no local paths leak
    assert "X-Request-ID" in snap.headers


def test_search_matches_the_library_in_every_mode(server, demo):
    lib = open_snapshot(demo["root"] / "demo" / demo["version"])
    for mode in ("dense", "bm25", "hybrid"):
        r = search(server, PUBLIC, query=QUERIES[0], k=5, mode=mode)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == demo["version"] and body["mode"] == mode and len(body["hits"]) == 5
        hits = body["hits"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert set(hits[0]) == {"doc_id", "chunk_id", "score", "text", "metadata", "rank"}
        expected = lib.searcher.search(QUERIES[0], k=5, mode=mode, acl=frozenset())
        assert [h["chunk_id"] for h in hits] == [h.chunk_id for h in expected]
        assert hits[0]["score"] == pytest.approx(expected[0].score, rel=1e-4)
    assert doc_ids(search(server, PUBLIC, query=QUERIES[0], k=1, mode="bm25")) == ["astro-1"]


def test_chunk_level_and_fusion_options(server):
    r = search(server, PUBLIC, query="light", k=50, mode="hybrid", level="chunk", fusion="weighted")
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert len({h["chunk_id"] for h in hits}) == len(hits) > 10


def test_filters(server):
    r = search(server, PUBLIC, query="stars and planets", k=20, mode="hybrid", filters={"topic": "astronomy"})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert hits and all(h["metadata"]["topic"] == "astronomy" for h in hits)
    both = search(server, PUBLIC, query="energy", k=50, mode="bm25", filters={"topic": ["astronomy", "biology"]})
    topics = {h["metadata"]["topic"] for h in both.json()["hits"]}
    assert topics and topics <= {"astronomy", "biology"}
    assert search(server, PUBLIC, query="stars", filters={"topic": "no-such-topic"}).json()["hits"] == []
    at_limits = {"topic": ["astronomy", *(f"{i:0>256}" for i in range(15))],  # 16 values of up to 256 characters
                 **{f"{i:x>256}": ["nothing"] for i in range(15)}}  # 16 keys; the others match no chunk
    assert search(server, PUBLIC, query="stars", filters=at_limits).json()["hits"] == []
    one_key = search(server, PUBLIC, query="stars", mode="bm25", filters={"topic": at_limits["topic"]})
    assert one_key.status_code == 200 and {h["metadata"]["topic"] for h in one_key.json()["hits"]} == {"astronomy"}


def test_acl_isolation_per_key_and_through_the_cache(server):
    def seen(headers) -> set[str]:
        out = set()
        for mode in ("dense", "bm25", "hybrid"):
            for q in ("approximate nearest neighbour search HNSW", "laser coherent light stimulated emission"):
                r = search(server, headers, query=q, k=50, mode=mode, level="chunk")
                assert r.status_code == 200
                out |= set(doc_ids(r))
        return out

    internal = seen(INTERNAL)  # fills the cache first with internal answers
    public = seen(PUBLIC)
    assert INTERNAL_DOCS <= internal
    assert not (public & INTERNAL_DOCS) and len(public) > 10
    batch = httpx.post(server.url + "/search/batch", headers=PUBLIC,
                       json={"queries": ["laser", "vector search HNSW"], "k": 50, "mode": "bm25"}).json()
    assert not {h["doc_id"] for item in batch["results"] for h in item["hits"]} & INTERNAL_DOCS


def test_auth(server):
    none = search(server, None, query="stars")
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in none.json()["detail"]
    assert search(server, {"X-API-Key": "not-a-real-key"}, query="stars").status_code == 401
    assert search(server, {"Authorization": "Bearer internal-key-001"}, query="stars").status_code == 200
    assert search(server, {"X-API-Key": "internal-key-001"}, query="stars").status_code == 200
    assert httpx.get(server.url + "/snapshot").status_code == 401
    denied = httpx.post(server.url + "/admin/reload", headers=INTERNAL)
    assert denied.status_code == 403 and "not an admin key" in denied.json()["detail"]
    assert httpx.post(server.url + "/admin/reload").status_code == 401
    ok = httpx.post(server.url + "/admin/reload", headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["status"] == "unchanged"


def test_rate_limits_answer_429_with_retry_after(server):
    limited = {"X-API-Key": "limited-key-001"}
    codes = [search(server, limited, query=f"stars {i}", mode="bm25").status_code for i in range(4)]
    assert codes == [200, 200, 200, 429]
    r = search(server, limited, query="stars", mode="bm25")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "rate limit of 3" in r.json()["detail"]
    assert search(server, PUBLIC, query="stars", mode="bm25").status_code == 200  # other keys unaffected
    batch = {"X-API-Key": "limited-key-002"}
    body = {"queries": ["a b", "c d"], "mode": "bm25"}
    assert httpx.post(server.url + "/search/batch", json=body, headers=batch).status_code == 200
    assert httpx.post(server.url + "/search/batch", json=body, headers=batch).status_code == 429  # costs 1 per query


@pytest.mark.parametrize("body, needle", [
    ({"query": "x" * 201}, "at most 200 characters"),
    ({"query": "stars", "k": 0}, "greater than or equal to 1"),
    ({"query": "stars", "k": 51}, "less than or equal to 50"),
    ({"query": "   \t "}, "empty after whitespace normalisation"),
    ({"query": "stars", "mode": "sparse"}, "'dense', 'bm25' or 'hybrid'"),
    ({"query": "stars", "colour": "red"}, "Extra inputs are not permitted"),
    ({"query": "stars", "filters": {"topic": {"nested": 1}}}, "filters"),
    ({"query": "stars", "filters": {f"key{i}": "v" for i in range(17)}}, "at most 16 filter keys, got 17"),
    ({"query": "stars", "filters": {"topic": ["v"] * 17}}, "at most 16 wanted values, got 17"),
    ({"query": "stars", "filters": {"topic": "v" * 257}}, "at most 256 characters, got 257"),
    ({"query": "stars", "filters": {"t" * 257: "v"}}, "filter keys are at most 256 characters"),
    ({"query": "stars", "filters": {"topic": [["astronomy"]]}}, "nothing nests deeper"),
    ({"query": "stars", "filters": {"topic": []}}, "at least one value"),
    ({"query": ["stars"]}, "query is a single value, not a JSON array"),
    ({"query": "stars", "filters": [{"topic": "astronomy"}]}, "filters is a JSON object"),
])
def test_input_limits_answer_422_with_a_clear_message(server, body, needle):
    r = search(server, PUBLIC, **body)
    assert r.status_code == 422
    assert needle in json.dumps(r.json()), r.text
    assert r.json()["request_id"]


def test_batch_limits_body_limits_and_malformed_json(server):
    url = server.url + "/search/batch"
    too_many = httpx.post(url, headers=PUBLIC, json={"queries": ["q"] * 9})
    assert too_many.status_code == 422 and "at most 8 items" in too_many.text
    too_long = httpx.post(url, headers=PUBLIC, json={"queries": ["ok", "y" * 201]})
    assert too_long.status_code == 422
    [err] = too_long.json()["detail"]
    assert err["loc"] == ["body", "queries", 1] and "at most 200 characters" in err["msg"]
    bad_json = httpx.post(server.url + "/search", headers={**PUBLIC, "content-type": "application/json"},
                          content=b'{"query": ')
    assert bad_json.status_code == 422 and "json" in bad_json.text.lower()
    huge = httpx.post(server.url + "/search", headers=PUBLIC, json={"query": "z" * (2 << 20)})
    assert huge.status_code == 413 and "larger than" in huge.json()["detail"]


def test_batch_equals_single_searches(server):
    queries = QUERIES[:4]
    r = httpx.post(server.url + "/search/batch", headers=INTERNAL, json={"queries": queries, "k": 3, "mode": "hybrid"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 4
    for q, item in zip(queries, results):
        single = search(server, INTERNAL, query=q, k=3, mode="hybrid").json()["hits"]
        assert [h["chunk_id"] for h in item["hits"]] == [h["chunk_id"] for h in single]


def test_rerank_without_reranker_is_a_clear_422(server):
    r = search(server, PUBLIC, query="stars", rerank=True)
    assert r.status_code == 422 and "has no reranker" in r.json()["detail"]


def test_cache_on_normalised_queries(server):
    q = "  Ocean   currents and\tclimate "
    first = search(server, PUBLIC, query=q, k=4, mode="dense").json()
    again = search(server, PUBLIC, query="Ocean currents and climate", k=4, mode="dense").json()
    other_k = search(server, PUBLIC, query="Ocean currents and climate", k=3, mode="dense").json()
    assert not first["cached"] and again["cached"] and not other_k["cached"]
    assert again["hits"] == first["hits"]


def test_metrics(server, demo):
    for mode in ("dense", "bm25", "hybrid", "bm25"):  # the second bm25 one is a cache hit
        search(server, PUBLIC, query="metrics probe", mode=mode)
    assert search(server, PUBLIC, query="metrics probe", k=0).status_code == 422
    text = httpx.get(server.url + "/metrics").text
    assert 'corpusforge_requests_total{endpoint="/search",method="POST",status="200"}' in text
    assert 'corpusforge_requests_total{endpoint="/search",method="POST",status="422"}' in text
    for mode in ("dense", "bm25", "hybrid"):
        assert f'corpusforge_search_latency_seconds_bucket{{le="0.05",mode="{mode}"}}' in text
    hits = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("corpusforge_cache_hits_total")))
    assert hits >= 1
    assert f'version="{demo["version"]}"' in text and "corpusforge_snapshot_info" in text
    assert 'query_runtime="onnx-int8"' in text
    assert "corpusforge_search_batch_size_bucket" in text
    # The demo snapshot has no query tower: the full model encodes, one search thread per CPU + 1.
    threads = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("corpusforge_search_threads")))
    assert threads == auto_search_threads(True) == usable_cpus() + 1
    # faiss_threads (1) reaches the search threads: OpenMP's thread count is per calling thread
    batcher = server.server.config.app.state.engine.batcher
    probe = batcher.submit("omp-probe", lambda queries: [faiss.omp_get_max_threads() for _ in queries], "probe")
    assert asyncio.run(probe) == 1


def test_auto_search_threads():
    assert auto_search_threads(True, cpus=2) == 3 and auto_search_threads(False, cpus=2) == 2
    assert auto_search_threads(False, cpus=1) == 1


def test_opentelemetry_spans_only_when_asked_for(demo):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another test set a global tracer provider first"
    spans = {}
    for otel in (False, True):
        srv = LiveServer(create_app(ServeSettings(root=str(demo["root"]), index="demo", poll_seconds=0,
                                                  opentelemetry=otel)))
        try:
            exporter.clear()
            assert httpx.get(srv.url + "/healthz").status_code == 200
            spans[otel] = [span.name for span in exporter.get_finished_spans()]
        finally:
            srv.stop()
    assert spans[False] == []
    assert any("/healthz" in name for name in spans[True]), spans[True]


class HotBody(BaseModel):
    query: str = Field(min_length=1)
    k: int = Field(default=10, ge=1)


def test_hot_route_answers_like_fastapi_and_takes_the_short_way_only_for_well_formed_requests():
    seen = {"dependency": 0, "hot": 0, "endpoint": 0}

    def dependency():
        seen["dependency"] += 1
        return "caller"

    def authenticate(request):
        seen["hot"] += 1
        if request.headers.get("x-api-key") == "bad":
            raise HTTPException(401, "invalid API key")
        return "caller"

    async def endpoint(req: HotBody, caller: str = Depends(dependency)):
        seen["endpoint"] += 1
        return JSONResponse({"query": req.query, "k": req.k, "caller": caller})

    def check(data):
        if isinstance(data, dict) and data.get("k") == 99:
            return {"loc": ("body", "k"), "msg": "k=99 is over a limit", "type": "limit"}
        return None

    app = FastAPI()
    app.router.add_api_route("/plain", endpoint, methods=["POST"])
    app.router.add_api_route("/hot", endpoint, methods=["POST"], route_class_override=_hot_route(authenticate, check))
    srv = LiveServer(app, ready=False, lifespan="off")
    json_type = "application/json"
    cases = [  # body, content type, short way expected
        (b'{"query": "a", "k": 3}', json_type, True),
        (b'{"query": "a"}', json_type, True),
        (b'{"query": "", "k": 3}', json_type, False),
        (b'{"query": "a", "k": 0}', json_type, False),
        (b'{"query": "a", "k": 100000000000000000000000}', json_type, False),  # orjson reads a float
        (b"", json_type, False),
        (b'["a"]', json_type, False),
        (b'{"query": "a"}', "text/plain", False),
        (b'{"query": "a"}', "application/json; charset=utf-8", False),
    ]
    try:
        for body, content_type, short in cases:
            plain = httpx.post(srv.url + "/plain", content=body, headers={"content-type": content_type})
            before = dict(seen)
            hot = httpx.post(srv.url + "/hot", content=body, headers={"content-type": content_type})
            assert (hot.status_code, hot.json()) == (plain.status_code, plain.json()), body
            assert seen["hot"] == before["hot"] + 1, body  # every request is admitted first, once
            took_short = seen["endpoint"] > before["endpoint"] and seen["dependency"] == before["dependency"]
            assert took_short == short, body
        # Not standard JSON: a 422 json_invalid at the position FastAPI names, although FastAPI's own
        # handler reads NaN with Python's json (and would answer 200 here)
        for body, pos in [(b'{"query": "a",', 14), (b'{"query": "a", "extra": NaN}', 24), (b'{"a": 1}x', 8)]:
            before = dict(seen)
            hot = httpx.post(srv.url + "/hot", content=body, headers={"content-type": json_type})
            assert hot.status_code == 422, body
            [error] = hot.json()["detail"]
            assert (error["type"], error["loc"], error["msg"]) == ("json_invalid", ["body", pos], "JSON decode error")
            assert seen["hot"] == before["hot"] + 1 and seen["endpoint"] == before["endpoint"]
        plain = httpx.post(srv.url + "/plain", content=b'{"query": "a",', headers={"content-type": json_type})
        assert plain.json()["detail"][0]["loc"] == ["body", 14]
        # the check sees every body that parses, whichever way it would have gone on
        for body, content_type in [(b'{"query": "a", "k": 99}', json_type), (b'{"query": "a", "k": 99}', "text/plain"),
                                   (b'{"query": "a", "k": 99}', "application/json; charset=utf-8")]:
            before = dict(seen)
            hot = httpx.post(srv.url + "/hot", content=body, headers={"content-type": content_type})
            assert hot.status_code == 422 and hot.json()["detail"][0]["msg"] == "k=99 is over a limit", body
            assert seen["dependency"] == before["dependency"] and seen["endpoint"] == before["endpoint"]
        before = dict(seen)
        bad_key = httpx.post(srv.url + "/hot", json={"query": "a"}, headers={"x-api-key": "bad"})
        assert bad_key.status_code == 401 and bad_key.json() == {"detail": "invalid API key"}
        assert seen["endpoint"] == before["endpoint"] and seen["dependency"] == before["dependency"]
        # the schema is FastAPI's own: the hot route documents the same body as the plain one
        paths = httpx.get(srv.url + "/openapi.json").json()["paths"]
        assert paths["/hot"]["post"]["requestBody"] == paths["/plain"]["post"]["requestBody"]
    finally:
        srv.stop()


def test_unhandled_errors_answer_a_generic_500_and_are_logged(caplog):
    async def broken(scope, receive, send):
        raise RuntimeError("secret detail at /srv/corpusforge/internal.py line 42")

    srv = LiveServer(GuardMiddleware(broken, ServeMetrics(), {"/boom"}), ready=False, lifespan="off")
    try:
        with caplog.at_level(logging.ERROR, logger="corpusforge.serve"):
            r = httpx.get(srv.url + "/boom")
        assert r.status_code == 500
        body = r.json()
        assert body == {"detail": "internal server error", "request_id": r.headers["x-request-id"]}
        assert "secret" not in r.text and "Traceback" not in r.text
        assert any(body["request_id"] in rec.getMessage() and rec.exc_info for rec in caplog.records)
    finally:
        srv.stop()


def test_unknown_routes_and_methods_leak_nothing(server):
    for r in (httpx.get(server.url + "/nope"), httpx.get(server.url + "/search"),
              httpx.post(server.url + "/admin/reload", headers={"Authorization": "Basic eDp5"})):
        assert r.status_code in (401, 404, 405)
        assert "Traceback" not in r.text and "/corpusforge/" not in r.text


# ------------------------------------------------------------------------------------ lifecycle
def test_not_ready_until_a_snapshot_is_loaded(demo, tmp_path):
    store = SnapshotStore(tmp_path / "empty")
    app = create_app(ServeSettings(root=str(tmp_path / "empty"), index="demo", poll_seconds=0.2))
    srv = LiveServer(app, ready=False)
    try:
        assert httpx.get(srv.url + "/healthz").status_code == 200
        assert httpx.get(srv.url + "/readyz").status_code == 503
        assert search(srv, query="stars").status_code == 503
        v1 = republish(demo["store"], demo["version"], store, "late", tmp_path)
        store.set_alias("demo", "production", v1)
        srv.wait_ready(60)
        assert search(srv, query="stars").json()["version"] == v1
        admin = httpx.post(srv.url + "/admin/reload")
        assert admin.status_code == 403 and "without a keys file" in admin.json()["detail"]
    finally:
        srv.stop()


def test_hot_swap_under_concurrent_load_fails_no_request(own_store, demo, tmp_path, keys_file):
    store, v1 = own_store
    srv = LiveServer(create_app(ServeSettings(root=store.root, index="demo", keys_file=keys_file, poll_seconds=0.2)))
    try:
        load = Load(srv, n_threads=6)
        time.sleep(1.0)
        v2 = republish(store, v1, store, "v2", tmp_path)
        store.set_alias("demo", "production", v2)
        _wait_for(lambda: httpx.get(srv.url + "/readyz").json()["version"] == v2, 60, "the swap to v2")
        time.sleep(1.0)
        results = load.finish()
        assert load.errors == []
        flat = [r for thread in results for r in thread]
        assert len(flat) > 30
        assert {status for status, _ in flat} == {200}
        assert {v for _, v in flat} == {v1, v2}
        for thread in results:  # once a thread has seen v2 it never sees v1 again
            versions = [v for _, v in thread]
            if v2 in versions:
                assert v1 not in versions[versions.index(v2):]
        metrics = httpx.get(srv.url + "/metrics").text
        assert "corpusforge_snapshot_swaps_total 2.0" in metrics and f'version="{v2}"' in metrics
    finally:
        srv.stop()


def test_freeze_gc_freezes_after_swaps_and_a_replaced_snapshot_is_still_freed(own_store, demo, tmp_path):
    store, v1 = own_store
    app = create_app(ServeSettings(root=store.root, index="demo", poll_seconds=0.2, freeze_gc=True))
    srv = LiveServer(app)
    try:
        assert search(srv, query="stars", mode="hybrid").status_code == 200
        assert gc.get_freeze_count() > 1000
        metrics = httpx.get(srv.url + "/metrics").text
        exported = next(line for line in metrics.splitlines() if line.startswith("corpusforge_gc_frozen_objects "))
        assert float(exported.split()[1]) > 1000  # the count at the swap (freed objects leave it later)
        old = weakref.ref(app.state.engine.holder.current.searcher)
        v2 = republish(store, v1, store, "v2", tmp_path)
        store.set_alias("demo", "production", v2)
        _wait_for(lambda: httpx.get(srv.url + "/readyz").json()["version"] == v2, 60, "the swap to v2")
        assert search(srv, query="stars", mode="hybrid").json()["version"] == v2
        # reference counting alone frees the old snapshot: no cycle keeps it alive while frozen
        _wait_for(lambda: old() is None, 10, "the replaced snapshot to be freed")
    finally:
        srv.stop()
        gc.unfreeze()  # this test process is not a dedicated server


@pytest.mark.parametrize("damage", ["corrupt", "incomplete"])
def test_broken_snapshot_is_refused_and_the_old_one_keeps_serving(own_store, demo, tmp_path, keys_file, caplog,
                                                                  damage):
    store, v1 = own_store
    srv = LiveServer(create_app(ServeSettings(root=store.root, index="demo", keys_file=keys_file, poll_seconds=0.2)))
    try:
        bad = republish(store, v1, store, "bad", tmp_path)
        if damage == "corrupt":
            corrupt_file(Path(store.root), bad, "dense/shard-00001.faiss")
            expected = "checksum mismatch for 'dense/shard-00001.faiss'"
        else:
            path = Path(store.root) / "demo" / bad / "bm25"
            path.chmod(0o755)
            victim = sorted(p for p in path.iterdir() if p.is_file())[0]
            victim.unlink()
            expected = f"missing file 'bm25/{victim.name}'"
        load = Load(srv, n_threads=4)
        with caplog.at_level(logging.ERROR, logger="corpusforge.serve"):
            point_alias_unchecked(store, bad)
            refusal = _wait_for(lambda: httpx.get(srv.url + "/snapshot", headers=PUBLIC).json()["last_refusal"],
                                60, "the refusal")
            time.sleep(0.5)
        results = load.finish()
        assert refusal["version"] == bad and expected in refusal["reason"]
        assert load.errors == [] and {r for thread in results for r in thread} == {(200, v1)}
        snap = httpx.get(srv.url + "/snapshot", headers=PUBLIC).json()
        assert snap["version"] == v1 and httpx.get(srv.url + "/readyz").status_code == 200
        assert any("REFUSED" in rec.getMessage() and bad in rec.getMessage() for rec in caplog.records)
        retry = httpx.post(srv.url + "/admin/reload", headers=ADMIN)
        assert retry.status_code == 409 and retry.json()["status"] == "refused" and expected in retry.json()["detail"]
        assert "corpusforge_snapshot_refusals_total" in httpx.get(srv.url + "/metrics").text
        # a good version published afterwards is picked up as usual
        v3 = republish(store, v1, store, "v3", tmp_path)
        store.set_alias("demo", "production", v3)
        _wait_for(lambda: search(srv, PUBLIC, query="stars").json()["version"] == v3, 60, "the swap to v3")
    finally:
        srv.stop()


def test_s3_root_serves_swaps_and_refuses(demo, tmp_path, s3_server, s3_bucket, keys_file):
    import boto3

    root = f"s3://{s3_bucket}/snaps"
    store = SnapshotStore(root, endpoint_url=s3_server["endpoint_url"])
    v1 = republish(demo["store"], demo["version"], store, "s3-v1", tmp_path)
    store.set_alias("demo", "production", v1)
    settings = ServeSettings(root=root, index="demo", endpoint_url=s3_server["endpoint_url"], keys_file=keys_file,
                             cache_dir=tmp_path / "cache", poll_seconds=0)
    srv = LiveServer(create_app(settings))
    try:
        r = search(srv, INTERNAL, query=QUERIES[4], k=3, mode="hybrid")
        assert r.status_code == 200 and r.json()["version"] == v1 and "phys-4" in doc_ids(r)
        v2 = republish(demo["store"], demo["version"], store, "s3-v2", tmp_path)
        store.set_alias("demo", "production", v2)
        swapped = httpx.post(srv.url + "/admin/reload", headers=ADMIN, timeout=120)
        assert swapped.json() == {"status": "swapped", "version": v2, "target": v2, "detail": None}
        assert (tmp_path / "cache" / "demo" / v2).is_dir()
        bad = republish(demo["store"], demo["version"], store, "s3-bad", tmp_path)
        key = f"snaps/demo/{bad}/chunks/" + next(e["path"] for e in store.manifest("demo", bad)["files"]
                                                   if e["path"].startswith("chunks/")).split("/", 1)[1]
        client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"])
        size = client.head_object(Bucket=s3_bucket, Key=key)["ContentLength"]
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"\0" * size)  # same size, other bytes
        point_alias_unchecked(store, bad)
        refused = httpx.post(srv.url + "/admin/reload", headers=ADMIN, timeout=120)
        assert refused.status_code == 409 and "checksum mismatch" in refused.json()["detail"]
        assert search(srv, PUBLIC, query="stars").json()["version"] == v2
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ schema
def test_openapi_schema_fuzzing_finds_no_5xx(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: dict[int, int] = {}

    @given(case=cases)
    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call(base_url=server.url, headers=ADMIN, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
        assert "Traceback" not in response.text

    fuzz()
    assert sum(seen.values()) >= 50 and 200 in seen and 422 in seen


@pytest.mark.slow
def test_cli_serve_command(demo, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "corpusforge.cli", "serve", "--root", str(demo["root"]),
                             "--index", "demo", "--port", str(port), "--poll-seconds", "0", "--no-access-log"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(ready, 180, "the CLI server")
        r = httpx.post(url + "/search", json={"query": "black hole", "k": 1, "mode": "bm25"})
        assert r.status_code == 200 and doc_ids(r) == ["astro-1"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM: exit status -15
    assert proc.returncode in (0, -15) and "Finished server process" in out, out[-2000:]


def test_rerank_with_a_snapshot_reranker(demo, tmp_path, keys_file):
    """A snapshot carrying reranker/ (late-interaction model + float16 doc token vectors) serves
    rerank=true; the reranked list holds the same candidates' best, re-scored."""
    from corpusforge.retrieval.late_interaction import ColBERTConfig, LateInteraction
    from corpusforge.retrieval.rerank import add_reranker_to_build

    src = demo["store"]
    m = src.manifest("demo", demo["version"])
    build = tmp_path / "build"
    shutil.copytree(demo["root"] / "demo" / demo["version"], build, ignore=shutil.ignore_patterns("manifest.json"))
    for p in [build, *build.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    model_dir = LateInteraction(ColBERTConfig(query_length=16, doc_length=64, threads=2)).save(tmp_path / "rr")
    add_reranker_to_build(build, model_dir, build / "chunks", fusion_weight=0.5, depth=20)
    store = SnapshotStore(tmp_path / "store")
    manifest = build_manifest(build, index_name="demo", spec=m["spec"], model=m["model"], corpus_hash=m["corpus_hash"],
                              index=m["index"], metrics=m["metrics"])
    store.set_alias("demo", "production", store.publish(build, manifest))
    settings = ServeSettings(root=str(store.root), index="demo", keys_file=keys_file, poll_seconds=0)
    srv = LiveServer(create_app(settings))
    try:
        snap = httpx.get(srv.url + "/snapshot", headers=ADMIN).json()
        assert json.dumps(snap).count('"has_reranker": true') == 1
        query = "coherent light from stimulated emission and vector search"
        plain = search(srv, PUBLIC, query=query, k=20, mode="hybrid")
        reranked = search(srv, PUBLIC, query=query, k=5, mode="hybrid", rerank=True)
        assert plain.status_code == reranked.status_code == 200, reranked.text
        hits = reranked.json()["hits"]
        assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
        assert {h["doc_id"] for h in hits} <= set(doc_ids(plain))  # reranks the first stage's candidates
        assert not {h["doc_id"] for h in hits} & {"cs-6", "phys-4"}  # and never widens the caller's ACL
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ Python API
def test_open_index_searches_the_aliased_snapshot_as_the_endpoint_does(demo, server):
    import corpusforge

    index = corpusforge.open_index(demo["root"], "demo")  # alias production
    assert (index.name, index.version, index.alias, index.modes) == ("demo", demo["version"], "production",
                                                                     ("dense", "bm25", "hybrid"))
    assert index.summary()["n_docs"] == 41 and index.manifest["index_name"] == "demo"
    for mode in index.modes:
        for query in QUERIES[:4]:
            hits = index.search(query, k=5, mode=mode)
            served = search(server, PUBLIC, query=query, k=5, mode=mode).json()["hits"]
            assert [(h.doc_id, h.rank) for h in hits] == [(h["doc_id"], h["rank"]) for h in served]
            assert [h.score for h in hits] == pytest.approx([h["score"] for h in served], abs=1e-5)
    assert [h.doc_id for h in index.search(QUERIES[0], k=3)] == [h.doc_id for h in index.search(QUERIES[0], k=3,
                                                                                              mode="hybrid")]
    public = {h.doc_id for h in index.search(QUERIES[4], k=10, mode="hybrid")}
    internal = {h.doc_id for h in index.search(QUERIES[4], k=10, mode="hybrid", acl=["internal"])}
    assert not public & INTERNAL_DOCS and "phys-4" in internal  # public only unless the caller has tags
    assert [[h.doc_id for h in hits] for hits in index.search_batch(QUERIES[:2], k=3, mode="bm25")] == \
        [[h.doc_id for h in index.search(q, k=3, mode="bm25")] for q in QUERIES[:2]]
    with pytest.raises(ValueError, match="has no reranker"):
        index.search("stars", rerank=True)


def test_open_index_by_alias_or_version_and_refusing_a_damaged_snapshot(demo, tmp_path):
    from corpusforge import open_index
    from corpusforge.snapshots import AliasError, SnapshotNotFoundError, VerificationError

    store = SnapshotStore(tmp_path / "store")
    v1 = republish(demo["store"], demo["version"], store, "api-v1", tmp_path)
    v2 = republish(demo["store"], demo["version"], store, "api-v2", tmp_path)
    store.set_alias("demo", "production", v1)
    store.set_alias("demo", "staging", v2)
    assert open_index(tmp_path / "store", "demo").version == v1
    staging = open_index(str(tmp_path / "store"), "demo", alias="staging")
    assert staging.version == v2 and staging.alias == "staging"
    pinned = open_index(tmp_path / "store", "demo", version=v1)
    assert pinned.version == v1 and pinned.alias is None
    with pytest.raises(AliasError):
        open_index(tmp_path / "store", "demo", alias="canary")
    with pytest.raises(SnapshotNotFoundError, match=r"no index 'nope' in .* \(indexes: demo\)"):
        open_index(tmp_path / "store", "nope")
    corrupt_file(tmp_path / "store", v2, next(e["path"] for e in store.manifest("demo", v2)["files"]
                                              if e["path"].startswith("chunks/")))
    with pytest.raises(VerificationError, match="checksum mismatch"):
        open_index(tmp_path / "store", "demo", alias="staging")


def test_open_index_downloads_an_s3_snapshot_into_its_cache(demo, tmp_path, s3_server, s3_bucket):
    from corpusforge import open_index

    root = f"s3://{s3_bucket}/snaps"
    store = SnapshotStore(root, endpoint_url=s3_server["endpoint_url"])
    version = republish(demo["store"], demo["version"], store, "api-s3", tmp_path)
    store.set_alias("demo", "production", version)
    index = open_index(root, "demo", endpoint_url=s3_server["endpoint_url"], cache_dir=tmp_path / "cache")
    assert index.version == version and index.snapshot.path == tmp_path / "cache" / "demo" / version
    local = open_index(demo["root"], "demo")
    for mode in ("dense", "bm25", "hybrid"):
        assert [h.doc_id for h in index.search(QUERIES[1], k=5, mode=mode)] == \
            [h.doc_id for h in local.search(QUERIES[1], k=5, mode=mode)]
