"""An OpenCLIP ViT with the CLIP text transformer as a transformers `CLIPModel`, tokenizer and image processor.

transformers ships `convert_clip_original_pytorch_to_hf.py`, but it converts OpenAI's `clip` package checkpoints
(it imports `clip`, hard-codes OpenAI's sizes and fails on open_clip checkpoints: transformers #28072), and
open_clip has no converter at all (open_clip #766, #591), so the mapping is written here. Per layer:

- open_clip fuses q, k, v into `attn.in_proj_weight` [3W, W]; CLIP has `q_proj` / `k_proj` / `v_proj`, in that order.
- open_clip projects with `x @ proj` ([W, D] matrices); CLIP with `nn.Linear` ([D, W] weights): transposed.
- `ln_1` / `ln_2` / `c_fc` / `c_proj` / `ln_pre` / `ln_post` / `ln_final` are CLIP's `layer_norm1` / `layer_norm2` /
  `fc1` / `fc2` / `pre_layrnorm` / `post_layernorm` / `final_layer_norm`.
- the activation: open_clip's default `nn.GELU` is CLIP's "gelu"; `-quickgelu` models are "quick_gelu".
- pooling: open_clip pools text at the highest token id (argmax: `<end_of_text>`, 49407); CLIP pools the first
  `eos_token_id`, set to that id. Padding never matters: attention is causal and pooling happens at the EOS.

The tokenizer is OpenAI's BPE built from the vocabulary open_clip ships, with normalisation rules added for the
text cleaning open_clip applies before BPE (ftfy, HTML unescaping) that CLIP's tokenizer lacks; see
`clip_tokenizer`.
"""

from __future__ import annotations

import gzip
import html
from typing import Any

import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from open_clip.transformer import QuickGELU, VisionTransformer
from tokenizers import Regex, normalizers
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, PreTrainedTokenizerFast

# PIL resampling codes, as preprocessor_config.json stores interpolation.
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# ftfy's fixes (open_clip runs ftfy.fix_text on every caption) that change what common captions tokenise to:
# curly quotes, Latin ligatures; full-width ASCII forms are added in `_ftfy_rules`.
_UNCURL = {"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "‟": '"'}
_LIGATURES = {"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
# open_clip unescapes HTML twice; the entities captions scraped from the web carry.
_ENTITIES = ("&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&apos;", "&nbsp;")


def refusal(model: nn.Module) -> str | None:
    """Why this open_clip model has no exact `CLIPModel` equivalent, or None when it has one."""
    visual = model.visual
    if hasattr(model, "text"):
        return "its text tower is not open_clip's built-in CLIP text transformer (CustomTextCLIP)"
    if not isinstance(visual, VisionTransformer):
        return f"its image tower is a {type(visual).__name__}, not a ViT (CLIPModel's vision tower is a ViT)"
    checks = {
        "it pools the image with an attention pooler": visual.attn_pool is not None,
        "it pools the image tokens by averaging, not at the class token": visual.pool_type != "tok",
        "it has no pre-transformer LayerNorm (ln_pre)": isinstance(visual.ln_pre, nn.Identity),
        "it has no image projection": visual.proj is None,
        "it pools text at something other than the end token": model.text_pool_type != "argmax",
        "its text tower is not causal": getattr(model, "attn_mask", None) is None,
        "its text projection is not a plain matrix": not isinstance(model.text_projection, nn.Parameter),
        "it has layer scale, QK-norm or scaled-cosine attention": _has_extras(model),
    }
    return next((why for why, failed in checks.items() if failed), None)


def _has_extras(model: nn.Module) -> bool:
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    scales = (getattr(block, name, nn.Identity()) for block in blocks for name in ("ls_1", "ls_2"))
    return any(not isinstance(scale, nn.Identity) for scale in scales)


def clip_config(model: nn.Module, model_cfg: dict[str, Any]) -> CLIPConfig:
    """The CLIPConfig of the same sizes; activation from the model's own modules (a tag may force QuickGELU)."""
    visual = model.visual
    vision_width = visual.conv1.out_channels
    text_width = model.token_embedding.embedding_dim
    act = "quick_gelu" if any(isinstance(m, QuickGELU) for m in model.modules()) else "gelu"
    text = dict(
        vocab_size=model.token_embedding.num_embeddings,
        hidden_size=text_width,
        intermediate_size=model.transformer.resblocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(model.transformer.resblocks),
        num_attention_heads=model.transformer.resblocks[0].attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act=act,
        layer_norm_eps=model.ln_final.eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,  # the tokenizer pads with <|endoftext|>, as OpenAI's hub tokenizers do
    )
    vision = dict(
        hidden_size=vision_width,
        intermediate_size=visual.transformer.resblocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=visual.transformer.resblocks[0].attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=act,
        layer_norm_eps=visual.ln_post.eps,
    )
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=int(model_cfg["embed_dim"]),
        logit_scale_init_value=float(model.logit_scale.detach()),
    )


def _block(prefix: str, state: dict[str, torch.Tensor], out: str) -> dict[str, torch.Tensor]:
    q, k, v = state[f"{prefix}.attn.in_proj_weight"].chunk(3)
    qb, kb, vb = state[f"{prefix}.attn.in_proj_bias"].chunk(3)
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    mapped = {f"{out}.self_attn.{n}_proj.weight": w for n, w in zip("qkv", (q, k, v))}
    mapped |= {f"{out}.self_attn.{n}_proj.bias": b for n, b in zip("qkv", (qb, kb, vb))}
    for ours, theirs in names.items():
        for kind in ("weight", "bias"):
            mapped[f"{out}.{theirs}.{kind}"] = state[f"{prefix}.{ours}.{kind}"]
    return mapped


def clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's weights under CLIPModel's names (q/k/v split, projections transposed)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        "logit_scale": state["logit_scale"],
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
    }
    for i in range(len(model.transformer.resblocks)):
        out |= _block(f"transformer.resblocks.{i}", state, f"text_model.encoder.layers.{i}")
    for i in range(len(model.visual.transformer.resblocks)):
        out |= _block(f"visual.transformer.resblocks.{i}", state, f"vision_model.encoder.layers.{i}")
    return {k: v.contiguous().clone() for k, v in out.items()}


def clip_model(model: nn.Module, model_cfg: dict[str, Any]) -> CLIPModel:
    """The converted CLIPModel; loading is strict, so a weight left behind fails here instead of staying random."""
    hf = CLIPModel(clip_config(model, model_cfg))
    missing, unexpected = hf.load_state_dict(clip_state_dict(model), strict=False)
    # position_ids is a non-persistent buffer in recent transformers, a persistent one in older versions
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"open_clip -> CLIPModel mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def _ftfy_rules() -> list[normalizers.Normalizer]:
    """Replacements for what open_clip's cleaning (ftfy.fix_text, html.unescape twice) changes in captions."""
    rules = {**_UNCURL, **_LIGATURES}
    rules |= {chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}  # full-width ASCII -> ASCII (ftfy)
    rules["\u3000"] = " "  # the full-width space
    for entity in _ENTITIES:
        rules[f"&amp;{entity[1:]}"] = html.unescape(entity)  # unescaped twice: "&amp;amp;" is "&"
    rules |= {entity: html.unescape(entity) for entity in _ENTITIES}
    # Longest first, so "&amp;amp;" is replaced before "&amp;".
    return [normalizers.Replace(k, v) for k, v in sorted(rules.items(), key=lambda kv: -len(kv[0]))]


def clip_tokenizer(context_length: int) -> PreTrainedTokenizerFast:
    """OpenAI's BPE tokenizer from open_clip's own vocabulary file (no download), normalising like open_clip.

    open_clip cleans a caption with ftfy and `html.unescape` before lower-casing and collapsing whitespace; CLIP's
    tokenizer only does NFC, whitespace and lower case. The rules added before those cover the fixes that occur in
    ordinary captions (curly quotes, ligatures, full-width forms, common HTML entities); rarer ftfy repairs
    (mojibake, other entities) are not reproduced.
    """
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]  # the merges open_clip's SimpleTokenizer reads
    merges = [tuple(line.split()) for line in lines]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    clip = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, pad_token=EOT)
    backend = clip.backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), *_ftfy_rules(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # Saved as a generic fast tokenizer: CLIPTokenizer rebuilds its own normaliser on loading, dropping the rules.
    specials = {"bos_token": SOT, "eos_token": EOT, "pad_token": EOT, "unk_token": EOT}
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=context_length, **specials)


def clip_image_processor(preprocess: dict[str, Any]) -> CLIPImageProcessor:
    """CLIP's image processor with open_clip's eval preprocessing: shortest-edge resize, centre crop, mean, std."""
    size = preprocess["size"]
    side = int(size[0] if isinstance(size, (list, tuple)) else size)
    if preprocess.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"resize_mode {preprocess['resize_mode']!r}: CLIPImageProcessor resizes the shortest edge")
    return CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(preprocess["mean"]),
        image_std=list(preprocess["std"]),
        resample=PIL_RESAMPLE[preprocess.get("interpolation", "bicubic")],
        do_convert_rgb=True,
    )
