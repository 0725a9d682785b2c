"""WordNet through NLTK (its own data, or Debian's `wordnet-base`), loaded once per process on first use: antonyms and
co-hyponyms that replace a word."""

from __future__ import annotations

import functools
import io
import logging
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cliptune.data.negatives.words import PRECISE, _words

logger = logging.getLogger("cliptune.data")

WORDNET_DIRS = ("/usr/share/wordnet",)  # Debian and Ubuntu's `wordnet-base`


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
