"""The `onnx` export format: `image_encoder.onnx` and `text_encoder.onnx`, traced from any model's encoders.

Inputs `pixel_values` [B, 3, H, W] and `input_ids` [B, L] (plus `attention_mask` [B, L] for towers that read one);
output `embeddings` [B, D], L2-normalised as `encode_images` / `encode_texts` return them (a classifier's image
encoder also outputs `logits` [B, C]). The batch is dynamic, and so is L where the tower gives the same embedding
at any padded length. `preprocess.json` and the tokenizer files sit beside; the graphs are checked in onnxruntime
against torch at batch 1 and 7 before the export counts as done.

The graphs are traced with torch's TorchScript-based exporter (`dynamo=False`): on this project's tiny models the
torch.export-based one took 10-12 s per tower against 0.3-2 s (measured on 2 shared CPU cores), and every
backend traces cleanly (value-dependent padding trims are switched off while tracing: `models.base.tracing`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cliptune.export.preprocess import describe
from cliptune.export.verify import CAPTIONS, sample_images
from cliptune.models import ClipModel

IMAGE_FILE, TEXT_FILE, PREPROCESS_FILE = "image_encoder.onnx", "text_encoder.onnx", "preprocess.json"
OPSET = 17
TOLERANCE = 1e-3  # an export further than this from torch is broken, not rounded; tests hold it to 1e-4
CHECK_BATCHES = (1, 7)


class ImageEncoder(nn.Module):
    def __init__(self, model: ClipModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.model.encode_image(pixel_values, normalize=True)
        if callable(getattr(self.model, "classify", None)):  # a classifier keeps its head: no partial export
            return embeddings, self.model.classify(pixel_values)
        return embeddings


class TextEncoder(nn.Module):
    def __init__(self, model: ClipModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            return self.model.encode_text(input_ids, normalize=True)
        return self.model.encode_text_with_mask(input_ids, attention_mask, normalize=True)


def write(model: ClipModel, folder: Path, quantize: str | None = None, **_: Any) -> dict[str, Any]:
    tokenizer = model.hf_tokenizer()  # first: a model without one fails before anything is traced
    preprocess = describe(model.eval_transform)
    image_outputs = ["embeddings", "logits"] if callable(getattr(model, "classify", None)) else ["embeddings"]
    image_axes = {"pixel_values": [0], **{name: [0] for name in image_outputs}}
    _trace(ImageEncoder(model), (sample_images(model, 2),), folder / IMAGE_FILE, image_axes)
    text = _text_inputs(model, tokenizer, CAPTIONS[:2])
    dynamic_length = model.text_length_free() and _trace_any_length(model, tokenizer, text, folder / TEXT_FILE)
    if not dynamic_length:
        _trace(
            TextEncoder(model), tuple(text.values()), folder / TEXT_FILE, {**{k: [0] for k in text}, "embeddings": [0]}
        )
    tokenizer.save_pretrained(folder)
    settings = {
        "image": {"input": "pixel_values", "outputs": image_outputs, **preprocess},
        "text": {
            "inputs": list(text),
            "context_length": int(tokenizer.model_max_length),
            "padding": "max_length",
            "dynamic_length": dynamic_length,
        },
        "embeddings": "L2-normalised",
    }
    report = {"max_abs_diff": check(model, tokenizer, folder), "dynamic_length": dynamic_length}
    if quantize is not None:
        from cliptune.export.quantize import quantize_folder

        report |= quantize_folder(model, tokenizer, folder, quantize)
        settings["quantized"] = {"type": quantize, "files": report["quantized_files"]}
    (folder / PREPROCESS_FILE).write_text(json.dumps(settings, indent=2))
    return report


def _trace_any_length(model: ClipModel, tokenizer: Any, text: dict[str, torch.Tensor], path: Path) -> bool:
    """Trace the text encoder with a dynamic length; keep it only if shorter ids really embed the same.

    A tower may allow any length while its trace does not (nn.MultiheadAttention, in open_clip's towers, reshapes
    with the traced length baked in): onnxruntime then fails or differs on shorter ids, and the caller traces a
    fixed length.
    """
    axes = {**{name: [0, 1] for name in text}, "embeddings": [0]}
    _trace(TextEncoder(model), tuple(text.values()), path, axes)
    probe = _text_inputs(model, tokenizer, CAPTIONS[2:4])
    with torch.no_grad():
        want = model.encode_text(probe["input_ids"]).numpy()
    content = int(tokenizer(CAPTIONS[2:4], padding="longest", return_tensors="pt")["input_ids"].shape[1])
    try:
        probe_session = session(path, quiet=True)
        for length in (content, content + 3):
            got = encode(probe_session, {k: v[:, :length].numpy() for k, v in probe.items()})
            if np.abs(got - want).max() > TOLERANCE:
                return False
    except Exception:  # onnxruntime's shape errors have no public class: any failure means "not dynamic"
        return False
    return True


def _text_inputs(model: ClipModel, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """input_ids as `model.tokenize` gives them, plus the tokenizer's attention mask for towers that read one."""
    ids = model.tokenize(texts)
    if not model.text_attention_mask:
        return {"input_ids": ids}
    mask = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask.to(ids.dtype)}


def _trace(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, axes: dict[str, list[int]]) -> None:
    """Trace `module` to `path`; `axes` names every input then output with its dynamic dimensions."""
    names = {0: "batch", 1: "length"}
    dynamic = {name: {a: names[a] for a in dims} for name, dims in axes.items()}
    inputs = list(axes)[: len(args)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (see the module doc) and warns about traced
        # Python values (shapes) that the graph keeps dynamic anyway: neither is actionable here.
        warnings.simplefilter("ignore")
        # A frozen nn.MultiheadAttention (locked tower, LoRA base) runs a fused kernel ONNX has no operator for.
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                input_names=inputs,
                output_names=list(axes)[len(args) :],
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def encode(session: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The `embeddings` output of an onnxruntime session."""
    return session.run(["embeddings"], inputs)[0]


def session(path: Path, quiet: bool = False) -> Any:
    """An onnxruntime CPU session; `quiet` also silences errors (for a probe whose failure is an answer)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3  # ORT warns about unused initialisers the exporter leaves
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check(
    model: ClipModel, tokenizer: Any, folder: Path, image_file: str = IMAGE_FILE, text_file: str = TEXT_FILE
) -> float:
    """Largest |onnxruntime - torch| over the embeddings of batches of 1 and 7 images and captions."""
    images, text = session(folder / image_file), session(folder / text_file)
    captions = (CAPTIONS * 2)[: max(CHECK_BATCHES)]
    pixels = sample_images(model, max(CHECK_BATCHES), seed=1)
    worst = 0.0
    for batch in CHECK_BATCHES:
        ours = model.encode_image(pixels[:batch]).numpy()
        worst = max(worst, float(np.abs(encode(images, {"pixel_values": pixels[:batch].numpy()}) - ours).max()))
        inputs = _text_inputs(model, tokenizer, captions[:batch])
        ours = model.encode_text(inputs["input_ids"]).numpy()
        theirs = encode(text, {k: v.numpy() for k, v in inputs.items()})
        worst = max(worst, float(np.abs(theirs - ours).max()))
    if worst > TOLERANCE:
        raise RuntimeError(f"ONNX export of this {model.backend} model differs from torch by {worst:.2e}")
    return worst
