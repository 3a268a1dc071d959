"""The extract stage: read a raw corpus into document records, quarantining what cannot be read.

`iter_documents` streams one source (BEIR folder, jsonl, Parquet, or a directory of
txt/md/html/pdf files; local or ``s3://``) and yields, in a stable order, either a document
dict matching `schemas.DOCUMENTS` exactly, or a `schemas.Rejected` naming what was wrong and
where, with the raw record kept whole. One bad record never stops the run.

Memory stays flat in the corpus size: line formats are read line by line through a 1 MiB
buffer, Parquet batch by batch, directory sources file by file. The one thing that grows is the
set of document ids seen so far (about 100 bytes per document), which duplicate-id detection
needs.

Reason codes (stable, used in the quarantine dataset): ``malformed_json``, ``invalid_utf8``,
``missing_id``, ``missing_text``, ``invalid_acl``, ``bad_acl``, ``duplicate_id``, ``unreadable_file``,
``no_text``. Empty text is *not* rejected here; the clean stage applies length bounds.

The BEIR helpers `read_queries` and `read_qrels` (used by evaluation and training) read
through the same filesystem layer, so they work on ``s3://`` too.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from corpusforge.data import fs
from corpusforge.data.hashing import content_hash
from corpusforge.data.schemas import Rejected
from corpusforge.spec import FieldMap, SourceConfig

STAGE = "extract"
JSONL_PATTERNS = ["*.jsonl", "*.jsonl.gz", "*.jsonl.zst"]
PARQUET_PATTERNS = ["*.parquet"]
PARQUET_BATCH_ROWS = 1024
TITLE_MAX_CHARS = 100  # a first line longer than this is prose, not a title
BEIR_FIELDS = FieldMap(id="_id", title="title", text="text")

_ATX_HEADING = re.compile(r"^#{1,6}\s+(.+?)(?:\s+#+)?\s*$")
_SETEXT_RULE = re.compile(r"^\s*(=+|-+)\s*$")


class _BadRecord(Exception):
    """A record-level problem, turned into a `Rejected` by the caller that knows the context."""

    def __init__(self, reason: str, detail: str, doc_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.doc_id = doc_id


@dataclass
class _Candidate:
    """A well-formed document before the duplicate-id check, with its raw record text."""

    doc: dict
    record: str


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def iter_documents(source: SourceConfig, uri: str) -> Iterator[dict | Rejected]:
    """Stream a source's documents; bad records come out as `Rejected` and the run goes on.

    Args:
        source: the spec's source section (format, field mapping, include globs, default ACL,
            S3 endpoint).
        uri: the resolved source location (``spec.source_uri``): a local path or ``s3://`` URI.
            For ``beir`` the folder holding ``corpus.jsonl`` (or that file); for ``jsonl`` and
            ``parquet`` one file or a folder searched recursively; for ``dir`` the root folder.

    Returns:
        An iterator of document dicts (the `schemas.DOCUMENTS` columns: doc_id, title, text,
        source, metadata as JSON text, acl, content_hash) and `Rejected` records, in file order.
        Of several records with the same id the first is kept; later ones are ``duplicate_id``.

    Raises:
        FileNotFoundError: the source location, the BEIR corpus file, or any file of the
            requested format is missing (a configuration error, not a bad record).
        ValueError: an unknown format.
    """
    readers = {"beir": _iter_beir, "jsonl": _iter_jsonl, "parquet": _iter_parquet, "dir": _iter_dir}
    if source.format not in readers:
        raise ValueError(f"source.format: unknown format {source.format!r}")
    seen: dict[str, bytes] = {}  # doc id -> short content digest (to word the duplicate detail)
    for item in readers[source.format](source, uri, source.s3_endpoint_url):
        if isinstance(item, Rejected):
            yield item
            continue
        doc = item.doc
        digest = content_digest(doc["content_hash"])
        first = seen.get(doc["doc_id"])
        if first is None:
            seen[doc["doc_id"]] = digest
            yield doc
            continue
        yield duplicate_id(doc, item.record, first == digest)


def content_digest(chash: str) -> bytes:
    """A short digest of a content hash: enough to tell whether two records with one id agree."""
    return hashlib.blake2b(chash.encode(), digest_size=8).digest()


def duplicate_id(doc: dict, record: str, same_content: bool) -> Rejected:
    """The ``duplicate_id`` rejection of a later record reusing an earlier record's id.

    Args:
        doc: the later record's document.
        record: its raw record text.
        same_content: whether the first record with the id had the same content hash.
    """
    same = "the same content" if same_content else "different content"
    return Rejected(STAGE, "duplicate_id", f"id {doc['doc_id']!r} was already used by an earlier "
                    f"record with {same}; the first one is kept", doc["source"], doc["doc_id"], record)


def source_files(source: SourceConfig, uri: str) -> list[fs.FileRef]:
    """The files of a source, in the order `iter_documents` reads them (the Ray engine's tasks).

    Args:
        source: the spec's source section.
        uri: the resolved source location.

    Returns:
        One `fs.FileRef` per file (a BEIR source is its ``corpus.jsonl``).

    Raises:
        FileNotFoundError: as `iter_documents`.
    """
    endpoint = source.s3_endpoint_url
    if source.format == "beir":
        corpus = _beir_corpus_uri(uri, endpoint)
        return [fs.FileRef(corpus, posixpath.basename(corpus), 0, None)]
    patterns = {"jsonl": JSONL_PATTERNS, "parquet": PARQUET_PATTERNS, "dir": source.include}
    if source.format not in patterns:
        raise ValueError(f"source.format: unknown format {source.format!r}")
    return _require_files(uri, patterns[source.format], endpoint)


def iter_file(source: SourceConfig, ref: fs.FileRef) -> Iterator[dict | Rejected | tuple[dict, str]]:
    """One file of a source, before the duplicate-id check (which needs every file).

    Args:
        source: the spec's source section.
        ref: one of `source_files`.

    Yields:
        ``(document, raw record)`` for each readable record and `Rejected` for the others, in
        file order.
    """
    endpoint = source.s3_endpoint_url
    if source.format == "beir":
        fields = BEIR_FIELDS.model_copy(update={"acl": source.fields.acl})
        items = _iter_jsonl_file(ref.uri, endpoint, fields, source.default_acl, metadata_rest=True)
    elif source.format == "jsonl":
        items = _iter_jsonl_file(ref.uri, endpoint, source.fields, source.default_acl, metadata_rest=False)
    elif source.format == "parquet":
        items = _iter_parquet_file(ref.uri, endpoint, source.fields, source.default_acl)
    else:
        items = iter([_dir_item(source, ref, endpoint)])
    for item in items:
        yield item if isinstance(item, Rejected) else (item.doc, item.record)


# ----------------------------------------------------------------------------------------------
# Record mapping (shared by beir, jsonl and parquet)
# ----------------------------------------------------------------------------------------------


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce_id(obj: dict, field: str) -> str:
    """The record's id as a string; ints are accepted (JSON ids are often numbers)."""
    value = obj.get(field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        if field not in obj:
            raise _BadRecord("missing_id", f"id field {field!r} is missing")
        raise _BadRecord("missing_id", f"id field {field!r} is {_type_name(value)}, "
                         "expected a string or an integer")
    doc_id = str(value)
    if not doc_id.strip():
        raise _BadRecord("missing_id", f"id field {field!r} is empty")
    return doc_id


def _coerce_text(obj: dict, field: str, doc_id: str) -> str:
    value = obj.get(field)
    if isinstance(value, str):
        return value
    if field not in obj:
        raise _BadRecord("missing_text", f"text field {field!r} is missing", doc_id)
    raise _BadRecord("missing_text", f"text field {field!r} is {_type_name(value)}, expected a string",
                     doc_id)


def _coerce_title(obj: dict, field: str | None) -> str:
    value = obj.get(field) if field else None
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    # A numeric or structured title is unusual but not wrong; keep it readable rather than lose it.
    return str(value) if isinstance(value, (int, float)) else _dump(value)


def _coerce_acl(obj: dict, field: str | None, default: list[str], doc_id: str) -> list[str]:
    value = obj.get(field) if field else None
    if isinstance(value, str):
        value = [value]
    if value is None or value == []:
        # An empty list is "no ACL given", not "public": only an empty default makes a record public.
        return list(default)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        # An ACL decides who may see a document: guessing at a malformed one would be a leak.
        raise _BadRecord("invalid_acl", f"acl field {field!r} is {_type_name(value)}, "
                         "expected a string or a list of strings", doc_id)
    if any(not tag.strip() for tag in value):
        # A blank tag matches no caller; whether it meant "public" or "nobody" is unknown.
        raise _BadRecord("bad_acl", f"acl field {field!r} has a blank tag: {value!r}", doc_id)
    return list(value)


def _document(doc_id: str, title: str, text: str, source: str, metadata: dict,
              acl: list[str]) -> dict:
    """One row of the documents dataset (exactly the `schemas.DOCUMENTS` columns)."""
    return {
        "doc_id": doc_id,
        "title": title,
        "text": text,
        "source": source,
        "metadata": _dump(metadata) if metadata else "{}",
        "acl": acl,
        "content_hash": content_hash(title, text),
    }


def _map_record(obj: dict, fields: FieldMap, default_acl: list[str], src: str,
                metadata_rest: bool) -> dict:
    """Map a parsed record onto a document.

    Args:
        obj: the parsed record.
        fields: which keys hold the id, title, text, ACL and metadata.
        default_acl: the ACL of records without one.
        src: the record's location, for the document's ``source``.
        metadata_rest: BEIR style: every key not mapped elsewhere goes into metadata (a nested
            ``metadata`` object is merged in rather than nested again).

    Returns:
        The document dict.

    Raises:
        _BadRecord: a missing or unusable id, text or ACL.
    """
    doc_id = _coerce_id(obj, fields.id)
    text = _coerce_text(obj, fields.text, doc_id)
    title = _coerce_title(obj, fields.title)
    acl = _coerce_acl(obj, fields.acl, default_acl, doc_id)
    if metadata_rest:
        mapped = {fields.id, fields.title, fields.text, fields.acl}
        metadata = {k: v for k, v in obj.items() if k not in mapped}
        nested = metadata.pop("metadata", None)
        if isinstance(nested, dict):
            metadata = {**nested, **metadata}
        elif nested is not None:
            metadata["metadata"] = nested
    else:
        metadata = {k: obj[k] for k in fields.metadata if k in obj}
    return _document(doc_id, title, text, src, metadata, acl)


# ----------------------------------------------------------------------------------------------
# Line formats: BEIR and jsonl
# ----------------------------------------------------------------------------------------------


def _file_rejected(uri: str, reason: str, detail: str, doc_id: str | None = None,
                   record: str = "") -> Rejected:
    """A whole-file rejection; ``source`` names the file, which stays where it is."""
    return Rejected(STAGE, reason, detail, uri, doc_id, record)


def _peek_id(text: str, field: str) -> str | None:
    """Best-effort id of a record that failed before it could be mapped (for the quarantine)."""
    try:
        obj = json.loads(text)
        value = obj.get(field) if isinstance(obj, dict) else None
    except ValueError:
        return None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _parse_line(raw: bytes, src: str, fields: FieldMap, default_acl: list[str],
                metadata_rest: bool) -> _Candidate | Rejected | None:
    """Decode, parse and map one jsonl line; None for a blank line."""
    line = raw.rstrip(b"\r\n")
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        record = line.decode("utf-8", errors="backslashreplace")
        return Rejected(STAGE, "invalid_utf8",
                        f"invalid UTF-8 at byte {exc.start} of the line ({exc.reason})", src,
                        _peek_id(line.decode("utf-8", errors="replace"), fields.id), record)
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return Rejected(STAGE, "malformed_json", f"not valid JSON: {exc}", src, None, text)
    if not isinstance(obj, dict):
        return Rejected(STAGE, "malformed_json", f"expected a JSON object, got {_type_name(obj)}",
                        src, None, text)
    try:
        return _Candidate(_map_record(obj, fields, default_acl, src, metadata_rest), text)
    except _BadRecord as bad:
        return Rejected(STAGE, bad.reason, bad.detail, src, bad.doc_id, text)


def _iter_jsonl_file(uri: str, endpoint: str | None, fields: FieldMap, default_acl: list[str],
                     metadata_rest: bool) -> Iterator[_Candidate | Rejected]:
    """Stream one jsonl file (optionally compressed) line by line."""
    try:
        stream = fs.open_binary(uri, endpoint, decompress=True)
    except OSError as exc:
        yield _file_rejected(uri, "unreadable_file", f"cannot open: {exc}")
        return
    lineno = 0
    with stream:
        try:
            for lineno, raw in enumerate(stream, start=1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark is not part of the first record
                item = _parse_line(raw, f"{uri}:{lineno}", fields, default_acl, metadata_rest)
                if item is not None:
                    yield item
        except OSError as exc:  # a truncated/corrupt compressed stream, a dropped connection
            yield _file_rejected(uri, "unreadable_file", f"read failed after line {lineno}: {exc}")


def _beir_corpus_uri(uri: str, endpoint: str | None) -> str:
    if fs.is_file(uri, endpoint):
        return uri
    corpus = fs.join(uri, "corpus.jsonl")
    if not fs.exists(corpus, endpoint):
        raise FileNotFoundError(f"{corpus}: BEIR corpus not found (source.format is 'beir')")
    return corpus


def _iter_beir(source: SourceConfig, uri: str, endpoint: str | None) -> Iterator[_Candidate | Rejected]:
    """BEIR ``corpus.jsonl``: ``_id``, ``title``, ``text``; any other key goes into metadata."""
    fields = BEIR_FIELDS.model_copy(update={"acl": source.fields.acl})
    yield from _iter_jsonl_file(_beir_corpus_uri(uri, endpoint), endpoint, fields,
                                source.default_acl, metadata_rest=True)


def _require_files(uri: str, patterns: list[str], endpoint: str | None) -> list[fs.FileRef]:
    refs = fs.list_files(uri, patterns, endpoint)
    if not refs:
        raise FileNotFoundError(f"{uri}: no files matching {', '.join(patterns)}")
    return refs


def _iter_jsonl(source: SourceConfig, uri: str, endpoint: str | None) -> Iterator[_Candidate | Rejected]:
    """A jsonl file, or every ``*.jsonl`` (also ``.gz`` / ``.zst``) under a folder, in path order."""
    for ref in _require_files(uri, JSONL_PATTERNS, endpoint):
        yield from _iter_jsonl_file(ref.uri, endpoint, source.fields, source.default_acl,
                                    metadata_rest=False)


# ----------------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------------


def _iter_parquet_file(uri: str, endpoint: str | None, fields: FieldMap,
                       default_acl: list[str]) -> Iterator[_Candidate | Rejected]:
    """Stream one Parquet file in record batches; ``source`` is ``<file>#row=<n>`` (0-based)."""
    import pyarrow.parquet as pq

    try:
        handle = fs.open_input_file(uri, endpoint)
    except OSError as exc:
        yield _file_rejected(uri, "unreadable_file", f"cannot open: {exc}")
        return
    try:
        parquet = pq.ParquetFile(handle)
    except (OSError, pa.ArrowException) as exc:
        handle.close()
        yield _file_rejected(uri, "unreadable_file", f"not a readable Parquet file: {exc}")
        return
    wanted = [fields.id, fields.title, fields.text, fields.acl, *fields.metadata]
    present = [c for c in dict.fromkeys(w for w in wanted if w) if c in parquet.schema_arrow.names]
    row = 0
    with handle:
        try:
            # All columns are read so a rejected row can be quarantined whole; only the mapped
            # ones are converted to Python objects for the good rows.
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                columns = {name: batch.column(name).to_pylist() for name in present}
                for i in range(batch.num_rows):
                    src = f"{uri}#row={row}"
                    row += 1
                    obj = {name: values[i] for name, values in columns.items()}
                    try:
                        doc = _map_record(obj, fields, default_acl, src, metadata_rest=False)
                    except _BadRecord as bad:
                        record = _dump(batch.slice(i, 1).to_pylist()[0])
                        yield Rejected(STAGE, bad.reason, bad.detail, src, bad.doc_id, record)
                        continue
                    yield _Candidate(doc, _dump(obj))
        except (OSError, pa.ArrowException) as exc:
            yield _file_rejected(uri, "unreadable_file", f"read failed at row {row}: {exc}")


def _iter_parquet(source: SourceConfig, uri: str, endpoint: str | None) -> Iterator[_Candidate | Rejected]:
    """A Parquet file, or every ``*.parquet`` under a folder, in path order."""
    for ref in _require_files(uri, PARQUET_PATTERNS, endpoint):
        yield from _iter_parquet_file(ref.uri, endpoint, source.fields, source.default_acl)


# ----------------------------------------------------------------------------------------------
# Directory of documents: txt / md / html / pdf
# ----------------------------------------------------------------------------------------------


def split_title(text: str, fallback: str) -> tuple[str, str]:
    """Find a plain-text or Markdown document's title and the body that follows it.

    The title is the first non-blank line when it is a Markdown heading (``# Title`` or a
    ``===`` / ``---`` underlined one), or when it is short (at most 100 characters) and stands
    alone as a paragraph; that line is then removed from the body. Otherwise the title is the
    first ``#`` heading further down (body unchanged), else `fallback`. A title line is never
    taken when nothing would be left as the body.

    Args:
        text: the whole document.
        fallback: the title to use when none is found (the file stem).

    Returns:
        ``(title, body)``.
    """
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return fallback, text
    head = lines[first].strip()
    after = lines[first + 1].strip() if first + 1 < len(lines) else ""
    title, skip = None, 0
    if (m := _ATX_HEADING.match(head)):
        title, skip = m.group(1), 1
    elif after and _SETEXT_RULE.match(after) and len(head) <= TITLE_MAX_CHARS:
        title, skip = head, 2
    elif len(head) <= TITLE_MAX_CHARS and not after and first + 1 < len(lines):
        title, skip = head, 1
    if title is not None:
        body = "".join(lines[first + skip:]).lstrip("\r\n")
        if body.strip():
            return title, body
    for line in lines[first + 1:]:
        if (m := _ATX_HEADING.match(line.strip())):
            return m.group(1), text
    return (title or fallback), text


def _stem(relpath: str) -> str:
    return posixpath.splitext(posixpath.basename(relpath))[0]


def _suffix(relpath: str) -> str:
    """The lower-cased extension of the file name, with its dot ("" when none)."""
    return posixpath.splitext(posixpath.basename(relpath))[1].lower()


def _text_file(data: bytes, ref: fs.FileRef, acl: list[str]) -> dict | Rejected:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return _file_rejected(ref.uri, "invalid_utf8", f"invalid UTF-8 at byte {exc.start} ({exc.reason})",
                              ref.relpath, data.decode("utf-8", errors="backslashreplace"))
    title, body = split_title(text, _stem(ref.relpath))
    fmt = _suffix(ref.relpath).lstrip(".") or "txt"
    return _document(ref.relpath, title, body, ref.uri, {"path": ref.relpath, "format": fmt}, acl)


def _html_file(data: bytes, ref: fs.FileRef, acl: list[str]) -> dict | Rejected:
    import trafilatura
    from trafilatura.utils import load_html

    tree = load_html(data)  # detects the page's encoding
    if tree is None:
        return _file_rejected(ref.uri, "unreadable_file", "not parseable as HTML", ref.relpath,
                              data.decode("utf-8", errors="backslashreplace"))
    page_title = " ".join((tree.findtext(".//title") or "").split())
    # trafilatura keeps the main content and drops navigation, footers and other boilerplate.
    text = trafilatura.extract(tree, include_comments=False, include_tables=True) or ""
    if not text.strip():
        return _file_rejected(ref.uri, "no_text", "no main text could be extracted from the page",
                              ref.relpath, data.decode("utf-8", errors="backslashreplace"))
    return _document(ref.relpath, page_title or _stem(ref.relpath), text, ref.uri,
                     {"path": ref.relpath, "format": "html"}, acl)


def _pdf_file(data: bytes, ref: fs.FileRef, acl: list[str]) -> dict | Rejected:
    import pypdf

    # pypdf raises many exception types on damaged files; any of them means "cannot read this
    # file", and one bad file must not stop the run.
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            return _file_rejected(ref.uri, "unreadable_file", "encrypted PDF (password required)",
                                  ref.relpath)
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except Exception as exc:  # noqa: BLE001 - see above
        return _file_rejected(ref.uri, "unreadable_file", f"unreadable PDF: {type(exc).__name__}: {exc}",
                              ref.relpath)
    text = "\n\n".join(p for p in pages if p)
    if not text:
        return _file_rejected(ref.uri, "no_text", f"no extractable text in {len(pages)} page(s) "
                              "(scanned images need OCR)", ref.relpath)
    try:
        title = ((reader.metadata or {}).get("/Title") or "").strip()
    except Exception:  # noqa: BLE001 - a broken info dictionary only costs the title
        title = ""
    return _document(ref.relpath, str(title) or _stem(ref.relpath), text, ref.uri,
                     {"path": ref.relpath, "format": "pdf", "pages": len(pages)}, acl)


_FILE_READERS = {".html": _html_file, ".htm": _html_file, ".pdf": _pdf_file}


def _iter_dir(source: SourceConfig, uri: str, endpoint: str | None) -> Iterator[_Candidate | Rejected]:
    """Every file matching ``source.include`` under the root, one document per file.

    doc_id is the path relative to the root; .html/.htm and .pdf have their own readers, every
    other included file is read as UTF-8 plain text / Markdown.
    """
    for ref in _require_files(uri, source.include, endpoint):
        yield _dir_item(source, ref, endpoint)


def _dir_item(source: SourceConfig, ref: fs.FileRef, endpoint: str | None) -> _Candidate | Rejected:
    """One file of a ``dir`` source as one document."""
    try:
        data = fs.read_bytes(ref.uri, endpoint)
    except OSError as exc:
        return _file_rejected(ref.uri, "unreadable_file", f"cannot read: {exc}", ref.relpath)
    reader = _FILE_READERS.get(_suffix(ref.relpath), _text_file)
    item = reader(data, ref, list(source.default_acl))
    return item if isinstance(item, Rejected) else _Candidate(item, "")


# ----------------------------------------------------------------------------------------------
# BEIR queries and qrels
# ----------------------------------------------------------------------------------------------


def read_queries(uri: str, endpoint_url: str | None = None) -> dict[str, str]:
    """Read BEIR queries (``queries.jsonl``: ``_id``, ``text``).

    Args:
        uri: the BEIR folder (local or ``s3://``), or the queries file itself.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).

    Returns:
        query id -> query text, in file order.

    Raises:
        FileNotFoundError: no queries file.
        ValueError: a line that is not a JSON object with a string ``_id``/``text`` (the message
            names file and line).
    """
    path = uri if fs.is_file(uri, endpoint_url) else fs.join(uri, "queries.jsonl")
    queries: dict[str, str] = {}
    with fs.open_binary(path, endpoint_url, decompress=True) as stream:
        for lineno, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                qid, text = obj["_id"], obj["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a BEIR query record ({exc})") from None
            if not isinstance(text, str) or isinstance(qid, bool) or not isinstance(qid, (str, int)):
                raise ValueError(f"{path}:{lineno}: _id must be a string/integer and text a string")
            queries[str(qid)] = text
    return queries


def read_qrels(uri: str, split: str, endpoint_url: str | None = None) -> dict[str, dict[str, int]]:
    """Read BEIR relevance judgments (``qrels/<split>.tsv``).

    Lines are ``query-id  corpus-id  score`` (tab or space separated; a TREC ``qid 0 docid score``
    line is accepted too). A header line is skipped.

    Args:
        uri: the BEIR folder (local or ``s3://``).
        split: ``train``, ``dev`` or ``test``.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).

    Returns:
        query id -> {corpus id -> integer relevance}.

    Raises:
        FileNotFoundError: no such qrels file.
        ValueError: a malformed line (the message names file and line).
    """
    path = fs.join(uri, "qrels", f"{split}.tsv")
    qrels: dict[str, dict[str, int]] = {}
    with fs.open_binary(path, endpoint_url) as stream:
        for lineno, raw in enumerate(stream, start=1):
            parts = raw.decode("utf-8").split()
            if not parts:
                continue
            if len(parts) == 4:
                parts = [parts[0], parts[2], parts[3]]
            try:
                if len(parts) != 3:
                    raise ValueError(f"expected 3 columns, got {len(parts)}")
                qid, did, score = parts[0], parts[1], int(parts[2])
            except ValueError as exc:
                if lineno == 1:
                    continue  # the header (query-id corpus-id score)
                raise ValueError(f"{path}:{lineno}: malformed qrels line ({exc})") from None
            qrels.setdefault(qid, {})[did] = score
    return qrels
