"""Hard-negative captions: NegCLIP span swaps, FSC-CLIP word replacements and n-gram shuffles of a true caption.

A caption is tagged once, by spaCy or, where spaCy is missing, by a small rule-based tagger, into `Word`s that carry
character offsets; every kind of negative is an edit of the caption text at those offsets, so both taggers feed the
same code. Replacements come from WordNet (antonyms, co-hyponyms) and from built-in word lists (spatial relations,
which WordNet lacks, and common colours, numbers, objects and opposites, used alone where WordNet is missing).
Everything is seeded by strings, so a (caption, seed) gives the same negatives in every process.

Modules: `words` (built-in word lists, inflection), `tagging` (spaCy or the rule-based tagger), `wordnet`
(WordNet replacements), `generate` (the kinds of negative and `NegativeGenerator`).
"""

from cliptune.data.negatives.generate import KINDS, LEXICONS, TAGGERS, NegativeGenerator
from cliptune.data.negatives.tagging import SPACY_PACKAGE, Parse, Word
from cliptune.data.negatives.wordnet import WORDNET_DIRS

__all__ = ["KINDS", "LEXICONS", "SPACY_PACKAGE", "TAGGERS", "WORDNET_DIRS", "NegativeGenerator", "Parse", "Word"]
