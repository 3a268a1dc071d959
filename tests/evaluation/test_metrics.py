"""Evaluation metrics: equal to trec_eval (via pytrec_eval) on synthetic and SciFact-shaped runs."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import pytrec_eval

from corpusforge.evaluation.metrics import (
    DEFAULT_METRICS,
    evaluate,
    evaluate_searcher,
    metric_key,
    parse_metric,
    rank_documents,
    run_from_hits,
    trec_eval_measure,
)

ALL_METRICS = (*DEFAULT_METRICS, "precision@10", "map@20", "ndcg", "mrr", "recall@5")


def _trec_eval(run, qrels, metric):
    """pytrec_eval's per-query value of one of our metrics; queries it skips (no run) are 0."""
    measure, cut = trec_eval_measure(metric)
    if cut is not None:
        # An independent implementation of trec_eval's order: score desc, then doc id desc.
        run = {q: dict(sorted(d.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:cut]) for q, d in run.items()}
    scores = pytrec_eval.RelevanceEvaluator(qrels, {measure}).evaluate(run)
    return {q: scores[q][measure] if q in scores else 0.0 for q in qrels}


def _assert_matches_trec_eval(run, qrels, metrics=ALL_METRICS):
    ours = evaluate(run, qrels, metrics)
    for metric in metrics:
        ref = _trec_eval(run, qrels, metric)
        for qid in qrels:
            assert ours.per_query[qid][metric] == pytest.approx(ref[qid], abs=1e-6), (metric, qid)
        assert ours.mean[metric] == pytest.approx(sum(ref.values()) / len(ref), abs=1e-6), metric
    return ours


def _synthetic(seed: int):
    """Graded (incl. negative) qrels and runs with many exact score ties and unjudged docs."""
    rng = random.Random(seed)
    docs = [f"d{i:03d}" for i in range(250)] + [f"doc-{i}" for i in range(50)]
    qrels, run = {}, {}
    for q in range(120):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([-1, 0, 0, 1, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 25))}
        if q % 10 == 0:
            continue  # judged but never retrieved: must score 0 and count in the mean
        pool = rng.sample(docs, rng.randint(1, 160))
        pool += rng.sample(list(qrels[qid]), min(3, len(qrels[qid])))  # make some hits likely
        run[qid] = {d: (rng.choice([0.25, 0.5, 0.75]) if rng.random() < 0.5 else round(rng.random(), 2)) for d in pool}
    run["not-judged"] = {"d001": 1.0}  # ignored: not in the qrels
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_trec_eval_on_random_graded_runs_with_ties(seed):
    run, qrels = _synthetic(seed)
    ours = _assert_matches_trec_eval(run, qrels)
    assert ours.num_queries == len(qrels)
    assert "not-judged" not in ours.per_query


def _read_qrels(path):
    qrels: dict[str, dict[str, int]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def test_matches_trec_eval_on_scifact_test_qrels(scifact_dir):
    qrels = _read_qrels(scifact_dir / "qrels" / "test.tsv")
    with open(scifact_dir / "corpus.jsonl", encoding="utf-8") as f:
        doc_ids = [json.loads(line)["_id"] for line in f]
    assert len(qrels) == 300 and len(doc_ids) == 5183
    rng = random.Random(13)
    run = {}
    for i, (qid, rels) in enumerate(qrels.items()):
        if i % 25 == 0:
            continue  # unanswered queries
        ranked = [d for d in rng.sample(doc_ids, 120) if d not in rels][:100]
        for doc in rels:
            if rng.random() < 0.8:  # some relevant docs are missed entirely
                ranked.insert(rng.randrange(0, 5 if rng.random() < 0.5 else len(ranked) + 1), doc)
        ranked = ranked[:100]
        # Scores fall with rank in steps of 3 ranks, so exact ties need trec_eval's doc id order.
        run[qid] = {d: round(1.0 - (r // 3) * 0.01, 2) for r, d in enumerate(ranked)}
    ours = _assert_matches_trec_eval(run, qrels, DEFAULT_METRICS)
    assert 0.1 < ours.mean["ndcg@10"] < 0.9  # a non-degenerate case
    assert ours.mean["recall@100"] > ours.mean["recall@10"]


def test_tie_break_is_doc_id_descending():
    ids, scores = rank_documents({"a": 1.0, "c": 1.0, "b": 1.0, "z": 0.5, "y": 2.0})
    assert ids.tolist() == ["y", "c", "b", "a", "z"]
    assert scores.tolist() == [2.0, 1.0, 1.0, 1.0, 0.5]
    # The relevant doc "a" sorts last among the ties, so MRR is 1/4, as trec_eval says.
    res = evaluate({"q": {"a": 1.0, "c": 1.0, "b": 1.0, "y": 2.0}}, {"q": {"a": 1}}, ["mrr@10"])
    assert res.mean["mrr@10"] == pytest.approx(0.25)


def test_hand_computed_values():
    qrels = {"q": {"a": 2, "b": 1, "c": 0, "x": 1}}
    run = {"q": {"c": 0.9, "a": 0.8, "d": 0.7, "b": 0.6}}  # ranks: c a d b; x never retrieved
    res = evaluate(run, qrels, ["ndcg@10", "recall@10", "mrr@10", "map", "precision@10"])
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert res.mean["ndcg@10"] == pytest.approx(dcg / idcg)
    assert res.mean["recall@10"] == pytest.approx(2 / 3)
    assert res.mean["mrr@10"] == pytest.approx(1 / 2)
    assert res.mean["map"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert res.mean["precision@10"] == pytest.approx(2 / 10)  # k beyond the run still divides by k


def test_empty_run_scores_zero_for_every_query():
    qrels = {"q1": {"a": 1}, "q2": {"b": 2}}
    res = evaluate({}, qrels)
    assert res.num_queries == 2
    assert all(v == 0.0 for row in res.per_query.values() for v in row.values())
    assert res.mean == {m: 0.0 for m in DEFAULT_METRICS}
    assert res.n_retrieved == {"q1": 0, "q2": 0}


def test_query_without_relevant_docs_scores_zero_and_counts_in_mean():
    qrels = {"good": {"a": 1}, "none": {"a": 0, "b": -1}, "empty": {}}
    run = {"good": {"a": 1.0}, "none": {"a": 1.0, "b": 0.5}, "empty": {"a": 1.0}}
    res = _assert_matches_trec_eval(run, qrels, DEFAULT_METRICS)
    assert res.per_query["good"]["ndcg@10"] == 1.0
    assert res.per_query["none"] == {m: 0.0 for m in DEFAULT_METRICS}
    assert res.mean["ndcg@10"] == pytest.approx(1 / 3)
    assert res.n_relevant == {"good": 1, "none": 0, "empty": 0}


def test_cutoff_larger_than_the_run():
    qrels = {"q": {"a": 1, "b": 1, "c": 3}}
    run = {"q": {"b": 0.2, "c": 0.1}}
    res = _assert_matches_trec_eval(run, qrels, ("ndcg@100", "recall@100", "mrr@10", "map", "precision@10"))
    assert res.mean["recall@100"] == pytest.approx(2 / 3)
    assert res.mean["mrr@10"] == 1.0


def test_to_table_has_one_row_per_query():
    run, qrels = _synthetic(5)
    res = evaluate(run, qrels)
    table = res.to_table()
    assert table.num_rows == len(qrels)
    assert table.column_names == ["query_id", "n_relevant", "n_retrieved", *DEFAULT_METRICS]
    col = table.column("ndcg@10").to_pylist()
    assert sum(col) / len(col) == pytest.approx(res.mean["ndcg@10"])
    assert res.flat("test.bm25.")["test.bm25.ndcg_10"] == res.mean["ndcg@10"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown metric 'ndcg10x'"):
        evaluate({}, {"q": {"a": 1}}, ["ndcg10x"])
    with pytest.raises(ValueError, match="needs a cutoff"):
        parse_metric("recall")
    with pytest.raises(ValueError, match=r"qrels\['q'\]\['a'\] = 0.5"):
        evaluate({}, {"q": {"a": 0.5}})
    with pytest.raises(ValueError, match="NaN"):
        evaluate({"q": {"a": float("nan")}}, {"q": {"a": 1}})
    with pytest.raises(ValueError, match="qrels are empty"):
        evaluate({"q": {"a": 1.0}}, {})
    assert parse_metric("P@5").name == "precision@5" and metric_key("ndcg@10") == "ndcg_10"


def test_run_from_hits_keeps_best_score_per_doc():
    run = run_from_hits(["q1", "q2"], [[("a", 0.9), ("b", 0.5), ("a", 0.7)], []])
    assert run == {"q1": {"a": 0.9, "b": 0.5}, "q2": {}}
    with pytest.raises(ValueError, match="2 query ids but 1 hit lists"):
        run_from_hits(["q1", "q2"], [[]])
    with pytest.raises(ValueError, match="appears twice"):
        run_from_hits(["q1", "q1"], [[], []])


def test_evaluate_searcher_times_and_scores():
    run, qrels = _synthetic(7)
    queries = {q: f"text of {q}" for q in qrels}
    by_text = {f"text of {q}": docs for q, docs in run.items()}
    calls = []

    def searcher(texts):
        calls.append(len(texts))
        # Return hits in a scrambled order: evaluation must re-rank by score like trec_eval.
        return [sorted(by_text.get(t, {}).items())[::-1] for t in texts]

    res, lat = evaluate_searcher(searcher, queries, qrels, k=10, batch_size=32)
    cut = {q: dict(sorted(d.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:10]) for q, d in run.items()}
    expected = evaluate(cut, qrels)
    assert res.mean == pytest.approx(expected.mean)
    assert calls == [32, 32, 32, 32, 24]  # one untimed warm-up batch, then 120 queries in batches of 32
    assert lat.n_queries == 120 and lat.batch_size == 32
    assert 0 < lat.latency_ms_p50 <= lat.latency_ms_p95 <= lat.latency_ms_p99
    assert lat.qps == pytest.approx(120 / lat.total_s)
    with pytest.raises(ValueError, match="no text"):
        evaluate_searcher(searcher, {}, qrels)
    with pytest.raises(ValueError, match="returned 0 hit lists"):
        evaluate_searcher(lambda texts: [], queries, qrels, warmup_batches=0)
