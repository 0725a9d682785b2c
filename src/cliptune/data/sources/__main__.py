"""`python -m cliptune.data.sources {openclipart,emoji} --out DIR ...`"""

from cliptune.data.sources.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
