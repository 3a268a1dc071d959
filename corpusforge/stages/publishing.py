"""The publish stage: assemble the snapshot, publish it, verify it, and move the alias as the spec says.

Promotion belongs to publish alone (``publish.promote``):

- ``always``: the alias moves to every new verified snapshot;
- ``on_improvement``: the alias moves only when the new build's dev metric beats the dev metric
  recorded by the version the alias points at now (the dev split is a seeded share of the
  training judgments; the test split never decides anything). A build whose training was cut
  short by its time budget (``on_budget: stop``) never moves it. Either way the new version gets
  ``publish.candidate_alias``, so it can be served and compared before anyone promotes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from corpusforge.snapshots import build as snapshot_build
from corpusforge.snapshots.consistency import local_consistency_problems
from corpusforge.stages import Retriever, StageContext, retriever

log = logging.getLogger("corpusforge")

def assemble(ctx: StageContext, r: Retriever, dest: Path) -> Path:
    """Lay out the snapshot's files under `dest` with hard links (no data is copied).

    Args:
        ctx: the stage context (evaluate done).
        r: the retriever to ship.
        dest: a directory that must not exist yet.

    Returns:
        `dest`.
    """
    ws = ctx.ws
    parts = {"chunks": ws.dataset("chunks"), "dense": r.dense_dir, "bm25": r.bm25_dir}
    if r.tower_dir is not None:
        parts["query_tower"] = r.tower_dir
    if r.reranker_dir is not None:
        parts["reranker"] = r.reranker_dir
    if r.trained:
        parts[snapshot_build.SHIPPED_MODEL] = Path(r.model.name)
    for name, src in parts.items():
        shutil.copytree(src, dest / name, copy_function=_link_or_copy)
    (dest / "eval").mkdir()
    _link_or_copy(ws.eval_dir / "metrics.json", dest / "eval" / "metrics.json")
    return dest


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def dev_score(metrics: dict[str, Any], metric: str) -> float | None:
    """The best dev value of `metric` over the modes in an eval summary (or manifest ``dev``), or None."""
    modes = (metrics.get("dev") or {}).get("modes") or {}
    values = [v[metric] for v in modes.values() if isinstance(v, dict) and metric in v]
    return max(values) if values else None


def _training_info(ctx: StageContext) -> dict[str, Any] | None:
    if not ctx.spec.train.enabled:
        return None
    info: dict[str, Any] = {"truncated": False, "models": {}}
    for stage, family in (("train_retriever", "biencoder"), ("train_reranker", "reranker")):
        summary = (ctx.ws.read_state(stage) or {}).get("summary")
        if summary is None:
            continue
        info["truncated"] |= bool(summary.get("truncated"))
        info["models"][family] = {"steps": summary.get("steps"), "best_dev": summary.get("best_dev"),
                                  "registry": summary.get("registry"), "fingerprint": summary.get("fingerprint")}
        if family == "reranker":
            info["fusion_weight"] = summary.get("fusion_weight")
    return info


def _bar(store, name: str, alias: str, metric: str) -> tuple[float | None, str]:
    """The dev metric recorded by the version an alias points at, if any."""
    from corpusforge.snapshots import SnapshotError

    try:
        version = store.resolve(name, alias)
    except SnapshotError:
        return None, f"no {alias!r} alias yet"
    value = dev_score(store.manifest(name, version).get("extra") or {}, metric)
    return value, f"{alias} = {version}" + ("" if value is not None else " (no dev metric recorded)")


def publish(ctx: StageContext) -> dict[str, Any]:
    """Publish the build as a new immutable, verified snapshot; move the alias per ``publish.promote``.

    A build whose parts disagree (`snapshots.consistency`: row counts of chunks, dense and BM25;
    model fingerprints) is refused before a version is written; the published version is verified
    (checksums and the same consistency check) before any alias moves.

    Args:
        ctx: the stage context (evaluate done).

    Returns:
        Version, aliases, file count and bytes, and the promotion decision with its reason.
    """
    spec, ws = ctx.spec, ctx.ws
    pub = spec.publish
    r = retriever(spec, ws)
    staging = ws.base / f".staging-{uuid.uuid4().hex[:8]}"
    for stale in ws.base.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    metrics = json.loads((ws.eval_dir / "metrics.json").read_text())
    training = _training_info(ctx)
    try:
        assemble(ctx, r, staging)
        manifest = snapshot_build.build_manifest_for(spec, ws, r, staging, metrics, training)
        problems = local_consistency_problems(staging, manifest)
        if problems:  # before a version exists, so before any alias could move
            raise RuntimeError(f"refusing to publish {spec.name}: its parts disagree: {'; '.join(problems)}")
        store = snapshot_build.store_for(spec, ws)
        name = snapshot_build.index_name(spec)
        version = store.publish(staging, manifest)
        report = store.verify(name, version)
        if not report.ok:
            raise RuntimeError(f"snapshot {name}/{version} failed verification: {report.problems}")
        new = dev_score(metrics, pub.promote_metric)
        if pub.promote == "always":
            promoted, reason = True, "publish.promote: always"
        elif training and training["truncated"]:
            promoted, reason = False, "training was truncated by its time budget"
        elif new is None:
            raise RuntimeError("publish.promote is on_improvement but evaluate recorded no dev metric "
                               "(the source has no training split to carve a dev split from)")
        else:
            bar, bar_from = _bar(store, name, pub.alias, pub.promote_metric)
            promoted = bar is None or new > bar
            reason = (f"dev {pub.promote_metric} {new:.4f} " + (f"> {bar:.4f}" if promoted and bar is not None
                      else f"<= {bar:.4f}" if bar is not None else "(first)") + f" ({bar_from})")
        if pub.promote != "always":
            store.set_alias(name, pub.candidate_alias, version)
        if promoted:
            store.set_alias(name, pub.alias, version)
        log.info("publish: %s/%s; %s %s: %s", name, version, pub.alias, "moved" if promoted else "NOT moved", reason)
        (ws.base / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = snapshot_build.file_entries(manifest["files"])
    return {"index": name, "version": version, "alias": pub.alias, "root": store.root, "files": len(files),
            "bytes": sum(f["size"] for f in files), "corpus_hash": manifest["corpus_hash"], "promoted": promoted,
            "promotion": reason, "dev_score": new, "candidate_alias": pub.candidate_alias
            if pub.promote != "always" else None}
