"""benchmarks/probe.py's fast cases: every generated bad input ends in a clear error or a named warning (issue 11).

Each case is one config value, YAML text, override, table, model folder or weights file a user could get wrong;
none may end in a traceback, an error that names neither the key nor the file, a silent acceptance, or a hang.
"""

import logging
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

probe = load_benchmark("probe")
CASES = probe.fast_cases()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return probe.make_scratch(tmp_path_factory.mktemp("probe"))


def test_the_probe_set_is_large_and_covers_every_kind_of_input():
    groups = {case.group for case in CASES}
    assert len(CASES) >= 400 and len({case.id for case in CASES}) == len(CASES)
    assert {"tables", "model folders", "YAML syntax", "override syntax", "config data (API)"} <= groups


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_clear_answer(case, scratch, caplog):
    with caplog.at_level(logging.WARNING):
        outcome, message = probe.classify(case, scratch)
    assert outcome in probe.GOOD, f"{outcome}: {message}"


def test_the_classifier_tells_the_outcomes_apart(scratch):
    def boom(_):
        raise KeyError("x")

    def vague(_):
        raise ValueError("something is wrong")

    def warns(_):
        logging.getLogger("cliptune.data").warning("t.csv: 2 rows skipped")

    cases = {
        "traceback": probe.Case("a", "g", boom, ("k",)),
        "unclear": probe.Case("b", "g", vague, ("optim.lr",)),
        "clear": probe.Case("c", "g", vague, ("wrong",)),
        "warned": probe.Case("d", "g", warns, ("t.csv",)),
        "silent": probe.Case("e", "g", lambda _: None, ("t.csv",)),
        "accepted": probe.Case("f", "g", lambda _: None, (), bad=False),
        "refused": probe.Case("h", "g", vague, (), bad=False),
    }
    assert {name: probe.classify(case, scratch)[0] for name, case in cases.items()} == {n: n for n in cases}
