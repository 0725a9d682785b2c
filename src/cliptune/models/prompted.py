"""Prompt tuning (ITRA / CoOp style): n learnable vectors in the text tower's input, on any backend.

`add_prompts(model, n)` wraps a built model. Its text path embeds the caption tokens with the base's own token
embedding, inserts the n prompt vectors right after the start token, adds the positional embeddings *after* that
(so the prompts sit at positions 1..n), runs the base's text transformer, and pools where the base pools, shifted
by n: a tower that pools at the end-of-text token pools at that token's new index (EOT + n). ITRA pools at the
unshifted index, i.e. at the caption's last word; this module does not.

Captions are tokenised to `context_length - n` tokens, so the sequence with the prompts inserted has exactly the
tower's length; a caption too long for that is truncated by the base's tokenizer, which keeps its end token.

Per backend (each backend module answers `ClipModel.text_path()` with its `TextPath`; the helpers below are
what they share):

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

Wrap a bare backend model: a wrapper has no text path of its own (heads, another PromptedModel), so it is
refused, and projection heads go on top of a PromptedModel, not under it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.models.base import ClipModel, Tower
from cliptune.models.errors import ModelError
from cliptune.models.wrapper import WrappedModel

INIT_STD = 0.02  # prompt vectors start as N(0, 0.02^2), as in ITRA / CoOp


def insert_prompts(embeds: torch.Tensor, prompt: torch.Tensor, at: int) -> torch.Tensor:
    """[B, S, D] token embeddings -> [B, S + n, D] with the n prompt vectors at positions at..at+n-1."""
    prompts = prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
    return torch.cat([embeds[:, :at], prompts, embeds[:, at:]], dim=1)


def shift_index(index: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """Where a caption position lands once n prompts are inserted at `at`: positions from `at` on move by n."""
    return index + n * (index >= at).long()


def rows(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device)


def start_offset(tokenizer: Any) -> int:
    """1 where a Hugging Face tokenizer starts every text with a start token (BOS / CLS), else 0."""
    ids = tokenizer("a")["input_ids"]
    starts = {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}
    return 1 if ids and ids[0] in starts else 0


def hf_tokenize(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
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


class PromptedModel(WrappedModel):
    """A model whose text tower reads n learnable prompt vectors after the start token (see the module doc)."""

    backend = "prompted"

    def __init__(self, base: ClipModel, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ModelError(
                f"finetune.prompt_tokens: {n!r} prompt vectors; prompt tuning needs n >= 1 (0 turns it off: "
                "do not wrap the model then)"
            )
        path = base.text_path()
        if n > path.length - 2:
            raise ModelError(
                f"finetune.prompt_tokens: {n} prompt vectors leave no room for a caption in the text tower's "
                f"{path.length} positions (at most {path.length - 2})"
            )
        super().__init__(base)
        self.n = n
        self.path = path
        self.context_length = path.length
        self.prompt = nn.Parameter(torch.randn(n, path.width) * INIT_STD)
        self.training = base.training  # the base's mode (a wrapper on top copies it); its sub-modules keep theirs

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

    def own_tower(self, param_name: str) -> Tower | None:
        return "text" if param_name == "prompt" else None

    def wrapper_spec(self) -> dict[str, Any]:
        return {"n": self.n}

    def has_trunk(self, tower: Tower) -> bool:
        # The prompts change the text tower; a base that splits its image tower (composed) keeps that split.
        return tower == "image" and self.base.has_trunk("image")

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

    def encode_text_with_mask(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        features = self.path.features(self.base, tokens, self.prompt, attention_mask)
        return F.normalize(features, dim=-1) if normalize else features


def add_prompts(model: ClipModel, n: int) -> PromptedModel:
    """`model` with n learnable prompt vectors (N(0, 0.02)) after its text start token."""
    return PromptedModel(model, n)


def rebuild(spec: dict[str, Any], base: ClipModel) -> PromptedModel:
    """The saved base architecture, wrapped with `spec['n']` prompts (the saved weights are loaded after)."""
    return PromptedModel(base, int(spec["n"]))
