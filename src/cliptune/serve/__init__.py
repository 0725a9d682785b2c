"""`cliptune serve`: a search page and JSON API over an index, optionally beside a second one (before/after)."""

from __future__ import annotations

import argparse

__all__ = ["serve"]


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cliptune.index import Index
    from cliptune.serve.app import Served, create_app

    served = [Served(Index.open(args.index), _label(args.index, "A" if args.compare else ""))]
    if args.compare:
        served.append(Served(Index.open(args.compare), _label(args.compare, "B")))
    for entry in served:
        _ = entry.index.encoder  # load the models now, so the first query does not wait for them
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"cliptune: warning: serving on {args.host}: anyone who can reach it can search and see these images")
    print(f"search page: http://{args.host}:{args.port}/  (Ctrl+C to stop)")
    uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="warning")
    return 0


def _label(path: str, letter: str) -> str:
    from pathlib import Path

    name = Path(path).expanduser().resolve().name
    return f"{letter}: {name}" if letter else name
