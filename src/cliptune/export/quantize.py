"""`--quantize int8`: onnxruntime dynamic quantization of the exported graphs, with what it costs in retrieval.

The weights of matrix products (MatMul, Gemm) become int8 and their inputs are quantized on the fly
(`onnxruntime.quantization.quantize_dynamic`); convolutions stay fp32 (see `quantize_folder`). The
change is measured, not assumed: the fp32 and int8 graphs embed the same generated image-caption set (coloured
shapes, `cliptune.data.synthetic`, so it works offline for any model) and their retrieval recall is compared, along
with the largest embedding difference.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cliptune.export.onnx import IMAGE_FILE, TEXT_FILE, _text_inputs, encode, session
from cliptune.models import ClipModel

QUANTIZED = {"int8": "int8"}
PROBE_IMAGES = 60
_OPS = ["MatMul", "Gemm"]


def quantize_folder(model: ClipModel, tokenizer: Any, folder: Path, kind: str) -> dict[str, Any]:
    """Write `*.int8.onnx` beside the fp32 graphs; return the files and the measured retrieval change."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if kind not in QUANTIZED:
        raise ValueError(f"--quantize {kind!r}: supported: {', '.join(QUANTIZED)}")
    files = []
    for name in (IMAGE_FILE, TEXT_FILE):
        target = folder / name.replace(".onnx", f".{kind}.onnx")
        # Matrix products only: dynamically quantized convolutions (ConvInteger) ran 13x slower than fp32 on
        # lite0-minilm's image tower here (benchmarks/export.py), while int8 MatMul/Gemm speed transformers up.
        quantize_dynamic(str(folder / name), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=_OPS)
        files.append(target.name)
    fp32 = _retrieval(model, tokenizer, folder, IMAGE_FILE, TEXT_FILE)
    int8 = _retrieval(model, tokenizer, folder, *files)
    change = {k: round(int8[k] - fp32[k], 2) for k in fp32 if k != "embeddings"}
    diff = max(float(np.abs(a - b).max()) for a, b in zip(fp32.pop("embeddings"), int8.pop("embeddings")))
    return {
        "quantized_files": files,
        "retrieval_fp32": fp32,
        "retrieval_int8": int8,
        "retrieval_change": change,
        "int8_max_abs_diff": diff,
    }


def _retrieval(model: ClipModel, tokenizer: Any, folder: Path, image_file: str, text_file: str) -> dict[str, Any]:
    """Recall@k of the graphs on the generated shapes set, and the embeddings (to compare fp32 with int8)."""
    from cliptune.data.synthetic import make_shapes
    from cliptune.metrics import retrieval

    with tempfile.TemporaryDirectory() as tmp:
        table = make_shapes(tmp, n_train=0, n_val=PROBE_IMAGES, image_size=64)["val"]
        with table.open(newline="") as f:
            rows = list(csv.DictReader(f))
        pixels = np.stack([_pixels(model, Path(tmp) / row["image"]) for row in rows])
    captions, owner = [], []
    for i, row in enumerate(rows):
        for caption in json.loads(row["caption"]):
            captions.append(caption)
            owner.append(i)
    images = encode(session(folder / image_file), {"pixel_values": pixels})
    inputs = {k: v.numpy() for k, v in _text_inputs(model, tokenizer, captions).items()}
    texts = encode(session(folder / text_file), inputs)
    return {**retrieval(images, texts, owner, ks=(1, 5)), "embeddings": (images, texts)}


def _pixels(model: ClipModel, path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return model.eval_transform(image.convert("RGB")).numpy()
