"""Built-in word lists (co-hyponym groups, opposites, spatial relations, the rule-based tagger's closed classes) and
the English inflection that puts a replacement lemma in the place of the word it replaces."""

from __future__ import annotations

import re

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


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
