"""Token-aware recursive chunking with the embedding model's own tokenizer.

The splitter follows LangChain's ``RecursiveCharacterTextSplitter`` with a token length function:
a span that is over budget is split on paragraph breaks, a part still over budget on sentence
ends, then on words, and a single enormous word on token boundaries; the resulting pieces are
merged greedily into chunks, and consecutive chunks share about ``overlap_tokens`` tokens.

Unlike a splitter that re-tokenises candidate strings in a loop, every document is tokenised
once (in batches, with offsets, by the Rust fast tokenizer): pieces are ranges of token indices,
so lengths are subtractions, and the character spans come from the offsets.

The stored ``n_tokens`` is a contract: it must equal ``len(tokenizer(text)["input_ids"])`` of the
final text. Cuts fall at whitespace between tokens; for tokenizers whose normaliser and
pre-tokeniser never look across whitespace (BERT WordPiece, the default model's), the count of a
text cut there is exactly its token range plus the title's tokens plus the special tokens. Every
chunk whose count is not exact by construction (a cut inside an enormous word, a title cut
inside a word, any other kind of tokenizer) is re-tokenised, and a document with a chunk over
budget is planned again with a smaller budget until all fit. ``verify="all"`` re-tokenises every
chunk (the tests check both modes agree, and every SciFact count against the tokenizer).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from corpusforge.data.hashing import chunk_id as make_chunk_id
from corpusforge.spec import ChunkConfig

# Boundary strengths: a cut before token t is preferred the stronger its boundary is.
TOKEN, WORD, SENTENCE, PARAGRAPH, EDGE = 0, 1, 2, 3, 4

_PARAGRAPH_RE = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_LINE_RE = re.compile(r"\n\s*")
# A sentence ends with . ! ? (and closing quotes/brackets), then whitespace, then something that
# can open a sentence. Decimals ("3.5") never match because no whitespace follows the point.
_SENTENCE_RE = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    """e.g. i.e. et al. al. fig. figs. eq. eqs. ref. refs. no. nos. vs. cf. dr. mr. mrs. ms.
    prof. st. approx. ca. vol. pp. p. tab. sect. sec. ch. inc. ltd. co. jr. sr. u.s. u.k. e.u.
    resp. viz. ed. eds. est. dept. univ. min. max. mol. wt. var. spp. sp. subsp.""".split()
)
_MAX_REPLANS = 12
# Unicode White_Space: what the Rust tokenizers' pre-tokenizers split on.
_WHITESPACE = np.array([9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
                        0x2029, 0x202F, 0x205F, 0x3000], dtype=np.uint32)
_IS_WHITESPACE = np.zeros(int(_WHITESPACE.max()) + 2, dtype=bool)  # last slot: "beyond", False
_IS_WHITESPACE[_WHITESPACE] = True
# Tokenizer components under which tokenisation never looks across whitespace: for them, a text
# cut at whitespace has exactly as many tokens as the corresponding token range.
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents",
                      "Strip", "Sequence"}
_LOCAL_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation",
                         "Digits", "Sequence"}


@dataclass
class _Tokens:
    """One text's tokenisation: character offsets per token (no special tokens)."""

    starts: np.ndarray
    ends: np.ndarray

    @property
    def n(self) -> int:
        return int(self.starts.shape[0])


@dataclass
class _Plan:
    """A document's chunks as token ranges of its body, plus the (possibly truncated) title."""

    title: str
    title_tokens: int
    title_exact: bool
    ranges: list[tuple[int, int]]
    exact: bool  # counts follow from the token ranges without re-tokenising


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the period at `dot` closes an abbreviation or an initial rather than a sentence."""
    start = max(text.rfind(" ", max(0, dot - 32), dot), text.rfind("\n", max(0, dot - 32), dot)) + 1
    word = text[start : dot + 1].lstrip("([{\"'\u201c\u2018").lower()
    # A lone initial ("J. Smith") is not treated as an abbreviation: "vitamin D." ends sentences
    # far more often in this kind of text.
    return word in _ABBREVIATIONS


def _boundary_strengths(text: str, tok: _Tokens) -> np.ndarray:
    """Strength of the boundary before each token index 0..n (index n is the end of the text).

    Args:
        text: the document body.
        tok: its tokenisation.

    Returns:
        An int8 array of length n + 1 with TOKEN, WORD, SENTENCE, PARAGRAPH or EDGE per boundary.
    """
    n = tok.n
    strength = np.zeros(n + 1, dtype=np.int8)
    if n > 1:
        # A word boundary is a gap between two tokens that starts with whitespace (a gap can also
        # be a control character the normaliser dropped inside a word: not a place to cut).
        gap = np.flatnonzero(tok.starts[1:] > tok.ends[:-1])
        if gap.size:
            codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            first = np.minimum(codepoints[tok.ends[gap]], _IS_WHITESPACE.size - 1)
            gap = gap[_IS_WHITESPACE[first]]
            strength[gap + 1] = WORD

    def mark(positions: list[int], level: int) -> None:
        if positions:
            idx = np.searchsorted(tok.starts, np.asarray(positions, dtype=np.int64), side="left")
            idx = idx[(idx > 0) & (idx < n)]
            strength[idx] = np.maximum(strength[idx], level)

    if "\n" in text:
        mark([m.end() for m in _LINE_RE.finditer(text)], SENTENCE)
        mark([m.end() for m in _PARAGRAPH_RE.finditer(text)], PARAGRAPH)
    sentence_ends = []
    for m in _SENTENCE_RE.finditer(text):
        punct = m.group(0)
        if punct[0] == "." and len(punct.rstrip().rstrip("\"'\u201d\u2019)]")) == 1 and _is_abbreviation(text, m.start()):
            continue
        sentence_ends.append(m.end())
    mark(sentence_ends, SENTENCE)
    strength[0] = strength[n] = EDGE
    return strength


def _cut_points(strength: np.ndarray, n: int, budget: int) -> np.ndarray:
    """Recursively split [0, n) into pieces of at most `budget` tokens.

    A span over budget is cut at every boundary of the strongest level present inside it; each
    part still over budget is cut at the next weaker level, down to fixed token windows.

    Returns:
        Sorted cut points (token indices) starting with 0 and ending with n.
    """
    cuts = [0]

    def split(a: int, b: int, level: int) -> None:
        if b - a <= budget:
            cuts.append(b)
            return
        if level == TOKEN:  # one enormous word: fixed token windows are the last resort
            cuts.extend(range(a + budget, b, budget))
            cuts.append(b)
            return
        inner = np.flatnonzero(strength[a + 1 : b] >= level) + (a + 1)
        if inner.size == 0:
            split(a, b, level - 1)
            return
        bounds = [a, *inner.tolist(), b]
        for s, e in zip(bounds, bounds[1:]):
            if e - s <= budget:
                cuts.append(e)
            else:
                split(s, e, level - 1)

    if n:
        split(0, n, PARAGRAPH)
    return np.asarray(cuts, dtype=np.int64)


def _overlap_start(strength: np.ndarray, end: int, next_cut: int, prev_start: int,
                   overlap: int, budget: int) -> int:
    """Where the next chunk starts: about `overlap` tokens before `end`, at a word boundary.

    A sentence start in the far half of the overlap window is preferred over a word start; a
    position inside a word is never chosen (no overlap then). The start also leaves room for
    the next piece, so every chunk makes progress.
    """
    lo = max(end - overlap, next_cut - budget, prev_start + 1)
    if overlap <= 0 or lo >= end:
        return end
    window = strength[lo:end]
    sentence = np.flatnonzero(window[: max(1, end - overlap // 2 - lo)] >= SENTENCE)
    if sentence.size:
        return lo + int(sentence[0])
    word = np.flatnonzero(window >= WORD)
    return lo + int(word[0]) if word.size else end


def _merge(strength: np.ndarray, cuts: np.ndarray, n: int, budget: int, overlap: int) -> list[tuple[int, int]]:
    """Greedily merge consecutive pieces into chunks of at most `budget` tokens, with overlap."""
    ranges: list[tuple[int, int]] = []
    start = 0
    while n - start > budget:
        k = int(np.searchsorted(cuts, start + budget, side="right")) - 1
        end = int(cuts[k])
        ranges.append((start, end))
        start = _overlap_start(strength, end, int(cuts[k + 1]), start, overlap, budget)
    if n > start:
        ranges.append((start, n))
    return ranges


def _is_whitespace_local(spec: dict) -> bool:
    """Whether a tokenizer (its tokenizer.json as a dict) never tokenises across whitespace."""

    def allowed(node: dict | None, kinds: set[str], key: str) -> bool:
        if node is None:
            return True
        if node.get("type") not in kinds:
            return False
        return all(allowed(child, kinds, key) for child in node.get(key, []) or [])

    # Added tokens are matched before normalisation; one containing whitespace would span a cut.
    added_ok = all(not any(c.isspace() for c in t.get("content", "")) for t in spec.get("added_tokens") or [])
    return (added_ok and spec.get("pre_tokenizer") is not None
            and allowed(spec.get("normalizer"), _LOCAL_NORMALIZERS, "normalizers")
            and allowed(spec.get("pre_tokenizer"), _LOCAL_PRE_TOKENIZERS, "pretokenizers"))


class Chunker:
    """Splits documents into token-bounded, overlapping chunks ready to embed.

    Args:
        cfg: the chunking section of the pipeline spec (``max_tokens`` includes special tokens).
        tokenizer: the embedding model's fast Hugging Face tokenizer
            (``models.load_tokenizer(name)``); counts are the ones that model sees.
        batch_size: documents tokenised together by `chunk_many`.
        verify: ``"auto"`` re-tokenises a final chunk text only when its count does not follow
            exactly from the token ranges (a cut inside a word, a title cut inside a word, or a
            tokenizer whose pre-tokenisation is not whitespace-local); ``"all"`` re-tokenises
            every chunk text (slower, same result).

    Example:
        >>> chunker = Chunker(ChunkConfig(max_tokens=256), models.load_tokenizer("default"))
        >>> rows = chunker.chunk({"doc_id": "d1", "title": "T", "text": "Body."})
    """

    def __init__(self, cfg: ChunkConfig, tokenizer, batch_size: int = 256, verify: str = "auto"):
        if verify not in ("auto", "all"):
            raise ValueError(f"verify must be 'auto' or 'all', not {verify!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("Chunker needs a fast (Rust) tokenizer for offsets; got "
                            f"{type(tokenizer).__name__}")
        from tokenizers import Tokenizer

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.verify = verify
        # A private copy without the truncation/padding that sentence-transformers' tokenizer.json
        # may carry (all-MiniLM-L6-v2 ships max_length=128), which would silently cut texts.
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._local = _is_whitespace_local(json.loads(self._backend.to_str()))
        self.n_special = int(tokenizer.num_special_tokens_to_add(pair=False))
        self._half = (cfg.max_tokens - self.n_special) // 2
        self._stats: dict[str, Any] = {
            "docs": 0, "docs_empty": 0, "docs_split": 0, "chunks": 0, "titles_truncated": 0,
            "duplicate_chunks_skipped": 0, "replanned_docs": 0, "verified_chunks": 0, "seconds": 0.0,
        }
        self._n_tokens: list[np.ndarray] = []

    # ---------------------------------------------------------------- public API

    def chunk(self, doc: dict) -> list[dict]:
        """Chunk one document.

        Args:
            doc: a row of the documents dataset (``doc_id``, ``text``; optional ``title``,
                ``acl``, ``metadata``).

        Returns:
            Rows matching `schemas.CHUNKS`, in order; none for a document without text.
        """
        return list(self.chunk_many([doc]))

    def chunk_many(self, docs: Iterable[dict]) -> Iterator[dict]:
        """Chunk a stream of documents, tokenising them in batches.

        Args:
            docs: document rows, as for `chunk`.

        Yields:
            Chunk rows matching `schemas.CHUNKS`, document by document, in input order.
        """
        batch: list[dict] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= self.batch_size:
                yield from self._chunk_batch(batch)
                batch = []
        if batch:
            yield from self._chunk_batch(batch)

    def report(self) -> dict:
        """Statistics over everything chunked so far by this instance.

        Returns:
            Counts (docs, docs_empty, docs_split, chunks, titles_truncated,
            duplicate_chunks_skipped, replanned_docs), time (seconds, docs_per_s) and the
            n_tokens distribution (min, mean, max), plus the configuration used.
        """
        out = dict(self._stats)
        counts = np.concatenate(self._n_tokens) if self._n_tokens else np.zeros(0, dtype=np.int64)
        out["docs_per_s"] = out["docs"] / out["seconds"] if out["seconds"] > 0 else 0.0
        out["n_tokens_min"] = int(counts.min()) if counts.size else 0
        out["n_tokens_mean"] = float(counts.mean()) if counts.size else 0.0
        out["n_tokens_max"] = int(counts.max()) if counts.size else 0
        out.update(max_tokens=self.cfg.max_tokens, overlap_tokens=self.cfg.overlap_tokens,
                   include_title=self.cfg.include_title)
        return out

    # ---------------------------------------------------------------- internals

    def _encode(self, texts: list[str]) -> list[_Tokens]:
        encs = self._backend.encode_batch(texts, add_special_tokens=False)
        out = []
        for e in encs:
            offsets = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            out.append(_Tokens(offsets[:, 0].copy(), offsets[:, 1].copy()))
        return out

    def count_tokens(self, texts: list[str]) -> np.ndarray:
        """Exact token counts, special tokens included, as the model's tokenizer counts them.

        Args:
            texts: the texts.

        Returns:
            An int64 array, one count per text.
        """
        encs = self._backend.encode_batch(texts, add_special_tokens=True)
        return np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(texts))

    def _title(self, title: str, tok: _Tokens) -> tuple[str, int, bool]:
        """The title as it goes into chunks: at most half the budget, cut at a word boundary.

        Returns:
            The title, its token count, and whether that count is exact by construction.
        """
        if tok.n <= self._half:
            return title, tok.n, True
        self._stats["titles_truncated"] += 1
        strength = _boundary_strengths(title, tok)
        words = np.flatnonzero(strength[1 : self._half + 1] >= WORD) + 1
        cut = int(words[-1]) if words.size else self._half
        return title[: int(tok.ends[cut - 1])].rstrip(), cut, bool(words.size)

    def _plan(self, text: str, tok: _Tokens, strength: np.ndarray, title: str, title_tokens: int,
              title_exact: bool, shrink: int) -> _Plan:
        budget = self.cfg.max_tokens - self.n_special - title_tokens - shrink
        if budget < 1:
            raise ValueError(f"no room left for body text within max_tokens={self.cfg.max_tokens}")
        overlap = min(self.cfg.overlap_tokens, budget // 2)
        cuts = _cut_points(strength, tok.n, budget)
        ranges = _merge(strength, cuts, tok.n, budget, overlap)
        # Counts are exact by arithmetic only when every cut is at whitespace (see module doc).
        exact = self._local and title_exact and all(
            strength[s] >= WORD and strength[e] >= WORD for s, e in ranges)
        return _Plan(title, title_tokens, title_exact, ranges, exact)

    def _materialise(self, text: str, tok: _Tokens, plan: _Plan) -> tuple[list[tuple[str, int, int]], np.ndarray | None]:
        """The chunk texts and body spans of a plan, and their counts when exact by construction."""
        out = []
        for s, e in plan.ranges:
            a, b = int(tok.starts[s]), int(tok.ends[e - 1])
            body = text[a:b]
            out.append((f"{plan.title}\n{body}" if plan.title else body, a, b))
        if plan.exact and self.verify == "auto":
            counts = np.fromiter(((e - s) for s, e in plan.ranges), dtype=np.int64, count=len(plan.ranges))
            return out, counts + (plan.title_tokens + self.n_special)
        return out, None

    def _chunk_batch(self, docs: list[dict]) -> Iterator[dict]:
        t0 = time.perf_counter()
        texts = []
        for i, d in enumerate(docs):
            if d.get("doc_id") is None:
                raise ValueError(f"document #{i} of the batch has no doc_id: {str(d)[:200]}")
            texts.append(d.get("text") or "")
        titles = [((d.get("title") or "").strip() if self.cfg.include_title else "") for d in docs]
        body_toks = self._encode(texts)
        title_toks = self._encode(titles)

        strengths: list[np.ndarray | None] = []
        plans: list[_Plan | None] = []
        pieces: list[list[tuple[str, int, int]]] = []
        counts: list[np.ndarray | None] = []
        for text, tok, title, ttok in zip(texts, body_toks, titles, title_toks):
            if tok.n == 0:
                strengths.append(None), plans.append(None), pieces.append([])
                counts.append(np.zeros(0, dtype=np.int64))
                continue
            title, title_tokens, title_exact = self._title(title, ttok) if title else ("", 0, True)
            strength = _boundary_strengths(text, tok)
            plan = self._plan(text, tok, strength, title, title_tokens, title_exact, 0)
            doc_pieces, doc_counts = self._materialise(text, tok, plan)
            strengths.append(strength), plans.append(plan), pieces.append(doc_pieces)
            counts.append(doc_counts)

        # Tokenise, in one batch, every final text whose count is not exact by construction.
        todo = [i for i, c in enumerate(counts) if c is None]
        flat = [p[0] for i in todo for p in pieces[i]]
        measured = self.count_tokens(flat) if flat else np.zeros(0, dtype=np.int64)
        self._stats["verified_chunks"] += len(flat)
        pos = 0
        for i in todo:
            counts[i] = measured[pos : pos + len(pieces[i])]
            pos += len(pieces[i])
            self._fit(docs[i], texts[i], body_toks[i], strengths[i], plans[i], pieces, counts, i)

        rows: list[dict] = []
        for doc, doc_pieces, doc_counts in zip(docs, pieces, counts):
            rows.extend(self._rows(doc, doc_pieces, doc_counts))
        self._stats["seconds"] += time.perf_counter() - t0
        yield from rows

    def _fit(self, doc: dict, text: str, tok: _Tokens, strength: np.ndarray, plan: _Plan,
             pieces: list, counts: list, i: int) -> None:
        """Plan a document again with a smaller budget until its measured counts all fit."""
        shrink = 0
        for attempt in range(_MAX_REPLANS + 1):
            over = int(counts[i].max()) - self.cfg.max_tokens if counts[i].size else 0
            if over <= 0:
                return
            if attempt == _MAX_REPLANS:
                break
            if shrink == 0:
                self._stats["replanned_docs"] += 1
            shrink += over
            plan = self._plan(text, tok, strength, plan.title, plan.title_tokens, plan.title_exact, shrink)
            pieces[i] = self._materialise(text, tok, plan)[0]
            counts[i] = self.count_tokens([p[0] for p in pieces[i]])
            self._stats["verified_chunks"] += len(pieces[i])
        raise ValueError(f"document {doc['doc_id']!r}: could not fit its chunks within "
                         f"max_tokens={self.cfg.max_tokens} after {_MAX_REPLANS} attempts")

    def _rows(self, doc: dict, doc_pieces: list[tuple[str, int, int]], counts: np.ndarray) -> list[dict]:
        self._stats["docs"] += 1
        if not doc_pieces:
            self._stats["docs_empty"] += 1
            return []
        doc_id = str(doc["doc_id"])
        acl = list(doc.get("acl") or [])
        metadata = doc.get("metadata")
        if metadata is None:
            metadata = "{}"
        elif not isinstance(metadata, str):
            metadata = json.dumps(metadata, sort_keys=True, ensure_ascii=False)
        rows, seen, kept = [], set(), []
        for (text, a, b), n_tokens in zip(doc_pieces, counts.tolist()):
            cid = make_chunk_id(doc_id, text)
            if cid in seen:  # identical text twice in one document: same id, same vector
                self._stats["duplicate_chunks_skipped"] += 1
                continue
            seen.add(cid)
            kept.append(n_tokens)
            rows.append({
                "chunk_id": cid, "doc_id": doc_id, "ordinal": len(rows), "text": text,
                "n_tokens": int(n_tokens), "char_start": a, "char_end": b,
                "acl": list(acl), "metadata": metadata,
            })
        self._stats["chunks"] += len(rows)
        self._stats["docs_split"] += len(rows) > 1
        self._n_tokens.append(np.asarray(kept, dtype=np.int64))
        return rows
