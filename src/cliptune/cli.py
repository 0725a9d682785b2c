"""`cliptune <command>`: a thin command line over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cliptune.config import ConfigError
from cliptune.utils.files import atomic_write
from cliptune.utils.lock import FolderInUseError
from cliptune.utils.memory import keep_freed_memory


def _train(args: argparse.Namespace) -> int:
    from cliptune.api import finetune

    results = finetune(args.config, resume=args.resume, overrides=args.overrides)
    if "final" not in results:  # a process other than rank 0 of a torchrun job: rank 0 reports
        return 0
    print(_table(results["baseline"], results["final"]))
    print(f"\nrun directory: {results['run_dir']}  (summary.md, results.json, curves.png, model/)")
    return 0


def _table(baseline: dict, final: dict) -> str:
    lines = []
    for name in final or baseline:
        before, after = baseline.get(name, {}), final.get(name, {})
        lines.append(f"\n{name:<24}{'baseline':>10}{'final':>10}")
        for metric in after or before:
            b, a = before.get(metric), after.get(metric)
            lines.append(f"  {metric:<22}{_num(b):>10}{_num(a):>10}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _dataset_arg(args: argparse.Namespace) -> dict:
    from cliptune.api import is_labelled_images

    spec = {"path": args.data}
    if is_labelled_images(args.data):
        if args.templates:
            spec["templates"] = args.templates
        if args.classnames:
            spec["classnames"] = args.classnames
    elif args.negatives_key:  # a compositionality table: true caption ranked against its false ones
        spec.update(image_key=args.image_key, caption_key=args.caption_key, negatives_key=args.negatives_key)
    else:
        spec.update(image_key=args.image_key, caption_key=args.caption_key, split=args.split)
    if args.images_root:
        spec["images_root"] = args.images_root
    return spec


def _eval(args: argparse.Namespace) -> int:
    from cliptune.api import evaluate, load

    out = _output(args.out, args.model, args.data) if args.out else None
    metrics = evaluate(load(args.model, device=args.device), _dataset_arg(args), batch_size=args.batch_size)
    text = json.dumps(metrics, indent=2)
    if out is not None:
        with atomic_write(out) as tmp:
            tmp.write_text(text + "\n")
    print(text)
    return 0


def _output(out: str, *inputs: str) -> Path:
    """`--out` checked before any work: not a folder, its folder exists, and not one of the command's inputs."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file path")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {path.parent} does not exist; create it first")
    for source in inputs:
        if source and Path(source).expanduser().resolve() in (path.resolve(), *path.resolve().parents):
            raise ValueError(f"--out {out}: would overwrite the input {source}; write somewhere else")
    return path


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    from cliptune.api import load
    from cliptune.config import TableSpec
    from cliptune.data import read_caption_table

    out = _output(args.out, args.model, args.images or args.texts)
    out = out if out.suffix == ".npy" else _output(f"{args.out}.npy", args.model, args.images or args.texts)
    encoder = load(args.model, device=args.device)
    if args.images:
        source = Path(args.images)
        if source.suffix in (".csv", ".tsv", ".jsonl"):
            spec = TableSpec(
                path=args.images, image_key=args.image_key, caption_key=args.caption_key, images_root=args.images_root
            )
            items = read_caption_table(spec).images
        else:  # a plain list of image paths, one per line
            items = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        emb = encoder.encode_images(items, batch_size=args.batch_size)
    else:
        texts = [line.strip() for line in Path(args.texts).read_text().splitlines() if line.strip()]
        emb = encoder.encode_texts(texts, batch_size=args.batch_size)
    with atomic_write(out) as tmp, tmp.open("wb") as f:
        np.save(f, emb)
    print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32, L2-normalised")
    return 0


def _models(args: argparse.Namespace) -> int:
    from cliptune.models.openclip import TINY_ARCHS, pretrained_archs
    from cliptune.models.presets import PRESETS

    print("presets (model.preset):")
    for name, spec in PRESETS.items():
        towers = f"{spec['image_tower']['name']} + {spec['text_tower']['name']}" if "image_tower" in spec else ""
        print(f"  {name}  [{spec['backend']}] {towers}")
    print("\npackaged tiny architectures (random init, for tests and smoke runs):")
    for name in TINY_ARCHS:
        print(f"  {name}")
    print("\nOpenCLIP architectures (model.arch), with their pretrained tags (model.pretrained):")
    for name, tags in pretrained_archs():
        print(f"  {name}" + (f"  [{', '.join(tags)}]" if tags else ""))
    return 0


def _export(args: argparse.Namespace) -> int:
    from cliptune.export import export

    report = export(args.model, args.format, args.out, alpha=args.alpha, quantize=args.quantize)
    print(f"wrote {report['out']} ({args.format}) in {report['seconds']} s")
    for name, size in report["files"].items():
        print(f"  {name:<40}{size / 1e6:>10.2f} MB")
    if "max_abs_diff" in report:
        print(f"max |difference| of the loaded export's embeddings vs cliptune's: {report['max_abs_diff']:.2e}")
    if "retrieval_change" in report:
        print(f"int8 vs fp32: max |embedding difference| {report['int8_max_abs_diff']:.2e}")
        for metric, change in report["retrieval_change"].items():
            fp32, int8 = report["retrieval_fp32"][metric], report["retrieval_int8"][metric]
            print(f"  {metric:<14} fp32 {fp32:6.2f}  int8 {int8:6.2f}  change {change:+.2f}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from cliptune.data.shards import run  # webdataset is imported only by this command

    return run(args)


def _compositionality(args: argparse.Namespace) -> int:
    from cliptune.eval.compositionality import main as build  # spaCy and WordNet load only for this command

    return build(["build", *args.options])


def _index(args: argparse.Namespace) -> int:
    from cliptune.index.cli import index

    return index(args)


def _search(args: argparse.Namespace) -> int:
    from cliptune.index.cli import search

    return search(args)


def _serve(args: argparse.Namespace) -> int:
    from cliptune.serve import serve

    return serve(args)


def _runs(args: argparse.Namespace) -> int:
    from cliptune.train.runs import compare, runs_table

    folder = Path(args.folder)
    print(compare(folder, args.compare, args.md) if args.compare else runs_table(folder, args.md))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from cliptune.train.sweep import run_sweep

    best = run_sweep(
        args.config,
        args.space,
        trials=args.trials,
        timeout_min=args.timeout,
        overrides=args.overrides,
        startup_trials=args.startup_trials,
        warmup_evals=args.warmup_evals,
    )
    print(f"best trial {best['number']}: {best['value']:.4g} ({best['metric']}); sweep folder {best['folder']}")
    print(f"  sweep.md, sweep.csv, one PNG per parameter; reproduce it: cliptune train {best['folder']}/best.yaml")
    return 0


def _config(args: argparse.Namespace) -> int:
    from cliptune.config import markdown_table

    print(markdown_table())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliptune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune as a YAML config says")
    train.add_argument("config", help="YAML config (a run's own config.yaml reproduces that run)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4 name=try2")
    train.add_argument("--resume", action="store_true", help="continue the run in its run directory")
    train.set_defaults(func=_train)

    for name, func, help_ in (
        ("eval", _eval, "evaluate a run or model spec on a dataset"),
        ("encode", _encode, "write embeddings of images or texts to a .npy file"),
    ):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("--model", required=True, help="run directory, saved model folder, or arch[:tag]")
        cmd.add_argument("--device", default="auto")
        cmd.add_argument("--batch-size", type=int, default=64)
        cmd.add_argument("--image-key", default="image")
        cmd.add_argument("--caption-key", default="caption")
        cmd.add_argument("--images-root", default=None)
        cmd.set_defaults(func=func)
        if name == "eval":
            cmd.add_argument("--data", required=True, help="caption table (.csv/.tsv/.jsonl), class folder or list")
            cmd.add_argument("--templates", nargs="+", default=None, help="zero-shot prompt templates with {}")
            cmd.add_argument("--classnames", nargs="+", default=None, help="zero-shot class names in label order")
            cmd.add_argument(
                "--negatives-key",
                default=None,
                help="score a compositionality table instead: the column of false captions (e.g. negatives)",
            )
            cmd.add_argument("--split", default=None, help="Karpathy-split .json only: train, val, test, ...")
            cmd.add_argument("--out", default=None, help="also write the metrics to this JSON file")
        else:
            source = cmd.add_mutually_exclusive_group(required=True)
            source.add_argument("--images", help="caption table, or a text file with one image path per line")
            source.add_argument("--texts", help="text file with one text per line")
            cmd.add_argument("--out", required=True, help="output .npy file")

    runs = sub.add_parser("runs", help="a table of the runs in an output folder, or --compare some of them")
    runs.add_argument("folder", nargs="?", default="runs", help="output folder (runtime.output_dir; default: runs)")
    runs.add_argument("--compare", nargs="+", metavar="RUN", default=None, help="run names or folders side by side")
    runs.add_argument("--md", action="store_true", help="Markdown tables")
    runs.set_defaults(func=_runs)
    sweep = sub.add_parser("sweep", help="search hyperparameters with Optuna (TPE, median pruning, resumable)")
    sweep.add_argument("config", help="YAML config of the runs to sweep over")
    sweep.add_argument(
        "--space", required=True, help="YAML: config key -> {log_uniform|uniform|int: [lo, hi]} or a list"
    )
    sweep.add_argument("--trials", type=int, default=20, help="trials to finish in this sweep (counting earlier ones)")
    sweep.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many minutes")
    sweep.add_argument(
        "--startup-trials",
        type=int,
        default=None,
        help="finished trials before pruning starts (default: a third of --trials, 1 to 5)",
    )
    sweep.add_argument(
        "--warmup-evals", type=int, default=None, help="a trial's first N evaluations never prune it (default 1)"
    )
    sweep.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every trial")
    sweep.set_defaults(func=_sweep)
    sub.add_parser("models", help="list model architectures and pretrained tags").set_defaults(func=_models)
    sub.add_parser("config", help="every config key with its type, default and meaning").set_defaults(func=_config)
    export = sub.add_parser("export", help="write a model for cliptune, open_clip, transformers or onnxruntime")
    export.add_argument("--model", required=True, help="run directory, saved model folder, or arch[:tag]")
    export.add_argument("--format", default="cliptune", choices=["cliptune", "open_clip", "hf", "onnx"])
    export.add_argument("--out", required=True, help="output folder (replaced as a whole once the export is checked)")
    export.add_argument("--alpha", type=float, default=None, help="WiSE-FT: 0 = the run's starting weights, 1 = final")
    export.add_argument("--quantize", choices=["int8"], default=None, help="onnx: also write int8 graphs")
    export.set_defaults(func=_export)

    from cliptune.data.shards import add_arguments as shard_arguments

    shards = sub.add_parser("shards", help="write a caption table as webdataset tar shards (data.shards)")
    shard_arguments(shards)
    shards.set_defaults(func=_shards)
    comp = sub.add_parser(
        "compositionality",
        help="build a true-vs-false caption table (eval.compositionality) with generated hard negatives",
        description="Options: --data TABLE --out FILE.jsonl [--count 3] [--seed 0] [--tagger auto|spacy|rules] "
        "[--kinds swap replace shuffle] [--image-key --caption-key --images-root]",
    )
    comp.add_argument("options", nargs=argparse.REMAINDER, help="--data TABLE --out FILE.jsonl [...]")
    comp.set_defaults(func=_compositionality)
    _search_commands(sub)
    return parser


def _search_commands(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="encode a folder, caption table, list file or shards into a search index")
    index.add_argument("--model", required=True, help="run directory, saved model folder, or arch[:tag]")
    index.add_argument("--images", required=True, help="folder (recursive), caption table, list file, or shards")
    index.add_argument("--out", required=True, help="index folder (a killed build continues when run again)")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--workers", type=int, default=None, help="image decoding processes (default: up to 4)")
    index.add_argument("--add", action="store_true", help="update: encode new and changed images, drop deleted")
    index.add_argument(
        "--feature-cache",
        default=None,
        help="a training run's runtime.feature_cache: images whose locked image-trunk outputs are there skip the trunk",
    )
    index.set_defaults(func=_index, on_interrupt="run the same command again to continue where it stopped")
    search = sub.add_parser("search", help="the images of an index nearest to a text or an image")
    search.add_argument("--index", required=True, help="index folder written by `cliptune index`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="search by this caption")
    query.add_argument("--image", help="search by this image file")
    search.add_argument("-k", type=int, default=10, help="how many results")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.set_defaults(func=_search)
    serve = sub.add_parser("serve", help="a search page and JSON API over an index (and a second one to compare)")
    serve.add_argument("--index", required=True, help="index folder")
    serve.add_argument("--compare", default=None, help="a second index shown beside the first (e.g. the base model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # `compositionality` hands its options on unparsed (its module imports torch); argparse's REMAINDER does not take
    # options that come first (`--data ...`), so they arrive here as unknown arguments.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "compositionality":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "compositionality":
        args.options = [*unknown, *args.options]
    keep_freed_memory()  # CPU forwards about 5x faster: utils/memory.py, benchmarks/heap.py
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError, FolderInUseError) as e:  # the project's errors are ValueError subclasses
        print(f"cliptune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = getattr(args, "on_interrupt", "`cliptune train CONFIG --resume` continues from the last checkpoint")
        print(f"cliptune: interrupted; {how}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
