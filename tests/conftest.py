"""Shared fixtures: no test reaches the network, and the generated image-caption set."""

from pathlib import Path

import pytest
import torch

from cliptune.config import ModelConfig
from cliptune.data.synthetic import make_shapes
from cliptune.utils.memory import keep_freed_memory
from tests.helpers import every_backend, save_tiny_bert


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine, threads waiting on each other cost far more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def heap_memory():
    """As in the CLI: large tensors reuse freed heap memory instead of page-faulting in fresh mappings."""
    keep_freed_memory()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def offline_hub(monkeypatch):
    """Make Hugging Face hub calls fail at once, as they do on a machine with no hub access (no retry waits)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """The coloured-shapes set: images/, train.csv, val.csv."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, n_train=96, n_val=32, image_size=32)
    return root


@pytest.fixture(scope="session")
def backends(tmp_path_factory) -> dict[str, ModelConfig]:
    """name -> ModelConfig of a tiny random model, one per backend: strategies must work on each."""
    return every_backend(tmp_path_factory.mktemp("backends"))
