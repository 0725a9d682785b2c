"""Tiny models and data shared by several test modules (fixtures live in conftest.py)."""

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer

from cliptune.config import ModelConfig, TowerConfig

WORDS = ["a", "the", "red", "green", "blue", "big", "small", "square", "circle", "triangle"]
WORDS += ["dog", "puppy", "cat", "on", "in", "of", "with", "and", "photo"]
CAPTIONS = ["a red square", "a big blue circle on the green triangle", "a dog", "a small cat in a photo"]
EMBED = 16


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
