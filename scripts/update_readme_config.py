"""Regenerate README.md's config table from the config dataclasses (`make docs`)."""

import re
import sys
from pathlib import Path

from cliptune.config import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- CONFIG-TABLE[^\n]*-->\n).*?(<!-- /CONFIG-TABLE -->)", re.S)


def main() -> int:
    text = README.read_text()
    if not BLOCK.search(text):
        print("README.md has no CONFIG-TABLE markers", file=sys.stderr)
        return 1
    README.write_text(BLOCK.sub(lambda m: m.group(1) + markdown_table() + "\n" + m.group(2), text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
