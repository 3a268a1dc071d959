"""Bi-encoder training: batching, InfoNCE, learning on a tiny corpus, ST-compatible output, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corpusforge.encoding.encoder import Encoder
from corpusforge.spec import ModelConfig
from corpusforge.evaluation.metrics import evaluate
from corpusforge.train.biencoder import (BiEncoderConfig, BiEncoderTrainer, DevPool, Example, build_examples,
                                         infonce_loss, make_batches)
from corpusforge.train.core import CHECKPOINT, TrainingBudgetExceeded
from tests.train_corpus import TOPICS, cpu_burner, query_text

ROOT = Path(__file__).resolve().parents[2]


def tiny_data():
    """Queries, passages and splits of the parrot corpus, in memory (no pipeline needed)."""
    queries, passages, train, dev = {}, {}, {}, {}
    for i, (topic, fact) in enumerate(TOPICS):
        queries[f"q{i}"] = query_text(topic)
        passages[f"pos{i}"] = f"{topic.title()}\n\nSummary. {fact.capitalize()}."
        passages[f"par{i}"] = f"About {topic}\n\n{query_text(topic)} ? tell me more."
        (dev if i % 4 == 0 else train)[f"q{i}"] = {f"pos{i}": 1}
    negatives = {q: [f"par{q[1:]}"] for q in train}  # the parrot is the hard negative
    return queries, passages, train, dev, negatives


def test_batches_never_repeat_a_document():
    exs = [Example("q1", "d1", ["d2"]), Example("q2", "d2", ["d3"]), Example("q3", "d1", ["d4"]),
           Example("q4", "d5", ["d1", "d6"])]
    batches = make_batches(exs, batch_size=4, seed=3)
    assert sum(len(b) for b in batches) == 4
    for b in batches:
        docs = [d for ex in b for d in ex.docs]
        assert len(docs) == len(set(docs))
    assert make_batches(exs, 4, 3) == batches  # deterministic for a seed


def test_build_examples_rotates_negatives():
    pairs = [("q", "p")]
    a = build_examples(pairs, {"q": ["n1", "n2", "n3"]}, 1, seed=0, epoch=0)[0].negatives
    b = build_examples(pairs, {"q": ["n1", "n2", "n3"]}, 1, seed=0, epoch=1)[0].negatives
    assert a != b


def test_infonce_matches_hand_computation_and_mask():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    loss = infonce_loss(q, p, torch.tensor([0]), temperature=1.0)
    expected = -np.log(np.e / (np.e + 1 + np.e))
    assert abs(float(loss) - expected) < 1e-6
    masked = infonce_loss(q, p, torch.tensor([0]), 1.0, mask=torch.tensor([[False, False, True]]))
    assert abs(float(masked) - (-np.log(np.e / (np.e + 1)))) < 1e-6


def test_loss_falls_and_dev_rises_over_base_model(tmp_path):
    queries, passages, train, dev, negatives = tiny_data()
    pairs = sorted((q, d) for q, docs in train.items() for d in docs)
    cfg = BiEncoderConfig(epochs=2, batch_size=8, learning_rate=1e-4, max_passage_length=48, max_query_length=24,
                          checkpoint_every=0, threads=2, seed=5)
    trainer = BiEncoderTrainer(cfg, queries, passages, tmp_path / "bi")
    pool = DevPool(dev, {q: [f"par{q[1:]}"] for q in dev}, depth=5)
    log = trainer.train(pairs, negatives, {q: set(v) for q, v in train.items()}, dev_eval=pool)
    losses = log["losses"]
    assert log["steps"] == len(losses) <= 8
    assert np.mean(losses[-2:]) < 0.5 * np.mean(losses[:2])
    assert log["dev"][0] < 0.8 and log["dev"][-1] > log["dev"][0] + 0.15  # held-out topics improve
    assert log["best_epoch"] > 0 and log["examples_per_s"] > 0
    # the best model is a sentence-transformers directory our Encoder loads unchanged
    best = trainer.best_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (best / name).exists(), name
    enc = Encoder(ModelConfig(name=str(best), device="cpu", max_seq_length=48))
    assert enc.fingerprint != Encoder(ModelConfig(device="cpu", max_seq_length=48)).fingerprint
    dev_ids = sorted(dev)
    qv = enc.encode_queries([queries[q] for q in dev_ids])
    pos = enc.encode_passages([passages[f"pos{q[1:]}"] for q in dev_ids])
    par = enc.encode_passages([passages[f"par{q[1:]}"] for q in dev_ids])
    assert np.mean((qv * pos).sum(1) > (qv * par).sum(1)) > 0.8


def _short_run(tmp_path, name: str, **over):
    """A 3-step bi-encoder run (fp32, 2 threads) with dev selection on the tiny corpus; returns its log."""
    queries, passages, train, dev, negatives = tiny_data()
    pairs = sorted((q, d) for q, docs in train.items() for d in docs)
    cfg = BiEncoderConfig(**{"epochs": 1, "max_steps": 3, "batch_size": 4, "learning_rate": 1e-4,
                             "max_passage_length": 16, "max_query_length": 12, "checkpoint_every": 0, "threads": 2,
                             "seed": 7, "precision": "fp32", **over})
    trainer = BiEncoderTrainer(cfg, queries, passages, tmp_path / name)
    pool = DevPool(dev, {q: [f"par{q[1:]}", f"pos{(int(q[1:]) + 1) % len(TOPICS)}"] for q in dev}, depth=5)
    return trainer.train(pairs, negatives, {q: set(v) for q, v in train.items()}, dev_eval=pool)


def test_same_seed_gives_the_same_losses_and_dev_metrics_even_under_cpu_load(tmp_path):
    quiet = _short_run(tmp_path, "quiet")
    with cpu_burner():  # another process keeps a core busy: nothing may depend on time or scheduling
        loaded = _short_run(tmp_path, "loaded", max_seconds=3600)  # a guard far away changes nothing
    assert quiet["steps"] == loaded["steps"] == quiet["planned_steps"] == 3
    assert quiet["truncated"] is loaded["truncated"] is False
    assert np.allclose(quiet["losses"], loaded["losses"], rtol=0, atol=1e-6)
    assert len(quiet["dev"]) == len(loaded["dev"]) == 2  # before training, after the epoch
    assert np.allclose(quiet["dev"], loaded["dev"], rtol=0, atol=1e-6)
    assert quiet["best_epoch"] == loaded["best_epoch"]


def test_time_guard_fails_the_run_or_truncates_it(tmp_path):
    with pytest.raises(TrainingBudgetExceeded, match="bi-encoder: time guard max_train_seconds"):
        _short_run(tmp_path, "fail", max_seconds=1e-9, threads=1)
    log = _short_run(tmp_path, "stop", max_seconds=1e-9, on_budget="stop", threads=1)
    assert log["truncated"] is True and log["steps"] == 1 < log["planned_steps"] == 3
    assert len(log["dev"]) == 2  # the truncated model was still measured on dev (and kept if better)
    assert (tmp_path / "stop" / "best" / "model.safetensors").exists()


def test_dev_pool_metric_is_the_evaluate_module_s_ndcg(tmp_path):
    # two passages with the same text tie exactly; trec_eval (and corpusforge.evaluation.metrics) rank the
    # larger doc id first, so the judged one ("a") comes second: nDCG@10 = 1 / log2(3)
    queries = {"q": "how do glaciers move"}
    text = "Glaciers move slowly downhill under their own weight."
    passages = {"a": text, "b": text, "x": "Bread rises because yeast ferments sugar.", "y": "Volcanoes erupt lava."}
    trainer = BiEncoderTrainer(BiEncoderConfig(threads=2, precision="fp32", max_passage_length=32,
                                               max_query_length=16), queries, passages, tmp_path / "tie")
    qrels = {"q": {"a": 1}}
    got = DevPool(qrels, {"q": ["x", "y", "b"]})(trainer)
    docs = ["a", "x", "y", "b"]
    scores = trainer.encode(["q"], "query") @ trainer.encode(docs, "passage").T
    assert scores[0, 0] == scores[0, 3]
    expected = evaluate({"q": dict(zip(docs, scores[0].tolist()))}, qrels, ["ndcg@10"]).mean["ndcg@10"]
    assert got == pytest.approx(expected, abs=1e-12) and got == pytest.approx(1 / np.log2(3))


CHILD = r"""
import sys, json
sys.path.insert(0, {root!r})
from tests.train.test_biencoder import tiny_data
from corpusforge.train.biencoder import BiEncoderConfig, BiEncoderTrainer
queries, passages, train, dev, negatives = tiny_data()
pairs = sorted((q, d) for q, docs in train.items() for d in docs)
cfg = BiEncoderConfig(**json.loads({cfg!r}))
t = BiEncoderTrainer(cfg, queries, passages, {out!r})
log = t.train(pairs, negatives, {{}}, on_step=lambda s, l: print("STEP", s, flush=True) or (s >= {stop} and __import__("time").sleep(60)))
print("DONE", json.dumps(log["losses"]), flush=True)
"""


def _child(cfg: dict, out: Path, stop: int) -> str:
    return CHILD.format(root=str(ROOT), cfg=json.dumps(cfg), out=str(out), stop=stop)


def test_resume_after_sigkill_continues_from_last_checkpoint(tmp_path):
    cfg = dict(epochs=1, batch_size=4, learning_rate=1e-4, max_passage_length=24, max_query_length=16,
               checkpoint_every=2, threads=1, seed=3, max_steps=5)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # reference: the same run, never interrupted
    ref = subprocess.run([sys.executable, "-c", _child(cfg, tmp_path / "ref", 10**6)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_losses = json.loads(ref.stdout.split("DONE ", 1)[1])
    # killed after step 3 (checkpoint at step 2), while it hangs in the step callback
    proc = subprocess.Popen([sys.executable, "-c", _child(cfg, tmp_path / "run", 3)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("STEP 3"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ck = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    assert ck["state"]["step"] == 2
    resumed = subprocess.run([sys.executable, "-c", _child(cfg, tmp_path / "run", 10**6)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [int(line.split()[1]) for line in resumed.stdout.splitlines() if line.startswith("STEP")]
    assert steps == [3, 4, 5]  # continued after the checkpoint, not from scratch
    losses = json.loads(resumed.stdout.split("DONE ", 1)[1])
    assert np.allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)  # and identical to the uninterrupted run


def _grads(trainer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainer.parameters() if p.grad is not None])


def test_gradient_caching_gives_the_same_gradients(tmp_path):
    queries, passages, train, dev, negatives = tiny_data()
    pairs = sorted((q, d) for q, docs in train.items() for d in docs)[:6]
    batch = make_batches(build_examples(pairs, negatives, 1, 0, 0), 6, 0)[0]
    grads = []
    for chunk in (0, 4):
        cfg = BiEncoderConfig(max_passage_length=24, max_query_length=16, grad_cache_chunk=chunk, threads=2, seed=1,
                              precision="fp32")
        trainer = BiEncoderTrainer(cfg, queries, passages, tmp_path / f"gc{chunk}")
        trainer.passage_tower.eval()  # no dropout: both paths must agree exactly
        loss = trainer.step_loss(batch, {})
        grads.append((loss, _grads(trainer)))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-3)


def test_separate_towers_are_saved_beside_the_passage_tower(tmp_path):
    queries, passages, train, dev, negatives = tiny_data()
    pairs = sorted((q, d) for q, docs in train.items() for d in docs)
    cfg = BiEncoderConfig(batch_size=4, max_passage_length=16, max_query_length=12, separate_towers=True,
                          max_steps=1, checkpoint_every=0, threads=2, learning_rate=1e-3)
    trainer = BiEncoderTrainer(cfg, queries, passages, tmp_path / "sep")
    assert trainer.query_tower is not trainer.passage_tower
    trainer.train(pairs, negatives, {})
    assert (trainer.best_dir / "config.json").exists() and (trainer.best_dir / "query_tower" / "config.json").exists()
    q = trainer.query_tower.state_dict()
    p = trainer.passage_tower.state_dict()
    assert any(not torch.equal(q[k], p[k]) for k in q)  # trained apart (they start equal)
