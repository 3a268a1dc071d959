"""Where a pipeline's datasets, state, caches and tracking store live on local disk.

```
<workspace>/
  <spec name>/
    documents/  documents_clean/  chunks/  embeddings/    Parquet datasets
    quarantine/<stage>/                                  rejected records, per stage
    index/dense/  index/bm25/                            the built indexes
    eval/                                                metrics and per-query results
    state/<stage>.json                                   fingerprint + summary of the last run
  cache/embeddings/<model fingerprint>/                  shared across specs
  mlflow.db  mlartifacts/                                the default MLflow store
  snapshots/                                             the default publish root
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corpusforge.spec import PipelineSpec


@dataclass(frozen=True)
class Workspace:
    """Paths of one pipeline inside a workspace root.

    Args:
        root: the workspace root (shared by every spec).
        name: the pipeline's name.
    """

    root: Path
    name: str

    @classmethod
    def for_spec(cls, spec: PipelineSpec, override: str | Path | None = None) -> "Workspace":
        """The workspace of a spec: `override`, else the spec's `workspace`, else ./workspace."""
        if override is not None:
            root = Path(override)
        elif spec.workspace:
            root = Path(spec.resolve(spec.workspace))
        else:
            root = Path.cwd() / "workspace"
        return cls(root.expanduser().resolve(), spec.name)

    @property
    def base(self) -> Path:
        return self.root / self.name

    def dataset(self, name: str) -> Path:
        """The directory of a named dataset (documents, chunks, ...)."""
        return self.base / name

    def quarantine(self, stage: str) -> Path:
        return self.base / "quarantine" / stage

    @property
    def index_dir(self) -> Path:
        return self.base / "index"

    @property
    def eval_dir(self) -> Path:
        return self.base / "eval"

    @property
    def train_dir(self) -> Path:
        """Training datasets (hard negatives, pairs, dev pool) and checkpoints."""
        return self.base / "train"

    @property
    def trained_model_dir(self) -> Path:
        """The trained bi-encoder (a sentence-transformers directory)."""
        return self.base / "models" / "biencoder"

    @property
    def reranker_model_dir(self) -> Path:
        """The trained late-interaction reranker (`LateInteraction.save` layout)."""
        return self.base / "models" / "reranker"

    @property
    def trained_index_dir(self) -> Path:
        """The dense index of the trained bi-encoder (BM25 is shared with `index_dir`)."""
        return self.base / "index_trained"

    @property
    def reranker_build_dir(self) -> Path:
        """The reranker as a snapshot ships it: model, precomputed vectors, fusion weight."""
        return self.base / "reranker"

    @property
    def embedding_cache(self) -> Path:
        return self.root / "cache" / "embeddings"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.root / "mlartifacts"

    def publish_root(self, spec: PipelineSpec) -> str:
        """The snapshot root: a URI as given, else a path relative to the workspace root."""
        root = spec.publish.root
        if "://" in root or Path(root).is_absolute():
            return root
        return str(self.root / root)

    def state_path(self, stage: str) -> Path:
        return self.base / "state" / f"{stage}.json"

    def read_state(self, stage: str) -> dict[str, Any] | None:
        """The recorded state of a stage's last successful run, or None."""
        path = self.state_path(stage)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_state(self, stage: str, state: dict[str, Any]) -> None:
        """Record a stage's success atomically (temp file + rename)."""
        path = self.state_path(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2, default=str))
        os.replace(tmp, path)

    def recorded_stages(self) -> list[str]:
        """The stages with a recorded state, sorted."""
        return sorted(p.stem for p in (self.base / "state").glob("*.json"))

    def clear_state(self, stage: str) -> None:
        self.state_path(stage).unlink(missing_ok=True)
