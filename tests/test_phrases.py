import json

import pytest

from powerclip.csr import decode_njson
from powerclip.phrases import ClipTokenAligner, PhraseExtractor, constituent_spans, decode_caption, parse_shard
from powerclip.shards import ShardWriter, iter_samples


@pytest.fixture(scope="module")
def aligner():
    return ClipTokenAligner()


def span_of(text, phrase):
    start = text.index(phrase)
    return start, start + len(phrase)


@pytest.mark.parametrize(
    "caption, phrase, positions",
    [
        # position 0 is start-of-text; punctuation is its own token
        ("A dog, a cat.", "A dog", [1, 2]),
        ("A dog, a cat.", "a cat", [4, 5]),
        # apostrophes: the tokenizer cuts 's and 't; numbers: one token per digit
        ("The cat's toy can't be 2024 years old!", "The cat's toy", [1, 2, 3, 4]),
        ("The cat's toy can't be 2024 years old!", "2024 years", [8, 9, 10, 11, 12]),
        ("The cat's toy can't be 2024 years old!", "can't", [5, 6]),
        # non-ASCII: BPE splits words into several tokens that all belong to the phrase
        ("  Café   ÉCOLE\tnaïve  ", "naïve", [4, 5, 6]),
        ("  Café   ÉCOLE\tnaïve  ", "ÉCOLE", [2, 3]),
        # HTML entities are unescaped by the tokenizer's cleaning, offsets follow the cleaned text
        ("a red&amp;blue kite", "blue kite", [4, 5]),
    ],
)
def test_span_to_token_positions(aligner, caption, phrase, positions):
    cleaned = aligner.clean(caption)
    pieces = aligner.pieces(cleaned)
    assert pieces.ids == aligner.tok.encode(caption)
    assert aligner.positions(pieces, *span_of(cleaned, phrase)) == positions


def test_partial_word_overlap_takes_the_whole_token(aligner):
    # spaCy splits "can't" as "ca" + "n't", the tokenizer as "can" + "'t": "ca" maps to "can"
    cleaned = aligner.clean("they can't")
    start = cleaned.index("can")
    assert aligner.positions(aligner.pieces(cleaned), start, start + 2) == [2]


def test_positions_match_the_tokenizer_output(aligner):
    import open_clip

    caption = "Two dogs, one's brown; the other's 3 years old."
    ids = open_clip.tokenize([caption])[0].tolist()
    cleaned = aligner.clean(caption)
    pieces = aligner.pieces(cleaned)
    for pos in aligner.positions(pieces, *span_of(cleaned, "the other's")):
        assert aligner.tok.decoder[ids[pos]].replace("</w>", "") in "the other's"
    assert ids[0] == aligner.tok.sot_token_id and ids[len(pieces.ids) + 1] == aligner.tok.eot_token_id


@pytest.fixture(scope="module")
def blank_en():
    import spacy

    return spacy.blank("en")


def test_constituents_from_a_hand_built_parse(blank_en):
    from spacy.tokens import Doc

    words = "a small red circle is to the left of a large blue square".split()
    pos = ["DET", "ADJ", "ADJ", "NOUN", "AUX", "ADP", "DET", "NOUN", "ADP", "DET", "ADJ", "ADJ", "NOUN"]
    deps = ["det", "amod", "amod", "nsubj", "ROOT", "prep", "det", "pobj", "prep", "det", "amod", "amod", "pobj"]
    heads = [3, 3, 3, 4, 4, 4, 7, 5, 7, 12, 12, 12, 8]
    doc = Doc(blank_en.vocab, words=words, pos=pos, deps=deps, heads=heads)
    got = {(s.kind, doc.text[s.start_char : s.end_char]) for s in constituent_spans(doc)}
    assert got == {
        ("NP", "a small red circle"),
        ("S", "a small red circle is to the left of a large blue square"),
        ("VP", "is to the left of a large blue square"),
        ("PP", "to the left of a large blue square"),
        ("NP", "the left"),
        ("NP", "the left of a large blue square"),
        ("PP", "of a large blue square"),
        ("NP", "a large blue square"),
    }


def test_coordinated_clauses_and_edge_punctuation(blank_en):
    from spacy.tokens import Doc

    # "dogs run , and cats sleep ." with "sleep" a conj of "run"
    words = ["dogs", "run", ",", "and", "cats", "sleep", "."]
    pos = ["NOUN", "VERB", "PUNCT", "CCONJ", "NOUN", "VERB", "PUNCT"]
    deps = ["nsubj", "ROOT", "punct", "cc", "nsubj", "conj", "punct"]
    heads = [1, 1, 1, 1, 5, 1, 1]
    doc = Doc(blank_en.vocab, words=words, pos=pos, deps=deps, heads=heads)
    got = {(s.kind, doc.text[s.start_char : s.end_char]) for s in constituent_spans(doc)}
    assert ("S", "dogs run , and cats sleep") in got  # whole caption, final period trimmed
    assert ("S", "dogs run") in got and ("S", "cats sleep") in got  # one clause each
    assert not any(text.endswith((",", ".")) for _, text in got)


def test_real_parse_of_a_caption(extractor):
    caption = "A brown dog with a red collar is running on the green grass."
    result = extractor(caption)
    cleaned = extractor.aligner.clean(caption)
    texts = {(s.kind, cleaned[s.start_char : s.end_char]) for s in result.spans}
    assert ("PP", "with a red collar") in texts
    assert ("NP", "a red collar") in texts
    assert ("VP", "is running on the green grass") in texts
    assert ("S", "A brown dog with a red collar is running on the green grass") in texts
    by_text = {text: phrase for (kind, text), phrase in zip(texts, result.phrases)}
    assert len(result.phrases) == len(result.spans) == len(set(map(tuple, result.phrases)))
    # "a red collar" = tokens 5..7 (a brown dog with = 1..4)
    idx = [cleaned[s.start_char : s.end_char] for s in result.spans].index("a red collar")
    assert result.phrases[idx] == [5, 6, 7]
    assert by_text


def test_long_caption_drops_truncated_phrases(extractor):
    caption = " ".join(["a small red circle is to the left of a large blue square."] * 8)  # ~104 tokens
    result = extractor(caption)
    assert result.counters["captions_truncated"] == 1
    assert result.counters["phrases_truncated"] > 0
    assert result.phrases and max(max(p) for p in result.phrases) <= 75
    assert all(p == sorted(p) for p in result.phrases)


def test_max_phrases_caps_and_counts():
    capped = PhraseExtractor(max_phrases=2)("a small red circle is to the left of a large blue square")
    assert len(capped.phrases) == 2 and capped.counters["phrases_capped"] > 0


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"a dog", ("a dog", None)),
        (b"", (None, "empty_caption")),
        (b"  \n\t", (None, "empty_caption")),
        (b"caf\xe9 latte", (None, "caption_not_utf8")),
        (None, (None, "missing_caption")),
    ],
)
def test_decode_caption(raw, expected):
    assert decode_caption(raw) == expected


def test_parse_shard_keeps_keys_and_counts_skips(tmp_path, extractor):
    raw = tmp_path / "raw.tar"
    captions = {
        "k0": b"a small red circle to the left of a large blue square",
        "k1": b"",
        "k2": b"caf\xe9 latte",
        "k3": None,
        "k4": b"two dogs play in the snow",
    }
    with ShardWriter(raw) as sink:
        for key, txt in captions.items():
            fields = {"jpg": b"not read by this stage"}
            if txt is not None:
                fields["txt"] = txt
            sink.write(key, fields)
    stats = parse_shard(raw, tmp_path / "phrases.tar", tmp_path / "phrases.stats.json", "raw", extractor=extractor)
    samples = list(iter_samples(tmp_path / "phrases.tar"))
    assert [s["__key__"] for s in samples] == list(captions)
    assert all(set(s) == {"__key__", "njson"} for s in samples)
    phrases = {s["__key__"]: decode_njson(s["njson"]) for s in samples}
    assert phrases["k0"] and phrases["k4"]
    assert phrases["k1"] == phrases["k2"] == phrases["k3"] == []
    assert stats["samples_in"] == 5 and stats["samples_out"] == 2 and stats["samples_skipped"] == 3
    assert stats["skipped_by_reason"] == {"caption_not_utf8": 1, "empty_caption": 1, "missing_caption": 1}
    assert json.loads((tmp_path / "phrases.stats.json").read_text()) == stats
