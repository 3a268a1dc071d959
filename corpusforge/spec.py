"""The pipeline spec: one typed, validated description of a pipeline, loaded from YAML.

Every consumer (CLI, Dagster, Airflow, the snapshot manifest) reads the same `PipelineSpec`.
Relative paths inside a spec resolve against the spec file's own directory, so a spec behaves
the same whatever the current directory is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corpusforge.snapshots.manifest import check_name


class SpecError(ValueError):
    """A pipeline spec that cannot be loaded: names the file, the field and the reason."""

    def __init__(self, path: str | Path, problems: list[tuple[str, str]]):
        self.path = str(path)
        self.problems = problems
        lines = [f"{self.path}: invalid pipeline spec"]
        lines += [f"  - {field}: {reason}" for field, reason in problems]
        super().__init__("\n".join(lines))


class _Section(BaseModel):
    """Base for spec sections: unknown keys are errors, so a typo never passes silently.

    Defaults are validated too, so a `float` field defaulting to ``0`` holds ``0.0``: a spec that
    reaches an orchestrator as JSON comes back with the same types and writes the same files.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class FieldMap(_Section):
    """Which fields of a jsonl / Parquet record hold the document's parts."""

    id: str = "_id"
    title: str | None = "title"
    text: str = "text"
    acl: str | None = None
    metadata: list[str] = Field(default_factory=list, description="fields copied into metadata")


class SourceConfig(_Section):
    """Where the raw corpus lives and how to read it."""

    format: Literal["beir", "jsonl", "parquet", "dir"]
    path: str = Field(description="local path (relative to the spec file) or s3://bucket/prefix")
    fields: FieldMap = Field(default_factory=FieldMap)
    include: list[str] = Field(
        default_factory=lambda: ["*.txt", "*.md", "*.html", "*.htm", "*.pdf"],
        description="glob patterns for format=dir",
    )
    default_acl: list[str] = Field(
        default_factory=list,
        description="ACL tags of records whose ACL is missing, null or empty ([] or no field); a record is "
                    "public only when both are empty. A blank tag in a record quarantines it (bad_acl)")
    s3_endpoint_url: str | None = Field(default=None, description="S3 API endpoint (MinIO, moto, ...)")
    fetch: str | None = Field(
        default=None,
        description="a dataset of `corpusforge datasets list` that `corpusforge run` downloads (pinned "
                    "digests, cached under the workspace) into the local `path` when that path is absent")

    @field_validator("default_acl")
    @classmethod
    def _acl_tags(cls, v: list[str]) -> list[str]:
        if any(not tag.strip() for tag in v):
            raise ValueError("ACL tags must not be blank (an empty tag matches no caller and hides intent)")
        return v

    @model_validator(mode="after")
    def _fetchable(self) -> "SourceConfig":
        if self.fetch is None:
            return self
        from corpusforge.data.benchmarks import DATASETS

        entry = DATASETS.get(self.fetch)
        if entry is None:
            raise ValueError(f"fetch: unknown dataset {self.fetch!r} (known: {', '.join(sorted(DATASETS))})")
        if "://" in self.path:
            raise ValueError("fetch needs a local path to download into, not a URI")
        if entry.format != self.format:
            raise ValueError(f"fetch: {self.fetch!r} is read with format {entry.format!r}, not {self.format!r}")
        return self


class NearDuplicateConfig(_Section):
    enabled: bool = True
    threshold: float = Field(default=0.95, gt=0.0, le=1.0, description="estimated Jaccard similarity")
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle_size: int = Field(default=5, ge=1, le=32, description="word n-gram size")


class PiiConfig(_Section):
    emails: bool = False
    phones: bool = False


class CleanConfig(_Section):
    """Text repair, normalisation, deduplication and length bounds."""

    fix_unicode: bool = True
    normalization: Literal["NFC", "NFKC", "none"] = "NFKC"
    collapse_whitespace: bool = True
    dedup_exact: bool = True
    near_duplicates: NearDuplicateConfig = Field(default_factory=NearDuplicateConfig)
    min_chars: int = Field(default=1, ge=0)
    max_chars: int = Field(default=1_000_000, gt=0)
    pii: PiiConfig = Field(default_factory=PiiConfig)

    @model_validator(mode="after")
    def _bounds(self) -> "CleanConfig":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        return self


class ChunkConfig(_Section):
    """Token-aware recursive chunking with the embedding model's tokenizer."""

    max_tokens: int = Field(default=256, ge=8, description="budget including special tokens")
    overlap_tokens: int = Field(default=32, ge=0)
    include_title: bool = True

    @model_validator(mode="after")
    def _overlap(self) -> "ChunkConfig":
        if self.overlap_tokens >= self.max_tokens // 2:
            raise ValueError("overlap_tokens must be less than half of max_tokens")
        return self


class ModelConfig(_Section):
    """The embedding model. `default` is the packaged all-MiniLM-L6-v2."""

    name: str = Field(default="default", description="'default', or a sentence-transformers/HF model dir")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    batch_size: int = Field(default=64, ge=1)
    max_seq_length: int = Field(default=256, ge=8)
    normalize: bool = True
    query_prefix: str = ""
    passage_prefix: str = ""


class DenseIndexConfig(_Section):
    factory: str = Field(default="auto", description="'auto' or a FAISS factory string, e.g. HNSW32,Flat")
    shards: int = Field(default=1, ge=1)
    memory_budget_mb: int = Field(default=4096, gt=0)
    hnsw_ef_search: int = Field(default=128, ge=1)
    ivf_nprobe: int = Field(default=32, ge=1)
    train_sample: int = Field(default=100_000, ge=1000)
    recall_sample_queries: int = Field(default=200, ge=1)


class Bm25Config(_Section):
    k1: float = Field(default=1.2, gt=0)
    b: float = Field(default=0.75, ge=0, le=1)
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
    stopwords: str | None = "en"
    stemmer: str | None = Field(default="english", description="a PyStemmer (Snowball) language, or null")


class QueryTowerConfig(_Section):
    """A shallower query encoder distilled from the model (see `corpusforge.encoding.query_tower`)."""

    enabled: bool = False
    layers: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1,
                              description="the model's layers (0-based) the tower keeps and starts from")
    steps: int = Field(default=800, ge=1)
    batch_size: int = Field(default=32, ge=2)
    learning_rate: float = Field(default=2e-4, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    hidden_weight: float = Field(default=1.0, ge=0, description="weight of the per-layer token-state loss")
    max_length: int = Field(default=64, ge=8, description="training texts are cut to this many tokens")
    max_texts: int = Field(default=100_000, ge=100, description="corpus sentences sampled for training")
    holdout: int = Field(default=512, ge=0, description="sentences kept out to measure agreement")
    seed: int = 13
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 = leave as is")
    max_train_seconds: float = Field(default=0, ge=0, description="time guard on distillation (the recipe is `steps`); "
                                     "0 = none")
    on_budget: Literal["fail", "stop"] = Field(default="fail", description="at the guard: fail, or stop and record "
                                               "the tower as truncated")


class IndexConfig(_Section):
    dense: DenseIndexConfig = Field(default_factory=DenseIndexConfig)
    bm25: Bm25Config = Field(default_factory=Bm25Config)
    query_tower: QueryTowerConfig = Field(default_factory=QueryTowerConfig)


class SearchConfig(_Section):
    fusion: Literal["rrf", "weighted"] = "rrf"
    rrf_k: int = Field(default=60, ge=1)
    dense_weight: float = Field(default=0.5, ge=0, le=1, description="weight of dense in weighted fusion")
    candidates: int = Field(default=200, ge=1, description="per-mode depth fed into fusion")


class EvaluateConfig(_Section):
    split: str = "test"
    modes: list[Literal["bm25", "dense", "hybrid"]] = Field(default_factory=lambda: ["bm25", "dense", "hybrid"])
    k: int = Field(default=100, ge=10)
    max_queries: int | None = Field(default=None, ge=1)


class TrainConfig(_Section):
    enabled: bool = False
    dev_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 13
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=2)
    learning_rate: float = Field(default=2e-5, gt=0)
    temperature: float = Field(default=0.05, gt=0)
    hard_negatives: int = Field(default=4, ge=0)
    margin: float = Field(default=0.95, gt=0, le=1)
    # Optional training fields (added for corpusforge.train; defaults keep older specs valid).
    negatives_per_example: int = Field(default=1, ge=0, description="mined negatives used per training example")
    mining_depth: int = Field(default=30, ge=1, description="candidate docs per source when mining")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_query_length: int = Field(default=64, ge=8)
    max_passage_length: int = Field(default=256, ge=16)
    separate_towers: bool = False
    grad_cache_chunk: int = Field(default=0, ge=0, description="gradient-caching chunk size; 0 = off")
    checkpoint_every: int = Field(default=50, ge=0)
    max_steps: int = Field(default=0, ge=0, description="cap on optimiser steps; 0 = none")
    max_train_seconds: float = Field(default=0, ge=0, description="time guard on bi-encoder training (the recipe is "
                                     "epochs/max_steps); 0 = none")
    on_budget: Literal["fail", "stop"] = Field(default="fail", description="at the guard: fail the stage, or stop and "
                                               "mark the model truncated")
    dev_pool_depth: int = Field(default=20, ge=1, description="BM25/dense docs per dev query in the dev pool")
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 = leave as is")
    registered_model: str | None = Field(default=None, description="MLflow model name prefix; default spec name")
    reranker: "RerankerTrainConfig" = Field(default_factory=lambda: RerankerTrainConfig())


class RerankerTrainConfig(_Section):
    """The ColBERT-style late-interaction reranker trained by `corpusforge train`."""

    enabled: bool = True
    init: Literal["base", "biencoder"] = Field(default="base", description="start from MiniLM or the trained bi-encoder")
    dim: int = Field(default=128, ge=8)
    query_length: int = Field(default=32, ge=8)
    doc_length: int = Field(default=180, ge=16)
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=2)
    learning_rate: float = Field(default=3e-5, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    hard_negatives: int = Field(default=1, ge=0)
    distill_weight: float = Field(default=0.0, ge=0)
    depth: int = Field(default=100, ge=1, description="first-stage hits reranked")
    precompute: bool = True
    max_train_seconds: float = Field(default=0, ge=0, description="time guard on reranker training (the recipe is "
                                     "epochs); 0 = none")
    on_budget: Literal["fail", "stop"] = Field(default="fail", description="at the guard: fail the stage, or stop and "
                                               "mark the reranker truncated")


TrainConfig.model_rebuild()


class TrackingConfig(_Section):
    uri: str | None = Field(default=None, description="MLflow tracking URI; default sqlite in the workspace")
    experiment: str | None = None


class PublishConfig(_Section):
    root: str = Field(default="snapshots", description="local dir (relative to the workspace) or s3://...")
    index_name: str | None = None
    alias: str = "production"
    s3_endpoint_url: str | None = None
    promote: Literal["always", "on_improvement"] = Field(
        default="always", description="move `alias` to every new snapshot, or only when its dev metric beats the "
                                      "version the alias points at now (the dev split is carved from the training "
                                      "judgments; a build truncated by a time budget never moves it)")
    promote_metric: Literal["ndcg@10", "recall@100", "mrr@10", "map"] = Field(
        default="ndcg@10", description="the dev metric (best over the evaluated modes) that on_improvement compares")
    candidate_alias: str = Field(default="candidate",
                                 description="with on_improvement, every new version gets this alias")

    # The snapshot store's own rule, so a spec that loads can publish (a name is a path component).
    @field_validator("index_name")
    @classmethod
    def _index_name(cls, v: str | None) -> str | None:
        return v if v is None else check_name("index name", v)

    @field_validator("alias", "candidate_alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        return check_name("alias", v)


class ExecutionConfig(_Section):
    """Where the stages run: in this process (``local``) or on a Ray cluster (``ray``).

    The engine never changes a stage's output, so it is not part of any stage fingerprint: a
    workspace built locally is up to date for a Ray run of the same spec, and vice versa.
    """

    engine: Literal["local", "ray"] = "local"
    address: str | None = Field(
        default=None, description="ray: a cluster address (ray://host:10001, host:6379 or 'auto'); "
                                  "none starts a local Ray in this process")
    rows_per_task: int = Field(default=65_536, ge=1,
                               description="ray: input rows per task, and so per output file of the data stages")
    embed_actors: int = Field(default=0, ge=0,
                              description="ray: embedding actors; 0 = one per GPU when the cluster has GPUs, "
                                          "else one per CPU (at most 8)")
    embed_block_texts: int = Field(default=16_384, ge=1,
                                   description="ray: distinct texts per encoding task; at the default (the local "
                                               "engine's block) the vectors are bitwise the local engine's")
    num_cpus: int | None = Field(default=None, ge=1, description="ray, no address: CPUs of the local Ray")
    object_store_mb: int | None = Field(default=None, ge=64,
                                        description="ray, no address: object store of the local Ray")
    jobs_address: str | None = Field(
        default=None, pattern=r"^https?://",
        description="a Ray Jobs API address (the head's dashboard, http://head:8265): Airflow tasks submit each "
                    "stage there as a Ray job instead of running it in the worker (paths must be the same on both)")


class PipelineSpec(_Section):
    """A whole pipeline. `base_dir` is the spec file's folder; relative paths resolve from it."""

    name: str = Field(description="the workspace folder, and the index name unless publish.index_name is set")
    description: str = ""
    source: SourceConfig
    clean: CleanConfig = Field(default_factory=CleanConfig)
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    workspace: str | None = Field(default=None, description="default: ./workspace in the current dir")
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name("pipeline name", v)

    @field_validator("source")
    @classmethod
    def _source_path(cls, v: SourceConfig) -> SourceConfig:
        if not v.path.strip():
            raise ValueError("source.path must not be empty")
        scheme = v.path.split("://", 1)[0] if "://" in v.path else None
        if scheme not in (None, "file", "s3", "s3a"):
            raise ValueError(f"source.path: unsupported URI scheme '{scheme}' (use a local path or s3://)")
        return v

    def resolve(self, path: str) -> str:
        """Resolve a path from the spec against the spec's folder (URIs pass through).

        Args:
            path: a local path or a URI such as ``s3://bucket/key``.

        Returns:
            An absolute local path, or the URI unchanged.
        """
        if "://" in path:
            return path
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (Path(self.base_dir) / p).resolve())

    @property
    def source_uri(self) -> str:
        return self.resolve(self.source.path)

    def report(self) -> dict[str, Any]:
        """The spec as plain data, for params, manifests and `--help`-style reporting."""
        return self.model_dump(mode="json")


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def load_spec(path: str | Path) -> PipelineSpec:
    """Load and validate a pipeline spec from YAML.

    Args:
        path: the YAML file.

    Returns:
        The validated spec, with ``base_dir`` set to the file's folder.

    Raises:
        SpecError: the file is missing, is not YAML, or fails validation; the message names the
            file, each offending field and the reason.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(path, [("<file>", "file not found")]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpecError(path, [("<file>", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise SpecError(path, [("<root>", "expected a mapping at the top level")])
    raw = {**raw, "base_dir": str(path.resolve().parent)}
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            reason = err["msg"]
            if err["type"] == "extra_forbidden":
                reason = "unknown field (check the spelling)"
            problems.append((_field_path(err["loc"]), reason))
        raise SpecError(path, problems) from None


def discover_specs(pipelines_dir: str | Path) -> dict[str, Path]:
    """The pipeline specs of a folder: ``{file stem: path}`` for every ``*.yaml``, sorted by stem.

    Args:
        pipelines_dir: the folder holding ``<name>.yaml`` specs.

    Returns:
        Stem -> spec path (stems are the orchestrators' partition keys and DAG names).

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    folder = Path(pipelines_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipelines folder {folder} does not exist")
    return {p.stem: p.resolve() for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stem)}


def check_unique_names(pipelines_dir: str | Path) -> dict[str, str]:
    """Load every spec of a folder and fail when two share a ``name`` (hence a workspace and an index).

    Args:
        pipelines_dir: the folder holding ``<name>.yaml`` specs.

    Returns:
        ``{spec name: file stem}``.

    Raises:
        SpecError: a spec does not load, or two specs share a name (the message names both files).
    """
    seen: dict[str, str] = {}
    for stem, path in discover_specs(pipelines_dir).items():
        name = load_spec(path).name
        if name in seen:
            raise SpecError(path, [("name", f"{name!r} is also the name of {seen[name]}.yaml; names must be unique "
                                    "(each spec has its own workspace folder and index; specs share work through "
                                    "the caches, not a name)")])
        seen[name] = stem
    return seen


@dataclass(frozen=True)
class Overrides:
    """Per-environment settings applied on top of a spec (None keeps the spec's own value).

    Attributes:
        tracking_uri: MLflow tracking URI (spec ``tracking.uri``).
        experiment: MLflow experiment (spec ``tracking.experiment``).
        device: ``auto``, ``cpu`` or ``cuda`` (spec ``model.device``).
        publish_root: snapshot root, a local folder or ``s3://bucket/prefix`` (spec ``publish.root``).
        s3_endpoint_url: S3 endpoint for the publish root (spec ``publish.s3_endpoint_url``).
        ray_jobs_address: Ray Jobs API address (spec ``execution.jobs_address``).
    """

    tracking_uri: str | None = None
    experiment: str | None = None
    device: str | None = None
    publish_root: str | None = None
    s3_endpoint_url: str | None = None
    ray_jobs_address: str | None = None

    # The environment variables `from_env` reads (the Dagster resources read the same names).
    ENV = {"tracking_uri": "CORPUSFORGE_MLFLOW_TRACKING_URI", "experiment": "CORPUSFORGE_MLFLOW_EXPERIMENT",
           "device": "CORPUSFORGE_DEVICE", "publish_root": "CORPUSFORGE_PUBLISH_ROOT",
           "s3_endpoint_url": "CORPUSFORGE_S3_ENDPOINT_URL", "ray_jobs_address": "CORPUSFORGE_RAY_JOBS_ADDRESS"}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Overrides":
        """The overrides set in an environment (unset or empty variables keep the spec's values).

        Args:
            environ: e.g. ``os.environ``.

        Returns:
            The overrides.
        """
        return cls(**{field: environ.get(var) or None for field, var in cls.ENV.items()})


def apply_overrides(spec: "PipelineSpec", overrides: Overrides) -> "PipelineSpec":
    """A copy of `spec` with the overrides set (validated again, so a bad value is an error).

    Args:
        spec: the loaded spec.
        overrides: the environment's settings.

    Returns:
        The spec to run.
    """
    data = spec.model_dump(mode="json")
    data["base_dir"] = spec.base_dir  # excluded from dumps, needed to resolve relative paths
    if overrides.tracking_uri:
        data["tracking"]["uri"] = overrides.tracking_uri
    if overrides.experiment:
        data["tracking"]["experiment"] = overrides.experiment
    if overrides.device:
        data["model"]["device"] = overrides.device
    if overrides.publish_root:
        data["publish"]["root"] = overrides.publish_root
    if overrides.s3_endpoint_url:
        data["publish"]["s3_endpoint_url"] = overrides.s3_endpoint_url
    if overrides.ray_jobs_address:
        data["execution"]["jobs_address"] = overrides.ray_jobs_address
    return PipelineSpec.model_validate(data)


def with_alias(spec: "PipelineSpec", alias: str) -> "PipelineSpec":
    """A copy of `spec` publishing under another alias (validated again, so a bad name is an error).

    Args:
        spec: the spec.
        alias: the alias ``publish`` moves (with ``promote: on_improvement``, only when dev improves).

    Returns:
        The spec to run.
    """
    data = spec.model_dump(mode="json")
    data["base_dir"] = spec.base_dir
    data["publish"]["alias"] = alias
    return PipelineSpec.model_validate(data)
