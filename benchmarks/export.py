"""Measure `cliptune export`: time, size and fidelity per format and backend, and ONNX Runtime vs torch speed.

    python benchmarks/export.py                      # all models below; about 15 min on 2 CPU cores
    python benchmarks/export.py --models vit-b-32    # one of them

For each model (real architectures, built offline: random-initialised open_clip ViT-B-32 and RN50, the ViT-B-32
converted to a transformers CLIPModel and loaded by the hf backend, and lite0-minilm with its packaged pretrained
towers) and each format that can hold it: export wall time, size on disk, and the largest difference between the
embeddings of the loaded export (open_clip / transformers / onnxruntime) and cliptune's. Then encoding throughput
of the ONNX graphs in onnxruntime (fp32 and dynamic int8) against torch eager (fp32, no_grad), images/s and
captions/s, with the retrieval change int8 brings on the generated shapes set. Writes benchmarks/RESULTS.md,
section "export".
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

import cliptune
from cliptune.config import ModelConfig
from cliptune.export.onnx import session
from cliptune.export.preprocess import describe
from cliptune.inference import load_any, parse_model_spec
from cliptune.models import ClipModel, build_model

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section

IMAGE_BATCH, TEXT_BATCH, REPEATS = 16, 64, 3
CAPTION = "a photo of a small red car parked next to a tall green tree"


def _vit_b_32(work: Path) -> ClipModel:
    return build_model(ModelConfig(arch="ViT-B-32"))


def _rn50(work: Path) -> ClipModel:
    return build_model(ModelConfig(arch="RN50"))


def _hf_clip(work: Path) -> ClipModel:
    folder = work / "hf-clip-source"
    if not folder.is_dir():
        cliptune.export(_vit_b_32(work), "hf", folder)
    return load_any(str(folder))


def _lite0_minilm(work: Path) -> ClipModel:
    return build_model(parse_model_spec("lite0-minilm"))


# name -> (builder, formats measured)
MODELS: dict[str, tuple[Callable[[Path], ClipModel], tuple[str, ...]]] = {
    "vit-b-32": (_vit_b_32, ("cliptune", "open_clip", "hf", "onnx")),
    "rn50": (_rn50, ("cliptune", "open_clip", "onnx")),
    "hf-clip-vit-b-32": (_hf_clip, ("cliptune", "hf", "onnx")),
    "lite0-minilm": (_lite0_minilm, ("cliptune", "onnx")),
}


def _rate(run: Callable[[], Any], items: int) -> float:
    run()  # warm-up: first calls allocate and pick kernels
    started = time.perf_counter()
    for _ in range(REPEATS):
        run()
    return items * REPEATS / (time.perf_counter() - started)


def _throughput(model: ClipModel, folder: Path, quantized: bool) -> dict[str, float]:
    """images/s and captions/s of torch eager and of the ONNX graphs (fp32, and int8 when written)."""
    side = int(describe(model.eval_transform)["crop"][0])
    pixels = torch.rand(IMAGE_BATCH, 3, side, side)
    tokens = model.tokenize([CAPTION] * TEXT_BATCH)
    out: dict[str, float] = {}
    with torch.no_grad():
        out["torch images/s"] = _rate(lambda: model.encode_image(pixels), IMAGE_BATCH)
        out["torch captions/s"] = _rate(lambda: model.encode_text(tokens), TEXT_BATCH)
    text_feed = {"input_ids": tokens.numpy()}
    if model.text_attention_mask:
        text_feed["attention_mask"] = (tokens != model.hf_tokenizer().pad_token_id).long().numpy()
    for kind, suffix in (("onnx", ""), ("onnx int8", ".int8")) if quantized else (("onnx", ""),):
        images, text = session(folder / f"image_encoder{suffix}.onnx"), session(folder / f"text_encoder{suffix}.onnx")
        out[f"{kind} images/s"] = _rate(partial(images.run, None, {"pixel_values": pixels.numpy()}), IMAGE_BATCH)
        out[f"{kind} captions/s"] = _rate(partial(text.run, None, text_feed), TEXT_BATCH)
    return out


def measure(name: str, work: Path) -> tuple[list[list[str]], list[str] | None, dict[str, Any] | None]:
    builder, formats = MODELS[name]
    model = builder(work).eval()
    rows, speed, quant = [], None, None
    for fmt in formats:
        out = work / f"{name}-{fmt}"
        report = cliptune.export(model, fmt, out, quantize="int8" if fmt == "onnx" else None)
        fp32_size = sum(size for file, size in report["files"].items() if ".int8." not in file)
        diff = report.get("max_abs_diff")
        rows.append(
            [name, fmt, f"{report['seconds']:.1f}", f"{fp32_size / 1e6:.0f}", "-" if diff is None else f"{diff:.1e}"]
        )
        if fmt == "onnx":
            rates = _throughput(model, out, quantized=True)
            speed = [name, *(f"{rates[k]:.1f}" for k in sorted(rates))]
            speed_keys = sorted(rates)
            quant = {"name": name, "keys": speed_keys, **report}
        shutil.rmtree(out)
    return rows, speed, quant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="cliptune-export-bench-"))
    exports, speeds, quants = [], [], []
    try:
        for name in args.models:
            rows, speed, quant = measure(name, work)
            exports += rows
            speeds += [speed] if speed else []
            quants += [quant] if quant else []
            print("\n".join(" | ".join(r) for r in rows), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_section("export", _markdown(args.models, exports, speeds, quants))
    return 0


def _markdown(names: list[str], exports: list[list[str]], speeds: list[list[str]], quants: list[dict]) -> str:
    keys = quants[0]["keys"] if quants else []
    lines = [
        f"`python benchmarks/export.py --models {' '.join(names)}` on {machine()}; the CPU was shared with other "
        "jobs, so times and rates vary by tens of percent between runs.",
        "",
        "Models are real architectures built offline: open_clip ViT-B-32 and RN50 random-initialised, the ViT-B-32 "
        "converted to a transformers CLIPModel and loaded by the hf backend, lite0-minilm with its packaged "
        "pretrained towers. Max difference: largest |embedding difference| between the export as its own library "
        "loads it (open_clip `local-dir:`, transformers `from_pretrained`, onnxruntime at batch 1 and 7) and "
        "cliptune's, on the same inputs. Export time includes that check.",
        "",
        "| model | format | export s | size MB (fp32) | max difference |",
        "|---|---|---:|---:|---:|",
        *("| " + " | ".join(r) + " |" for r in exports),
        "",
        f"Encoding throughput (batches of {IMAGE_BATCH} images / {TEXT_BATCH} captions, fp32 torch eager with "
        "no_grad vs onnxruntime CPUExecutionProvider; int8 = onnxruntime dynamic quantization):",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
        *("| " + " | ".join(s) + " |" for s in speeds),
        "",
        "int8 retrieval change on the generated shapes set (60 images, 180 captions; `--quantize int8` prints it). "
        "The open_clip models are random-initialised and lite0-minilm's heads are new, so recall sits near chance: "
        "the rows show how far int8 moves embeddings and rankings, not a model's quality.",
        "",
        "| model | int8 max embedding diff | mean recall fp32 | mean recall int8 | change |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {q['name']} | {q['int8_max_abs_diff']:.3f} | {q['retrieval_fp32']['mean_recall']:.2f} | "
            f"{q['retrieval_int8']['mean_recall']:.2f} | {q['retrieval_change']['mean_recall']:+.2f} |"
            for q in quants
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
