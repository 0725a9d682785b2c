"""Tiny models and data shared by several test modules (fixtures live in conftest.py)."""

import csv
import gzip
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from cliptune.config import ModelConfig, TowerConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository: benchmarks/, README.md, configs/

WORDS = ["a", "the", "red", "green", "blue", "big", "small", "square", "circle", "triangle"]
WORDS += ["dog", "puppy", "cat", "on", "in", "of", "with", "and", "photo"]
CAPTIONS = ["a red square", "a big blue circle on the green triangle", "a dog", "a small cat in a photo"]
EMBED = 16


def load_benchmark(name: str):
    """The module of `benchmarks/NAME.py`, imported under `bench_NAME` (dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def save_tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT and its WordPiece tokenizer, saved like a hub model folder."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


def tiny_config(
    bert_dir: Path, head: str = "linear", pooling: str = "mean", image: TowerConfig | None = None
) -> ModelConfig:
    return ModelConfig(
        backend="composed",
        image_tower=image or TowerConfig(source="timm", name="test_resnet", pretrained=False),
        text_tower=TowerConfig(source="hf", name=str(bert_dir), pooling=pooling),
        head=head,
        embed_dim=EMBED,
    )


# ---------------------------------------------------------------------------------------------------------------
# Tiny Hugging Face CLIP and SigLIP models, saved like hub folders

IMAGE_SIZE, EMBED_DIM = 32, 16
SIGLIP_CONTEXT = 16
HF_WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "small", "big", "on", "grass"]
HF_WORDS += ["sitting", "in", "sun", "very", "long", "caption"]
HF_CAPTIONS = ["a photo of a cat", "a dog on the grass", "a small red car", "a big blue house"]
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def clip_tokenizer() -> CLIPTokenizer:
    """OpenAI's CLIP BPE tokenizer, built from the vocabulary open_clip ships (the same as the hub's vocab.json)."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=77)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer that ends each text with `</s>` and pads with it, like SigLIP's."""
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(HF_WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


def save_tiny_clip(folder: Path) -> Path:
    torch.manual_seed(0)
    # eos_token_id=2 as in OpenAI's hub configs: the old rule transformers keeps for it must not matter here.
    text = dict(TOWER, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=2)
    vision = dict(TOWER, image_size=IMAGE_SIZE, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED_DIM)).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop).save_pretrained(folder)
    return folder


def save_tiny_siglip(folder: Path) -> Path:
    torch.manual_seed(0)
    ids = dict(bos_token_id=None, eos_token_id=1, pad_token_id=1)
    text = dict(TOWER, **ids, vocab_size=len(HF_WORDS) + 2, max_position_embeddings=SIGLIP_CONTEXT)
    text["projection_size"] = EMBED_DIM
    vision = dict(TOWER, hidden_size=EMBED_DIM, image_size=IMAGE_SIZE, patch_size=8)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def every_backend(root: Path) -> dict[str, ModelConfig]:
    """A tiny random model config of every backend (OpenCLIP ViT and ResNet, HF CLIP and SigLIP, composed)."""
    return {
        "openclip-vit": ModelConfig(arch="cliptune-tiny-vit"),
        "openclip-rn": ModelConfig(arch="cliptune-tiny-rn"),
        "hf-clip": ModelConfig(backend="hf", arch=str(save_tiny_clip(root / "clip"))),
        "hf-siglip": ModelConfig(backend="hf", arch=str(save_tiny_siglip(root / "siglip"))),
        "composed": tiny_config(save_tiny_bert(root / "bert")),
    }


# ---------------------------------------------------------------------------------------------------------------
# Two-process runs and tiny training runs


def spawn_and_wait(worker: Callable[..., None], args: tuple, nprocs: int, timeout_s: int) -> None:
    """torch.multiprocessing.spawn `worker(rank, *args)` on `nprocs` processes and wait for all of them; a hung
    collective fails the test after `timeout_s` seconds (its processes are killed) instead of hanging the suite."""
    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    try:
        for _ in range(timeout_s):
            if context.join(timeout=1):
                return
        pytest.fail(f"the {nprocs}-process run did not finish in {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def spawn_ranks(worker: Callable[..., None], tmp: Path, world: int, timeout_s: int = 120) -> list[dict]:
    """Spawn `worker(rank, init_file, out_dir)` on `world` processes (rendezvous file and outputs in `tmp`) and load
    what each rank saved as `rank{rank}.pt`."""
    spawn_and_wait(worker, (str(tmp / "rendezvous"), str(tmp)), world, timeout_s=timeout_s)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(world)]


def gloo_group(rank: int, world: int, init_file: str) -> None:
    """Join a gloo process group through a rendezvous file (no port to pick), one thread per process."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def tiny_run(shapes: Path, out: Path, name: str = "run", **sections: dict) -> dict:
    """A seeded run of the tiny ViT on the shapes set (one epoch of 16-image batches), `sections` merged over it."""
    from cliptune.config import merge

    cfg = {
        "name": name,
        "model": {"arch": "cliptune-tiny-vit"},
        "data": {"train": {"path": str(shapes / "train.csv")}},
        "train": {"epochs": 1, "batch_size": 16},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "runtime": {"output_dir": str(out), "progress": False, "seed": 0},
    }
    return merge(cfg, sections)


def run_config(shapes: Path, out: Path, arch: str = "cliptune-tiny-vit", epochs: int = 3, **extra) -> dict:
    """`tiny_run` of `arch` for `epochs` epochs, evaluated on the shapes val set; `extra` sets keys as
    `section__key=value` (replacing that key's value)."""
    cfg = tiny_run(
        shapes,
        out,
        model={"arch": arch},
        eval={"retrieval": [{"name": "val", "path": str(shapes / "val.csv")}]},
        train={"epochs": epochs},
        optim={"warmup_steps": 3},
    )
    for key, value in extra.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return cfg


def write_yaml(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m cliptune.cli ARGS` in a subprocess; with `check`, it must succeed."""
    proc = subprocess.run([sys.executable, "-m", "cliptune.cli", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def shape_labels(shapes: Path, name: str) -> Path:
    """The shapes set's training images as a `path<TAB>shape` list (a labelled set), written to `shapes / name`."""
    from cliptune.data.synthetic import SHAPES

    lines = []
    for row in csv.DictReader((shapes / "train.csv").open()):
        caption = json.loads(row["caption"])[0]
        lines.append(f"{row['image']}\t{next(s for s in SHAPES if s in caption)}\n")
    path = shapes / name
    path.write_text("".join(lines))
    return path
