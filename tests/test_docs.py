"""The README's promises: the two commands first, and a config table in sync with the dataclasses."""

import re

from cliptune.config import markdown_table
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    block = README.split("```", 2)[1]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make demo", "make test"]


def test_config_table_matches_the_dataclasses():
    table = re.search(r"<!-- CONFIG-TABLE[^\n]*-->\n(.*?)<!-- /CONFIG-TABLE -->", README, re.S).group(1)
    assert table.strip() == markdown_table().strip(), "run `make docs` to regenerate README's config table"
