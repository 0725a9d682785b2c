"""The command line: listing commands, and bad input answered with a message and exit code 2, not a traceback."""

import numpy as np

from cliptune.cli import main


def test_models_lists_presets_tiny_archs_and_openclip_names(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lite0-minilm" in out and "cliptune-tiny-vit" in out and "cliptune-tiny-rn" in out
    assert "RN50" in out and "openai" in out


def test_config_prints_every_key(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "`optim.layer_decay_image`" in out and "`finetune.lora.rank`" in out and "`train.chunk_size`" in out


def test_bad_input_is_a_message_and_exit_code_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: lite0-minlm}\n")
    assert main(["train", str(config)]) == 2
    assert "did you mean lite0-minilm" in capsys.readouterr().err
    assert main(["eval", "--model", "ViT-B-23", "--data", str(tmp_path / "x.csv")]) == 2
    assert "Close matches" in capsys.readouterr().err


def test_encode_a_plain_list_of_image_paths(shapes, tmp_path, capsys):
    paths = sorted((shapes / "images").glob("val_*.png"))[:3]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    out = tmp_path / "emb.npy"
    assert main(["encode", "--model", "cliptune-tiny-vit", "--images", str(listing), "--out", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (3, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_eval_of_a_label_list_without_templates(shapes, tmp_path, capsys):
    """A `path label` list needs no other option: the default template applies (a .txt is never a caption table)."""
    paths = sorted((shapes / "images").glob("val_*.png"))[:6]
    listing = tmp_path / "labels.txt"
    listing.write_text("".join(f"{p}\t{'red' if i % 2 else 'blue'} shape\n" for i, p in enumerate(paths)))
    assert main(["eval", "--model", "cliptune-tiny-vit", "--data", str(listing)]) == 0
    assert '"acc1"' in capsys.readouterr().out
