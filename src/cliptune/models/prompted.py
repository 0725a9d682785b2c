"""Prompt tuning (ITRA / CoOp style): n learnable vectors in the text tower's input, on any backend.

`add_prompts(model, n)` wraps a built model. Its text path embeds the caption tokens with the base's own token
embedding, inserts the n prompt vectors right after the start token, adds the positional embeddings *after* that
(so the prompts sit at positions 1..n), runs the base's text transformer, and pools where the base pools, shifted
by n: a tower that pools at the end-of-text token pools at that token's new index (EOT + n). ITRA pools at the
unshifted index, i.e. at the caption's last word; this module does not.

Captions are tokenised to `context_length - n` tokens, so the sequence with the prompts inserted has exactly the
tower's length; a caption too long for that is truncated by the base's tokenizer, which keeps its end token.

Per backend (the `TEXT_PATHS` table below is the one place that knows the towers):

- openclip: open_clip's CLIP keeps its text tower flat on the model (token_embedding, positional_embedding,
  transformer with the causal `attn_mask`, ln_final, text_projection); CustomTextCLIP keeps the same pieces on
  `model.text` (TextTransformer: EVA, MobileCLIP, ...). Both are run piece by piece here. Pool types 'argmax' and
  'eos' pool at the shifted EOT (found on the caption tokens, then + n), 'first' at the start token, 'last' at the
  last position. Towers with an appended CLS embedding (CoCa), a padding mask, an HF text encoder or tokenizer
  are refused with a ModelError.
- hf CLIP: pools the first EOS (as `HFClipModel.eos_positions`) + n. transformers' text model only accepts
  `input_ids`, so its embeddings / encoder / final norm are run here with an explicit additive causal mask. No
  padding mask is needed: attention is causal, so no state up to a caption's EOS sees the padding after it.
- hf SigLIP: its tokenizer has no start token, so the prompts go first (positions 0..n-1). SigLIP pools the last
  position with no attention mask (as the base does), which stays the last position after the insertion.
- composed: an HF encoder (BERT-like) run with `inputs_embeds`; the attention mask `tokens != pad` is extended with
  n ones for the prompts. Mean pooling INCLUDES the prompt positions: they are non-padding input like every other
  token the sentence encoder averages (the prompts then shape the embedding directly, not only through attention).
  CLS pooling stays at position 0 (the start token); for a tokenizer without a start token, the prompts go first
  and CLS pooling takes the caption's first token, at position n.

Everything else (images, temperature, transforms, towers) delegates to the base; the prompt belongs to the text
tower. The spec nests the base's spec, so `save_model` / `load_model` round-trip any wrapped backend.

Wrap a bare backend model: a wrapper whose text path is not in `TEXT_PATHS` (heads, another PromptedModel) is
refused, so projection heads go on top of a PromptedModel, not under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.config import ModelConfig
from cliptune.models.base import ClipModel, Tower, tracing
from cliptune.models.errors import ModelError

INIT_STD = 0.02  # prompt vectors start as N(0, 0.02^2), as in ITRA / CoOp


def _insert(embeds: torch.Tensor, prompt: torch.Tensor, at: int) -> torch.Tensor:
    """[B, S, D] token embeddings -> [B, S + n, D] with the n prompt vectors at positions at..at+n-1."""
    prompts = prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
    return torch.cat([embeds[:, :at], prompts, embeds[:, at:]], dim=1)


def _shift(index: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """Where a caption position lands once n prompts are inserted at `at`: positions from `at` on move by n."""
    return index + n * (index >= at).long()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device)


def _start_offset(tokenizer: Any) -> int:
    """1 where a Hugging Face tokenizer starts every text with a start token (BOS / CLS), else 0."""
    ids = tokenizer("a")["input_ids"]
    starts = {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}
    return 1 if ids and ids[0] in starts else 0


def _hf_tokenize(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
    # Fixed length, as the backends do; truncation keeps the special tokens, so the end token survives.
    if not texts:
        return torch.empty((0, length), dtype=torch.long)
    out = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out["input_ids"].long()


class TextPath:
    """One backend's text tower with prompts: built once per model from the base (checks and static settings
    only); every call resolves the modules from `base` again, so later module swaps (LoRA) are seen."""

    width: int  # token-embedding width = prompt vector width
    length: int  # the tower's sequence length L (prompts included)
    at: int  # where the prompts go: 1 after a start token, 0 without one

    def tokenize(self, base: Any, texts: list[str], length: int) -> torch.Tensor:
        raise NotImplementedError

    def features(
        self, base: Any, tokens: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unnormalised text embeddings of `tokens` with `prompt` inserted; `mask`: the padding mask of towers
        that read one (composed), when it is given rather than derived from the ids."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# open_clip


def _openclip_tower(base: Any) -> nn.Module:
    # CustomTextCLIP holds a text module; CLIP holds the same pieces flat on the model.
    return base.model.text if hasattr(base.model, "text") else base.model


class OpenClipText(TextPath):
    def __init__(self, base: Any) -> None:
        model, tower = base.model, _openclip_tower(base)
        pieces = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(tower, p) for p in pieces):
            raise ModelError(
                f"prompt tuning: the text tower of open_clip model {base.arch!r} ({type(tower).__name__}) is not a "
                "built-in text transformer (an HF text encoder?); prompt tuning supports open_clip's TextTransformer"
            )
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise ModelError(f"prompt tuning: {base.arch!r} appends a CLS embedding or masks padding; not supported")
        if not hasattr(base._tokenizer, "sot_token_id"):
            raise ModelError(f"prompt tuning: {base.arch!r} uses an HF tokenizer; only open_clip's own is supported")
        flat = tower is model
        self.pool = model.text_pool_type if flat else tower.pool_type
        self.eos_id = model.text_eos_id if flat else tower.eos_id
        if self.pool not in ("argmax", "eos", "first", "last"):
            raise ModelError(f"prompt tuning: {base.arch!r} pools its text tower with {self.pool!r}; not supported")
        self.width = int(tower.token_embedding.embedding_dim)
        self.length = int(tower.positional_embedding.shape[0])
        self.at = 1  # open_clip's tokenizer starts every caption with <start_of_text>

    def tokenize(self, base: Any, texts: list[str], length: int) -> torch.Tensor:
        # open_clip truncates to `length` and writes <end_of_text> into the last slot.
        return base._tokenizer(list(texts), context_length=length)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where the base pools, in caption coordinates (before the prompts)."""
        if self.pool == "argmax":  # <end_of_text> has the highest id
            return tokens.argmax(dim=-1)
        if self.pool == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def features(
        self, base: Any, tokens: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        tower = _openclip_tower(base)
        cast = tower.transformer.get_cast_dtype()
        x = _insert(tower.token_embedding(tokens).to(cast), prompt.to(cast), self.at)
        length = x.shape[1]
        x = x + tower.positional_embedding[:length].to(cast)  # after the insertion: prompts get positions 1..n
        mask = getattr(tower, "attn_mask", None)
        x = tower.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
        x = tower.ln_final(x)
        pooled = x[_rows(x), _shift(self.pool_index(tokens), self.at, prompt.shape[0])]
        projection = tower.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face CLIP / SigLIP


class HFText(TextPath):
    def __init__(self, base: Any) -> None:
        if base.model_type not in ("clip", "siglip"):
            raise ModelError(f"prompt tuning: hf model type {base.model_type!r} is not supported (clip, siglip)")
        self.causal = base.model_type == "clip"  # CLIP: causal, pools the first EOS; SigLIP: no mask, pools last
        self.width = int(base.model.text_model.embeddings.token_embedding.embedding_dim)
        self.length = int(base.context_length)
        self.at = _start_offset(base.tokenizer)  # CLIP: after <|startoftext|>; SigLIP: no start token, so 0

    def tokenize(self, base: Any, texts: list[str], length: int) -> torch.Tensor:
        return _hf_tokenize(base.tokenizer, texts, length)

    def features(
        self, base: Any, tokens: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        text = base.model.text_model
        x = _insert(text.embeddings.token_embedding(tokens), prompt, self.at)
        n = prompt.shape[0]
        if self.causal:
            index = _shift(base.eos_positions(tokens), self.at, n)
            # Causal attention: positions after every row's EOS change no pooled state, so they are dropped.
            if not tracing():  # a traced graph keeps the input's length
                x = x[:, : int(index.max()) + 1]
            length = x.shape[1]
            blocked = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            mask = torch.zeros(length, length, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(blocked, torch.finfo(x.dtype).min)[None, None]
        else:
            index = torch.full((x.shape[0],), x.shape[1] - 1, dtype=torch.long, device=x.device)
            mask = None
        hidden = text.embeddings(inputs_embeds=x)  # adds the position embeddings 0..S-1
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        pooled = text.final_layer_norm(hidden)[_rows(hidden), index]
        return base.model.text_projection(pooled) if self.causal else text.head(pooled)


# ---------------------------------------------------------------------------------------------------------------
# composed (BERT-like text towers)


class ComposedText(TextPath):
    def __init__(self, base: Any) -> None:
        import inspect

        tower = base.text_tower
        if "inputs_embeds" not in inspect.signature(tower.model.forward).parameters:
            raise ModelError(f"prompt tuning: text tower {type(tower.model).__name__} takes no inputs_embeds")
        self.width = int(tower.model.get_input_embeddings().embedding_dim)
        self.length = int(tower.length)
        self.at = _start_offset(tower.tokenizer)  # BERT: after [CLS]

    def tokenize(self, base: Any, texts: list[str], length: int) -> torch.Tensor:
        return _hf_tokenize(base.text_tower.tokenizer, texts, length)

    def features(
        self, base: Any, tokens: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        from cliptune.models.towers import POOLING

        tower = base.text_tower
        n = prompt.shape[0]
        x = _insert(tower.model.get_input_embeddings()(tokens), prompt, self.at)
        caption = tokens != tower.pad_id if mask is None else mask.bool()
        ones = torch.ones(tokens.shape[0], n, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([caption[:, : self.at], ones, caption[:, self.at :]], dim=1)  # the prompts are attended
        hidden = tower.model(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state
        if tower.pooling == "cls":  # the start token's state; with no start token, the caption's first token
            first = _shift(torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device), self.at, n)
            pooled = hidden[_rows(hidden), first]
        else:  # mean: over every attended position, the prompts included
            pooled = POOLING[tower.pooling](hidden, mask)
        return base.text_head(pooled)


# backend name -> its text path with prompts. A new backend adds one line here.
TEXT_PATHS: dict[str, type[TextPath]] = {"openclip": OpenClipText, "hf": HFText, "composed": ComposedText}


class PromptedModel(ClipModel):
    """A model whose text tower reads n learnable prompt vectors after the start token (see the module doc)."""

    backend = "prompted"

    def __init__(self, base: ClipModel, n: int) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ModelError(
                f"finetune.prompt_tokens: {n!r} prompt vectors; prompt tuning needs n >= 1 (0 turns it off: "
                "do not wrap the model then)"
            )
        if base.backend not in TEXT_PATHS:
            raise ModelError(
                f"prompt tuning wraps a bare {', '.join(TEXT_PATHS)} model, not a {base.backend!r} one: add the "
                "prompts first and other wrappers (projection heads) on top"
            )
        path = TEXT_PATHS[base.backend](base)
        if n > path.length - 2:
            raise ModelError(
                f"finetune.prompt_tokens: {n} prompt vectors leave no room for a caption in the text tower's "
                f"{path.length} positions (at most {path.length - 2})"
            )
        self.base = base
        self.n = n
        self.path = path
        self.context_length = path.length
        self.prompt = nn.Parameter(torch.randn(n, path.width) * INIT_STD)
        self.train_transform = base.train_transform
        self.eval_transform = base.eval_transform
        self.training = base.training  # the base's mode (a wrapper on top copies it); its sub-modules keep theirs
        # A base that splits its image tower from its head (composed) lets a locked image tower be cached.
        for name in ("image_trunk", "image_head"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.base.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if tokens.shape[-1] + self.n > self.context_length:
            raise ModelError(
                f"tokens of length {tokens.shape[-1]} plus {self.n} prompts exceed the text tower's "
                f"{self.context_length} positions: tokenise with this model's tokenize() (length "
                f"{self.context_length - self.n}), not the base model's"
            )
        features = self.path.features(self.base, tokens, self.prompt)
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.path.tokenize(self.base, list(texts), self.context_length - self.n)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.base.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return getattr(self.base, "logit_bias", None)

    def tower_of(self, param_name: str) -> Tower:
        if param_name == "prompt":
            return "text"
        return self.base.tower_of(param_name.removeprefix("base."))

    def tower_modules(self, tower: Tower) -> list[nn.Module]:
        return self.base.tower_modules(tower)

    def spec(self) -> dict[str, Any]:
        return {"backend": self.backend, "n": self.n, "base": self.base.spec()}

    # --- export: the prompt vectors are input embeddings, which only traced graphs (ONNX) can hold

    def _prompt_refusal(self, fmt: str) -> Exception:
        why = (
            f"prompt tuning inserts {self.n} learned vectors into the text tower's input embeddings, and a {fmt} "
            "model reads token ids only"
        )
        return self.cannot_export(fmt, why)

    def to_open_clip(self) -> Any:
        raise self._prompt_refusal("open_clip")

    def to_hf(self) -> Any:
        raise self._prompt_refusal("hf")

    def hf_tokenizer(self) -> Any:
        tokenizer = self.base.hf_tokenizer()
        tokenizer.model_max_length = self.context_length - self.n  # room for the prompts
        return tokenizer

    @property
    def text_attention_mask(self) -> bool:  # type: ignore[override]
        return self.base.text_attention_mask

    def encode_text_with_mask(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        features = self.path.features(self.base, tokens, self.prompt, attention_mask)
        return F.normalize(features, dim=-1) if normalize else features

    def text_length_free(self) -> bool:
        return self.base.text_length_free()

    def save_assets(self, folder: Path) -> None:
        self.base.save_assets(folder)


def add_prompts(model: ClipModel, n: int) -> PromptedModel:
    """`model` with n learnable prompt vectors (N(0, 0.02)) after its text start token."""
    return PromptedModel(model, n)


def build(cfg: ModelConfig) -> PromptedModel:
    raise ModelError(
        "model.backend: 'prompted' is not a backend to build from: choose the base model's backend and set "
        "finetune.prompt_tokens to the number of learnable prompt vectors"
    )


def rebuild(spec: dict[str, Any], folder: Path | None = None) -> PromptedModel:
    """The saved base architecture, wrapped with `spec['n']` prompts (the saved weights are loaded after)."""
    from cliptune import models

    return PromptedModel(models.rebuild(spec["base"], folder), int(spec["n"]))
