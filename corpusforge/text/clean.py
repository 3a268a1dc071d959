"""The clean stage: repair, normalise, redact, bound and deduplicate documents.

Documents stream through :class:`Cleaner` one at a time. Each one either comes out cleaned (same
``DOCUMENTS`` schema, ``content_hash`` recomputed on the cleaned title and text) or is refused as a
:class:`~corpusforge.data.schemas.Rejected` record whose ``record`` is the original document as JSON,
so nothing is ever lost silently.

Steps, in order (each configured by :class:`~corpusforge.spec.CleanConfig`):

1. Unicode repair with ftfy (mojibake, broken HTML entities, terminal escapes), then Unicode
   normalisation (NFC, NFKC or none).
2. Control characters removed (``\\n`` and ``\\t`` kept, ``\\r\\n`` / ``\\r`` become ``\\n``) and
   whitespace collapsed: runs of spaces/tabs become one space, three or more newlines become a
   paragraph break (``\\n\\n``), ends are stripped. Paragraph breaks survive: the chunker splits
   on them.
3. Optional PII redaction: e-mail addresses become ``[EMAIL]``, phone numbers ``[PHONE]``.
4. Length bounds on the cleaned text (``empty_text``, ``too_short``, ``too_long``).
5. Exact duplicates by cleaned content hash (``exact_duplicate``).
6. Near duplicates by MinHash LSH over word shingles (``near_duplicate``); the first document seen
   wins, so a given input order always gives the same result.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from hashlib import blake2b
from typing import Any

import ftfy
import numpy as np
from datasketch import MinHash, MinHashLSH

from corpusforge.data.hashing import content_hash
from corpusforge.data.schemas import Rejected
from corpusforge.spec import CleanConfig

STAGE = "clean"
MINHASH_SEED = 1  # fixed: signatures (and so every near-duplicate decision) are reproducible

# ftfy does the *repair* only; normalisation, ligatures and character width are the
# `normalization` setting's job, and curly quotes are not damage, so ftfy leaves them alone.
_FTFY_CONFIG = ftfy.TextFixerConfig(
    normalization=None,
    uncurl_quotes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    fix_line_breaks=False,  # step 2 owns line breaks and control characters, and counts them
    remove_control_chars=False,
    explain=False,
)

# --------------------------------------------------------------------------------------------
# Step 2: control characters and whitespace
# --------------------------------------------------------------------------------------------

# Vertical tab and form feed (a PDF page break) separate lines; deleting them would glue words.
_NEWLINES = re.compile(r"\r\n?|[\x0b\x0c\u2028\u0085]")
# Cc (C0/C1 controls) except \t and \n, DEL, lone surrogates (cannot be written as UTF-8) and
# the invisible format characters that only ever appear as debris (BOM, zero-width space,
# deprecated shaping controls, interlinear annotation marks).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff\u200b\u206a-\u206f\ufff9-\ufffb]")
_HS = r"[ \t\f\v\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]"
# Only what must change matches (a lone plain space does not): substituting every single space
# of every document with itself was a quarter of the stage's run time.
_HSPACE = re.compile(rf"[\t\f\v\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]{_HS}*| {_HS}+")
_SPACE_AROUND_NEWLINE = re.compile(r" +\n *|\n +")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_TITLE_BREAKS = re.compile(r" ?\n+ ?")

# --------------------------------------------------------------------------------------------
# Step 3: PII
# --------------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,24}\b"
)
# A phone number never continues into a word, a decimal, a range or a path.
_PHONE_END = r"(?![\w@]|[.,/-]\d)"
# International: an explicit "+country code", then 2-6 digit groups (an area code may be in
# parentheses). The "+" must not follow a word character, so charges such as "Ca2+ 120 340"
# are not read as numbers. Digit count is checked afterwards (7-15, the E.164 range).
_PHONE_INTL = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}" + _PHONE_END
)
# North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199. Without
# parentheses the two separators must be the same "-" or "."; plain spaces are not accepted here
# because flattened tables ("120 340 5600") would match. Not after "." "/" "-" or a word: DOIs,
# page ranges and identifiers that merely contain such a digit pattern are left alone.
_PHONE_US = re.compile(
    r"(?<![\w.+/-])(?:1[.-]?)?"
    r"(?:\(\d{3}\) ?\d{3}[ .-]|\d{3}(?P<sep>[.-])\d{3}(?P=sep))\d{4}" + _PHONE_END
)
# After a word that announces a phone number, looser shapes are safe: space-separated numbers
# and seven-digit local numbers (555-0199), which elsewhere look exactly like ranges ("200-1000").
_PHONE_CUED = re.compile(
    r"(?i)(?P<cue>\b(?:tel(?:ephone)?|phone|fax|mobile|cell|call)\b\.?:?\s*(?:no\.?\s*)?"
    r"(?:at\s+)?)(?:(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}|[2-9]\d{2})[ .-]\d{4}" + _PHONE_END
)
_DIGIT = re.compile(r"\d")

EMAIL_TOKEN = "[EMAIL]"
PHONE_TOKEN = "[PHONE]"

# --------------------------------------------------------------------------------------------
# Step 6: shingles
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
_SHINGLE_BASE = np.uint64(0x100000001B3)  # FNV prime: an odd multiplier, so order matters


def _required_str(doc: dict, key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _document_fields(doc: dict) -> dict[str, Any]:
    """The ``DOCUMENTS`` fields of an input record, with defaults for the optional ones.

    Raises:
        ValueError: a required field is missing or a field has the wrong type (names which).
    """
    title = doc.get("title")
    metadata = doc.get("metadata")
    acl = doc.get("acl")
    source = doc.get("source")
    if title is not None and not isinstance(title, str):
        raise ValueError(f"field 'title' must be a string, got {type(title).__name__}")
    if isinstance(metadata, dict):
        metadata = json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=str)
    elif metadata is not None and not isinstance(metadata, str):
        raise ValueError(f"field 'metadata' must be a JSON string or a dict, got {type(metadata).__name__}")
    if acl is not None and not (isinstance(acl, list) and all(isinstance(a, str) for a in acl)):
        raise ValueError("field 'acl' must be a list of strings")
    if source is not None and not isinstance(source, str):
        raise ValueError(f"field 'source' must be a string, got {type(source).__name__}")
    return {
        "doc_id": _required_str(doc, "doc_id"),
        "title": title or "",
        "text": _required_str(doc, "text"),
        "source": source or "",
        "metadata": metadata or "{}",
        "acl": list(acl or []),
        "content_hash": "",  # recomputed on the cleaned content
    }


def _original_json(doc: Any) -> str:
    """The input record as JSON text; `default=str` so even odd values are kept, not lost."""
    return json.dumps(doc, ensure_ascii=False, default=str)


def _may_need_ftfy(text: str) -> bool:
    """False when ftfy provably has nothing to repair that step 2 would not do anyway.

    Mojibake needs non-ASCII characters; in ASCII text the enabled ftfy fixes can only unescape
    HTML entities ("&") and strip terminal escapes (ESC). Skipping the rest spares ftfy on most
    documents of an English corpus.
    """
    return not text.isascii() or "&" in text or "\x1b" in text


def remove_control_chars(text: str) -> str:
    """Drop control characters but keep tabs and newlines (CR, CRLF, VT, FF, LS, NEL become ``\\n``).

    Args:
        text: any text.

    Returns:
        The text without C0/C1 controls, lone surrogates, BOMs or zero-width spaces; the
        paragraph separator U+2029 becomes a paragraph break.
    """
    text = _NEWLINES.sub("\n", text).replace("\u2029", "\n\n")
    return _CONTROL.sub("", text)


def collapse_whitespace(text: str) -> str:
    """Collapse spaces/tabs to one space and 3+ newlines to a paragraph break; strip the ends.

    Args:
        text: text whose control characters are already removed.

    Returns:
        The collapsed text. Single newlines and paragraph breaks (``\\n\\n``) are kept.
    """
    text = _HSPACE.sub(" ", text)
    if "\n" in text:  # the cheap test spares two regex scans of every one-paragraph text
        text = _SPACE_AROUND_NEWLINE.sub("\n", text)  # so "\n \n \n" counts as blank lines
        if "\n\n\n" in text:
            text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def _phone_if_plausible(match: re.Match) -> str:
    digits = len(_DIGIT.findall(match.group(0)))
    return PHONE_TOKEN if 7 <= digits <= 15 else match.group(0)


def redact_emails(text: str) -> tuple[str, int]:
    """Replace e-mail addresses with ``[EMAIL]``.

    Args:
        text: cleaned text.

    Returns:
        The redacted text and how many addresses were replaced.
    """
    return _EMAIL.subn(EMAIL_TOKEN, text)


def redact_phones(text: str) -> tuple[str, int]:
    """Replace phone numbers (international ``+CC ...``, North American, cued local) with ``[PHONE]``.

    Years, numeric ranges (``1990-2000``), decimals, p-values, page ranges and DOIs are left as
    they are. Seven-digit local numbers and space-separated North American numbers look like
    ranges and table rows, so they are only redacted after a cue word such as "tel" or "phone".

    Args:
        text: cleaned text.

    Returns:
        The redacted text and how many numbers were replaced.
    """
    before = text.count(PHONE_TOKEN)
    text = _PHONE_INTL.sub(_phone_if_plausible, text)
    text = _PHONE_US.sub(PHONE_TOKEN, text)
    text = _PHONE_CUED.sub(lambda m: m.group("cue") + PHONE_TOKEN, text)
    return text, text.count(PHONE_TOKEN) - before


_VOCAB_LIMIT = 1 << 21  # words whose hash is memoised; bounds memory on huge vocabularies
_word_hashes: dict[str, int] = {}


def _word_hash(word: str) -> int:
    # blake2b, not hash(): Python's str hash is salted per process and would make signatures
    # (and so the near-duplicate decisions) change from run to run.
    return int.from_bytes(blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _hash_words(words: list[str]) -> np.ndarray:
    """uint64 hashes of words, memoised: most words of a corpus recur, so most are one lookup."""
    missing = set(words).difference(_word_hashes)
    if missing:
        if len(_word_hashes) + len(missing) > _VOCAB_LIMIT:
            _word_hashes.clear()
            missing = set(words)
        _word_hashes.update((w, _word_hash(w)) for w in missing)
    return np.fromiter(map(_word_hashes.__getitem__, words), dtype=np.uint64, count=len(words))


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """32-bit hashes of the distinct word ``size``-grams of a text (case-folded).

    The shingle hashes are combined from per-word hashes with vectorised numpy arithmetic, so a
    document costs one dictionary lookup per word rather than one cryptographic hash per shingle.
    A text with fewer than ``size`` words yields one shingle of all its words.

    Args:
        text: the document text.
        size: words per shingle.

    Returns:
        A sorted array of unique uint32 shingle hashes (empty when the text has no words).
    """
    words = _WORD.findall(text.casefold())
    if not words:
        return np.empty(0, dtype=np.uint32)
    wh = _hash_words(words)
    n = max(len(wh) - size + 1, 1)
    width = min(size, len(wh))
    acc = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the point: arithmetic modulo 2**64
        for k in range(width):
            acc = acc * _SHINGLE_BASE + wh[k : k + n]
        acc ^= np.uint64(width)  # a short document's single shingle differs from a 1-gram
        # splitmix64 finaliser: spreads the polynomial's bits before keeping the top 32
        acc ^= acc >> np.uint64(30)
        acc *= np.uint64(0xBF58476D1CE4E5B9)
        acc ^= acc >> np.uint64(27)
        acc *= np.uint64(0x94D049BB133111EB)
        acc ^= acc >> np.uint64(31)
    return np.unique((acc >> np.uint64(32)).astype(np.uint32))


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int] | None:
    """LSH (bands, rows) that cannot miss a pair whose *estimated* Jaccard reaches `threshold`.

    An estimate >= threshold means at most ``num_perm - ceil(threshold * num_perm)`` signature
    positions differ. With one band more than that, some band is free of differences, so the
    pair always collides (pigeonhole): the LSH then finds exactly what a brute-force comparison
    of all kept signatures would. Used while bands keep at least 4 rows; below that (thresholds
    under ~0.75) so many pairs collide that datasketch's tuned parameters are the better choice.

    Args:
        threshold: the estimated-Jaccard threshold.
        num_perm: the signature length.

    Returns:
        ``(bands, rows)``, or None when the exact scheme would need fewer than 4 rows per band.
    """
    max_mismatch = num_perm - math.ceil(threshold * num_perm - 1e-9)
    bands = max(max_mismatch + 1, 2)  # datasketch requires at least two bands
    rows = num_perm // bands
    return (bands, rows) if rows >= 4 else None


def _make_lsh(threshold: float, num_perm: int) -> MinHashLSH:
    params = lsh_bands(threshold, num_perm)
    if params is not None:
        return MinHashLSH(num_perm=num_perm, params=params)
    # Candidates are verified by their estimate, so a false positive costs one comparison while
    # a false negative loses a duplicate: weight recall.
    return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))


def duplicate_id_detail(doc_id: str) -> str:
    """The detail of a ``duplicate_doc_id`` rejection."""
    return f"doc_id {doc_id!r} was already emitted"


def exact_detail(kept: str) -> str:
    """The detail of an ``exact_duplicate`` rejection (`kept`: the doc_id that was kept)."""
    return f"same cleaned title and text as kept doc_id {kept!r}"


def near_detail(best_id: str, best_sim: float, nd) -> str:
    """The detail of a ``near_duplicate`` rejection: the most similar kept document and the settings."""
    return (
        f"near duplicate of kept doc_id {best_id!r}: estimated Jaccard {best_sim:.3f} "
        f">= threshold {nd.threshold} ({nd.shingle_size}-word shingles, {nd.num_perm} perms)"
    )


def summary_of(counts: Counter[str], reasons: Counter[str]) -> dict[str, Any]:
    """A cleaner's summary (see `Cleaner.summary`) from its counters.

    Args:
        counts: ``documents_in``, ``documents_out`` and the per-step counters.
        reasons: rejections per reason.

    Returns:
        The summary dict.
    """
    c = counts
    return {
        "documents_in": c["documents_in"],
        "documents_out": c["documents_out"],
        "quarantined": sum(reasons.values()),
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "unicode_repaired": c["unicode_repaired"],
        "normalized": c["normalized"],
        "control_chars_removed": c["control_chars_removed"],
        "whitespace_collapsed": c["whitespace_collapsed"],
        "pii_redactions": {"emails": c["emails_redacted"], "phones": c["phones_redacted"]},
        "documents_with_pii": c["documents_with_pii"],
        "near_duplicate_skipped_no_words": c["near_duplicate_skipped_no_words"],
    }


class Cleaner:
    """Streams documents through the clean steps, keeping the state deduplication needs.

    The state (content hashes seen, the LSH index of kept documents, counters) lives on the
    instance, so several ``process`` calls on one ``Cleaner`` behave like one stream: a document
    in a later batch is still compared with those kept from earlier ones.

    Args:
        cfg: the clean section of the pipeline spec.
    """

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        nd = cfg.near_duplicates
        self._seen_hashes: dict[str, str] = {}  # cleaned content hash -> kept doc_id
        self._kept_ids: set[str] = set()
        # kept doc_id -> signature values only (not MinHash objects): a few hundred bytes a doc
        self._signatures: dict[str, np.ndarray] = {}
        self._lsh = _make_lsh(nd.threshold, nd.num_perm) if nd.enabled else None
        # One template carries the permutations; copies share them, which is what makes the
        # signatures comparable and saves re-deriving them for every document.
        # hashfunc=int: the values fed in are already 32-bit shingle hashes.
        self._template = MinHash(num_perm=nd.num_perm, seed=MINHASH_SEED, hashfunc=int)
        self._counts: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()

    # ---------------------------------------------------------------- public API

    def process(self, docs: Iterable[dict]) -> Iterator[dict | Rejected]:
        """Clean a stream of documents.

        Args:
            docs: dicts with the ``DOCUMENTS`` fields (doc_id, title, text, source, metadata,
                acl, content_hash).

        Yields:
            For each input document, in order, either the cleaned document (same fields,
            ``content_hash`` recomputed) or a ``Rejected(stage="clean")`` whose ``record`` is
            the original document as JSON and whose ``reason`` is one of ``invalid_record``,
            ``bad_acl``, ``duplicate_doc_id``, ``empty_text``, ``too_short``, ``too_long``,
            ``exact_duplicate`` or ``near_duplicate``.
        """
        for doc in docs:
            self._counts["documents_in"] += 1
            result = self._process_one(doc)
            if isinstance(result, Rejected):
                self._reasons[result.reason] += 1
            else:
                self._counts["documents_out"] += 1
            yield result

    def summary(self) -> dict[str, Any]:
        """Counts so far: documents in, out, quarantined (per reason) and what was changed.

        Returns:
            A dict with ``documents_in``, ``documents_out``, ``quarantined``,
            ``quarantined_by_reason``, ``unicode_repaired``, ``normalized``,
            ``control_chars_removed``, ``whitespace_collapsed`` (documents changed by each
            step), ``pii_redactions`` (``emails`` / ``phones`` replaced), ``documents_with_pii``
            and ``near_duplicate_skipped_no_words``.
        """
        return summary_of(self._counts, self._reasons)

    def report(self) -> dict[str, Any]:
        """The configuration this cleaner runs with.

        Returns:
            ``cfg.model_dump()``.
        """
        return self.cfg.model_dump()

    # ---------------------------------------------------------------- one document

    def _reject(self, doc: Any, reason: str, detail: str) -> Rejected:
        is_dict = isinstance(doc, dict)
        doc_id = doc.get("doc_id") if is_dict else None
        source = doc.get("source") if is_dict else None
        return Rejected(
            stage=STAGE,
            reason=reason,
            detail=detail,
            source=source if isinstance(source, str) else "",
            doc_id=doc_id if isinstance(doc_id, str) else None,
            record=_original_json(doc),
        )

    def _process_one(self, doc: Any) -> dict | Rejected:
        fields = self.screen(doc)
        if isinstance(fields, Rejected):
            return fields
        doc_id = fields["doc_id"]
        if doc_id in self._kept_ids:
            # Ids are what chunks, embeddings and qrels join on: a second one would corrupt them.
            return self._reject(doc, "duplicate_doc_id", duplicate_id_detail(doc_id))
        cleaned, changes = self.clean_fields(doc, fields)
        self.count_changes(changes)
        if isinstance(cleaned, Rejected):
            return cleaned
        chash = cleaned["content_hash"]
        refused = self._check_exact(doc, chash)
        if refused is not None:
            return refused
        signature, refused = self._check_near(doc, cleaned["title"], cleaned["text"])
        if refused is not None:
            return refused

        self._keep(doc_id, chash, signature)
        return cleaned

    # ------------------------------------------------- steps shared with the Ray engine

    def screen(self, doc: Any) -> dict[str, Any] | Rejected:
        """The record checks before cleaning: a dict with valid fields and no blank ACL tag.

        Args:
            doc: an input record.

        Returns:
            Its ``DOCUMENTS`` fields, or the rejection (``invalid_record``, ``bad_acl``).
        """
        if not isinstance(doc, dict):
            return self._reject(doc, "invalid_record", f"expected a dict, got {type(doc).__name__}")
        try:
            fields = _document_fields(doc)
        except ValueError as exc:
            return self._reject(doc, "invalid_record", str(exc))
        if any(not tag.strip() for tag in fields["acl"]):
            # The same rule as extract: a blank tag matches no caller and its intent is unknown.
            return self._reject(doc, "bad_acl", f"acl has a blank tag: {fields['acl']!r}")
        return fields

    def clean_fields(self, doc: dict, fields: dict[str, Any]) -> tuple[dict[str, Any] | Rejected, Counter[str]]:
        """Steps 1-4 on one screened record: repair, normalise, redact, bound the length.

        Args:
            doc: the input record (quarantined whole when refused).
            fields: its `screen` fields.

        Returns:
            ``(cleaned document or length rejection, changes)``; `changes` says what the steps
            altered (for `count_changes`).
        """
        changes: Counter[str] = Counter()
        clean_title = _TITLE_BREAKS.sub(" ", self._clean_text(fields["title"], changes))  # one line
        clean_text = self._clean_text(fields["text"], changes)
        clean_title, clean_text = self._redact(clean_title, clean_text, changes)
        refused = self._check_length(doc, clean_text)
        if refused is not None:
            return refused, changes
        return {**fields, "title": clean_title, "text": clean_text,
                "content_hash": content_hash(clean_title, clean_text)}, changes

    def count_changes(self, changes: Counter[str]) -> None:
        """Add one document's `clean_fields` changes to the summary counters."""
        # Counted before the verdict: they describe what the steps did, whatever comes next.
        for key in ("unicode_repaired", "normalized", "control_chars_removed", "whitespace_collapsed"):
            self._counts[key] += int(changes[key] > 0)
        self._counts["emails_redacted"] += changes["emails"]
        self._counts["phones_redacted"] += changes["phones"]
        self._counts["documents_with_pii"] += int(changes["emails"] + changes["phones"] > 0)

    def signature(self, title: str, text: str) -> np.ndarray | None:
        """The MinHash signature (``num_perm`` uint64) of a cleaned document, None without words."""
        shingles = shingle_hashes(f"{title}\n{text}" if title else text, self.cfg.near_duplicates.shingle_size)
        if shingles.size == 0:
            return None
        signature = self._template.copy()
        signature.update_batch(shingles.tolist())  # vectorised permute-and-min in numpy
        return signature.hashvalues

    def band_params(self) -> tuple[int, int]:
        """The (bands, rows) of this cleaner's LSH: documents are candidates when a band matches."""
        return self._lsh.b, self._lsh.r

    def reject(self, doc: Any, reason: str, detail: str) -> Rejected:
        """A clean-stage rejection of `doc` (its original record kept as JSON)."""
        return self._reject(doc, reason, detail)

    def _clean_text(self, text: str, changes: Counter[str]) -> str:
        """Steps 1-2 on one string; `changes` counts which steps altered it."""
        cfg = self.cfg
        if cfg.fix_unicode and _may_need_ftfy(text):
            fixed = ftfy.fix_text(text, _FTFY_CONFIG)
            changes["unicode_repaired"] += fixed != text
            text = fixed
        if cfg.normalization != "none":
            normalized = unicodedata.normalize(cfg.normalization, text)
            changes["normalized"] += normalized != text
            text = normalized
        stripped = remove_control_chars(text)
        changes["control_chars_removed"] += stripped != text
        text = stripped
        if cfg.collapse_whitespace:
            collapsed = collapse_whitespace(text)
            changes["whitespace_collapsed"] += collapsed != text
            text = collapsed
        return text

    def _redact(self, title: str, text: str, changes: Counter[str]) -> tuple[str, str]:
        """Step 3 on title and text; `changes` receives the number of replacements."""
        pii = self.cfg.pii
        out = []
        for value in (title, text):
            if pii.emails:
                value, n = redact_emails(value)
                changes["emails"] += n
            if pii.phones:
                value, n = redact_phones(value)
                changes["phones"] += n
            out.append(value)
        return out[0], out[1]

    def _check_length(self, doc: dict, text: str) -> Rejected | None:
        """Step 4. Empty text is its own reason (unless ``min_chars`` is 0: no lower bound)."""
        n, cfg = len(text), self.cfg
        if n == 0 and cfg.min_chars > 0:
            return self._reject(doc, "empty_text", "text is empty after cleaning")
        if n < cfg.min_chars:
            return self._reject(doc, "too_short", f"{n} chars after cleaning < min_chars={cfg.min_chars}")
        if n > cfg.max_chars:
            return self._reject(doc, "too_long", f"{n} chars after cleaning > max_chars={cfg.max_chars}")
        return None

    def _check_exact(self, doc: dict, chash: str) -> Rejected | None:
        """Step 5: the first document with a given cleaned content wins."""
        if not self.cfg.dedup_exact:
            return None
        kept = self._seen_hashes.get(chash)
        if kept is None:
            return None
        return self._reject(doc, "exact_duplicate", exact_detail(kept))

    def _check_near(self, doc: dict, title: str, text: str) -> tuple[MinHash | None, Rejected | None]:
        """Step 6: MinHash the shingles, query the LSH, verify candidates by estimated Jaccard.

        Returns:
            The document's signature (None when near-duplicate detection is off or the text has
            no words) and a rejection when a kept document is at least ``threshold`` similar.
        """
        if self._lsh is None:
            return None, None
        nd = self.cfg.near_duplicates
        values = self.signature(title, text)
        if values is None:
            # No words, no shingles: an empty signature would match every other empty one.
            self._counts["near_duplicate_skipped_no_words"] += 1
            return None, None
        signature = self._template.copy()
        signature.hashvalues = values
        best_id, best_sim = None, -1.0
        for cand in sorted(self._lsh.query(signature)):  # sorted: ties resolve the same way
            # MinHash.jaccard's estimate (share of equal positions) without building objects
            sim = float(np.count_nonzero(values == self._signatures[cand])) / nd.num_perm
            if sim > best_sim:
                best_id, best_sim = cand, sim
        if best_id is not None and best_sim >= nd.threshold:
            return signature, self._reject(doc, "near_duplicate", near_detail(best_id, best_sim, nd))
        return signature, None

    def _keep(self, doc_id: str, chash: str, signature: MinHash | None) -> None:
        self._kept_ids.add(doc_id)
        self._seen_hashes.setdefault(chash, doc_id)
        if signature is not None and self._lsh is not None:
            self._signatures[doc_id] = signature.hashvalues
            self._lsh.insert(doc_id, signature)


def clean_documents(docs: Iterable[dict], cfg: CleanConfig) -> tuple[list[dict], list[Rejected], dict]:
    """Clean a finite collection in one call (convenience over :class:`Cleaner`).

    Args:
        docs: documents with the ``DOCUMENTS`` fields.
        cfg: the clean configuration.

    Returns:
        The kept documents, the rejected records and the cleaner's summary.
    """
    cleaner = Cleaner(cfg)
    kept: list[dict] = []
    rejected: list[Rejected] = []
    for item in cleaner.process(docs):
        (rejected if isinstance(item, Rejected) else kept).append(item)
    return kept, rejected, cleaner.summary()
