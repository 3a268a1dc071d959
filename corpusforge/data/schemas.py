"""Arrow schemas of every dataset the pipeline writes: the data contracts between stages.

`schemas/*.json` in the repository is generated from these (``python -m corpusforge.data.schemas``)
so the contracts can be read without Python.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

DOCUMENTS = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),  # a JSON object, kept as text
        pa.field("acl", pa.list_(pa.string()), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
    ],
    metadata={"dataset": "documents"},
)

QUARANTINE = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=True),
        pa.field("record", pa.string(), nullable=False),
    ],
    metadata={"dataset": "quarantine"},
)

CHUNKS = pa.schema(
    [
        pa.field("chunk_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("ordinal", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("char_start", pa.int64(), nullable=False),
        pa.field("char_end", pa.int64(), nullable=False),
        pa.field("acl", pa.list_(pa.string()), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),
    ],
    metadata={"dataset": "chunks"},
)


def embeddings_schema(dim: int) -> pa.Schema:
    """Schema of an embeddings shard: chunk ids and fixed-size float32 vectors.

    Args:
        dim: the vector dimension.

    Returns:
        The Arrow schema.
    """
    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata={"dataset": "embeddings", "dim": str(dim)},
    )


SCHEMAS: dict[str, pa.Schema] = {"documents": DOCUMENTS, "quarantine": QUARANTINE, "chunks": CHUNKS}


@dataclass(frozen=True)
class Rejected:
    """A record a stage refused, with why. Becomes one row of the quarantine dataset.

    Attributes:
        stage: the stage that refused it (extract, clean, chunk).
        reason: a short stable code, e.g. ``malformed_json`` or ``near_duplicate``.
        detail: a human-readable explanation.
        source: where the record came from (file and line, or object key).
        doc_id: the record's id when one could be read.
        record: the raw record as text, kept whole so nothing is lost.
    """

    stage: str
    reason: str
    detail: str
    source: str
    doc_id: str | None
    record: str

    def as_row(self) -> dict:
        return asdict(self)


def schema_to_json(schema: pa.Schema) -> dict:
    """A language-neutral description of an Arrow schema (name, type, nullable per field)."""
    return {
        "dataset": (schema.metadata or {}).get(b"dataset", b"").decode(),
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


def write_schema_files(out_dir: str | Path) -> list[Path]:
    """Write `<name>.schema.json` for every dataset schema into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in {**SCHEMAS, "embeddings": embeddings_schema(384)}.items():
        path = out / f"{name}.schema.json"
        path.write_text(json.dumps(schema_to_json(schema), indent=2) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - regeneration helper
    for p in write_schema_files(Path(__file__).resolve().parents[2] / "schemas"):
        print(p)
