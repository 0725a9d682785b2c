"""Captions longer than a model's text context are counted (`ClipModel.text_overflow`) and named once per set."""

import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch

import cliptune
from cliptune.config import TableSpec
from cliptune.data import CaptionTable, read_caption_table
from cliptune.features import Encoding
from cliptune.models import build_model
from cliptune.models.prompted import add_prompts
from tests.helpers import run_config


class _Records(logging.Handler):
    """The run's own log handlers stop propagation to pytest's: listen on the `cliptune` logger itself."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _cut_short_by_tokenize(model, texts: list[str]) -> list[int]:
    """Brute force from `tokenize` alone: texts[k] (k+1 words) is cut short iff its ids equal those of texts[k-1].

    Every backend truncates keeping its special tokens, so the ids stop changing exactly when words stop fitting.
    """
    ids = model.tokenize(texts)
    return [k for k in range(1, len(texts)) if torch.equal(ids[k], ids[k - 1])]


@pytest.mark.parametrize("name", ["openclip-vit", "hf-clip", "hf-siglip", "composed", "prompted"])
def test_overflow_counts_what_tokenize_cuts_short_on_every_backend(backends, name):
    model = add_prompts(build_model(backends["openclip-vit"]), 4) if name == "prompted" else build_model(backends[name])
    length = model.tokenize(["cat"]).shape[-1]
    texts = [" ".join(["cat"] * k) for k in range(1, length + 4)]
    expected = _cut_short_by_tokenize(model, texts)
    found = model.text_overflow(texts)
    assert expected, "the longest captions must overflow"
    assert (found.truncated, found.first, found.context_length) == (len(expected), expected[0], length)
    assert model.text_overflow(texts[: expected[0]]).truncated == 0


def test_eval_and_training_sets_name_their_cut_short_captions_once(shapes, tmp_path):
    long = " ".join(["a red square on a white background"] * 20)  # about 140 tokens: over the 77-token context
    rows = (shapes / "val.csv").read_text().splitlines()
    table = tmp_path / "long.csv"
    table.write_text("\n".join([rows[0], *rows[1:5], f"{rows[5].split(',')[0]},{long}", *rows[6:]]) + "\n")
    cfg = run_config(shapes, tmp_path, epochs=2)
    cfg["data"]["train"] = {"path": str(table), "images_root": str(shapes)}
    cfg["eval"] = {"retrieval": [{"path": str(table), "name": "long_val", "images_root": str(shapes)}]}
    cfg["train"]["batch_size"] = 8
    records = _Records()
    logging.getLogger("cliptune").addHandler(records)
    try:
        out = cliptune.finetune(cfg)
    finally:
        logging.getLogger("cliptune").removeHandler(records)
    said = [m for m in records.messages if "longer than the model's text context" in m]
    # once for training, once for the eval set, although the set is evaluated before training and after each epoch
    assert len(said) == 2, said
    assert said[0].startswith("training set 'long': 1 of ") and "context of 77 tokens" in said[0]
    assert said[1].startswith("eval set 'long_val': 1 of ") and "'a red square on a white" in said[1]
    _check_reported_counts(out["run_dir"], read_caption_table(TableSpec(path=str(table), images_root=str(shapes))))


def _check_reported_counts(run_dir: str, table: CaptionTable) -> None:
    """results.json and summary.md carry each set's count, equal to an independent count: every caption tokenised
    by open_clip's tokenizer with room to spare, its length compared with the 77-token context."""
    captions = table.flat()[0]
    lengths = (open_clip.get_tokenizer("cliptune-tiny-vit")(captions, context_length=1000) != 0).sum(dim=1)
    expected = int((lengths > 77).sum())
    assert expected == 1
    results = json.loads((Path(run_dir) / "results.json").read_text())
    counts = {c["set"]: c for c in results["text_overflow"]}
    assert set(counts) == {"training set 'long'", "eval set 'long_val'"}
    for count in counts.values():
        assert (count["truncated"], count["texts"], count["context_length"]) == (expected, len(captions), 77)
        assert count["first"].startswith("a red square on a white")
    summary = (Path(run_dir) / "summary.md").read_text()
    for where in counts:
        line = f"- {where}: {expected} of {len(captions)} captions are longer than the model's text context of 77"
        assert line in summary and "shorten them, or use a model with a longer context" in summary


def test_a_model_without_a_tokenizer_to_count_with_counts_nothing(backends):
    model = build_model(backends["openclip-vit"])

    def refuse():
        raise model.cannot_export("onnx", "no tokenizer here")

    model.hf_tokenizer = refuse
    assert super(type(model), model).text_overflow(["cat"]) is None  # the documented default
    assert Encoding(model).report_overflow(["cat"], "x") is not None  # open_clip's own BPE still counts
