"""`cliptune index` and `cliptune search`: building an index and querying it from the command line."""

from __future__ import annotations

import argparse
import json

from cliptune.index.index import Index


def index(args: argparse.Namespace) -> int:
    options = {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "add": args.add,
        "feature_cache": args.feature_cache,
    }
    idx = Index.build(args.model, args.images, args.out, **options)
    ann = idx.info["ann"]
    quality = "exact" if ann["kind"] == "Flat" else f"recall@10 {ann['recall_at_10']:.3f} at nprobe {ann['nprobe']}"
    skipped = f", {idx.info['skipped']} skipped" if idx.info["skipped"] else ""
    print(f"wrote {args.out}: {len(idx)} images{skipped}, {idx.dim}-d, faiss {ann['kind']} ({quality})")
    return 0


def search(args: argparse.Namespace) -> int:
    idx = Index.open(args.index)
    hits = idx.search(text=args.text, image=args.image, k=args.k)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
        return 0
    for hit in hits:
        caption = f"  {hit.captions[0]}" if hit.captions else ""
        print(f"{hit.rank:>3}  {hit.score:.4f}  {hit.path}{caption}")
    return 0
