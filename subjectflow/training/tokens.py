"""What token-based methods share (METHODS.md sections 4 and 5: DETEX, concept tokens):
new text tokens whose embedding rows alone train, K/V-only cross-attention LoRA, a masked
denoising loss, and a cross-attention processor that keeps the start-of-text token's keys
and values out of training and can record per-token attention maps.

The conventions are diffusers' own: new rows restored every step as in
`textual_inversion.py`, embeddings saved in the format `pipe.load_textual_inversion` reads,
the start-of-text K/V detached as in `train_custom_diffusion.py`, and maps averaged over
heads and the 16x16 cross-attention layers as Break-A-Scene does.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save

from ..models.families import Family, Prompt

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from ..models.loading import ModelParts

# Cross-attention projections only, the layers Custom Diffusion trains (as a peft regex).
KV_TARGETS = r".*attn2\.(to_k|to_v)"
CROSS_ATTENTION_SUFFIX = "attn2.processor"
# SD's 16x16 level is the 64x64 latent downscaled 4 times; other UNets use their nearest level.
MAP_DOWNSCALE = 4
MaskNorm = Literal["area", "image"]


# -- new tokens -----------------------------------------------------------------------------


def token_for(name: str) -> str:
    """A new token named after `name` ("Red mug" -> "<red_mug>"): the angle brackets keep it
    off every word of CLIP's vocabulary."""
    return f"<{re.sub(r'[^0-9A-Za-z]+', '_', name).strip('_').lower()}>"


@dataclass
class ConceptTokens:
    """New tokens on a private copy of the tokenizer, their rows in the text encoder's
    (enlarged) embedding matrix; `restore_frozen_rows()` after every optimiser step keeps
    all other rows exactly as loaded, whatever the optimiser's weight decay did."""

    tokens: tuple[str, ...]  # the learned ones first, then placeholders (rows replaced at use, never trained)
    ids: tuple[int, ...]
    tokenizer: Any  # a copy: the model's own tokenizer is resident across tasks and stays as it was
    embedding: torch.nn.Embedding
    frozen: torch.Tensor  # [V, D] the rows as loaded, new rows at their initial values
    learned: int  # how many of `tokens` train

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.embedding.weight]

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        keep = torch.ones(self.frozen.shape[0], dtype=torch.bool, device=self.frozen.device)
        keep[list(self.ids[:self.learned])] = False
        self.embedding.weight[keep] = self.frozen[keep]

    def vectors(self) -> dict[str, torch.Tensor]:
        """Each learned token's [D] embedding (fp32, on the CPU)."""
        weight = self.embedding.weight.detach()  # index first: SD's full matrix is 150 MB per copy
        return {token: weight[i].float().cpu().clone() for token, i in self._learned()}

    def load_vectors(self, vectors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for token, i in self._learned():
                self.embedding.weight[i] = vectors[token].to(self.embedding.weight)

    def _learned(self) -> list[tuple[str, int]]:
        return list(zip(self.tokens, self.ids))[:self.learned]


@contextlib.contextmanager
def added_tokens(tokenizer, text_encoder, tokens: dict[str, str],
                 placeholders: dict[str, str] | None = None) -> Iterator[ConceptTokens]:
    """Add `tokens` (new token -> initialiser words) and `placeholders` (the same, but their
    rows never train: `embed_prompts` injects their vectors) for the block; each new row
    starts at the mean embedding of its initialiser's tokens, as textual inversion's
    class-word init. The text encoder gets its own embedding module back on exit."""
    learned = len(tokens)
    tokens = {**tokens, **(placeholders or {})}
    private = copy.deepcopy(tokenizer)
    vocab = private.get_vocab()
    # CLIP's BPE keeps a whole word as "word</w>": "mug" would silently replace the word mug
    clashes = [t for t in tokens if t in vocab or f"{t}</w>" in vocab]
    if clashes:
        raise ValueError(f"tokens {clashes} are already words of the tokenizer; pick new names such as '<{clashes[0]}>'")
    private.add_tokens(list(tokens))
    ids = tuple(private.convert_tokens_to_ids(list(tokens)))
    old = text_encoder.get_input_embeddings()
    # fp32 master rows whatever the encoder's dtype (a bf16 row cannot take a 5e-4 step),
    # handed to the encoder in its own dtype; the cast passes gradients through
    new = torch.nn.Embedding(len(private), old.embedding_dim, device=old.weight.device, dtype=torch.float32)
    new.register_forward_hook(lambda module, inputs, rows: rows.to(old.weight.dtype))
    with torch.no_grad():
        new.weight[:old.num_embeddings] = old.weight
        for (token, words), i in zip(tokens.items(), ids):
            word_ids = tokenizer(words, add_special_tokens=False).input_ids
            if not word_ids:
                raise ValueError(f"token {token!r}: initialiser {words!r} has no tokens; give a class word")
            new.weight[i] = old.weight[word_ids].mean(dim=0)
    new.weight.requires_grad_(True)
    text_encoder.set_input_embeddings(new)
    try:
        yield ConceptTokens(tuple(tokens), ids, private, new, new.weight.detach().clone(), learned)
    finally:
        text_encoder.set_input_embeddings(old)


def embed_prompts(concepts: ConceptTokens, text_encoder, prompts: list[str],
                  injected: dict[str, torch.Tensor] | None = None, full: bool = False) -> Any:
    """[B, L, D] text embeddings of `prompts`, with gradients to the new rows (`full`: the
    encoder's whole output, every hidden state). `injected` maps a new token to [B, D]
    input vectors that replace its row wherever it occurs in prompt b (DETEX's per-photo
    pose and background, made by its mappers)."""
    ids = concepts.tokenizer(prompts, padding="max_length", max_length=concepts.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)

    def inject(module: torch.nn.Module, inputs: tuple, rows: torch.Tensor) -> torch.Tensor:  # rows [B, L, D]
        for token, vectors in injected.items():
            where = (ids == concepts.tokenizer.convert_tokens_to_ids(token))[..., None]  # [B, L, 1]
            rows = torch.where(where, vectors[:, None, :].to(rows), rows)
        return rows

    hook = concepts.embedding.register_forward_hook(inject) if injected else None
    try:
        return text_encoder(ids, output_hidden_states=True) if full else text_encoder(ids)[0].float()
    finally:
        if hook:
            hook.remove()


@dataclass
class PromptTokens:
    """The same new tokens in each of the base model's CLIP text encoders (SD: one; SDXL:
    both, as diffusers' textual_inversion_sdxl.py trains them), and prompts encoded with them
    as the family encodes prompts. A token's vector is its rows side by side ([D1 + D2])."""

    encoders: list[ConceptTokens]  # per text encoder, in the family's order
    text_encoders: list[torch.nn.Module]
    family: Family
    resolution: int  # SDXL's size conditioning

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.encoders[0].tokens

    @property
    def ids(self) -> tuple[int, ...]:  # the same positions in every encoder's tokenizer (one BPE vocabulary)
        return self.encoders[0].ids

    @property
    def tokenizer(self) -> Any:
        return self.encoders[0].tokenizer

    @property
    def widths(self) -> list[int]:
        return [e.embedding.embedding_dim for e in self.encoders]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for e in self.encoders for p in e.parameters()]

    def restore_frozen_rows(self) -> None:
        for e in self.encoders:
            e.restore_frozen_rows()

    def install(self) -> None:
        """Hand each text encoder these tokens' embedding (where another token set was in place)."""
        for e, encoder in zip(self.encoders, self.text_encoders):
            encoder.set_input_embeddings(e.embedding)

    def vectors(self) -> dict[str, torch.Tensor]:
        per_encoder = [e.vectors() for e in self.encoders]
        return {token: torch.cat([v[token] for v in per_encoder]) for token in per_encoder[0]}

    def load_vectors(self, vectors: dict[str, torch.Tensor]) -> None:
        for e, part in zip(self.encoders, split_vectors(vectors, self.widths)):
            e.load_vectors(part)

    def embed(self, prompts: list[str], injected: dict[str, torch.Tensor] | None = None) -> Prompt:
        """`prompts` encoded by the family, with gradients to the new rows; `injected` maps a
        placeholder to [B, D1 + D2] input vectors, each encoder taking its own columns."""
        outputs = [embed_prompts(e, encoder, prompts, part, full=True) for e, encoder, part in
                   zip(self.encoders, self.text_encoders, split_vectors(injected or {}, self.widths))]
        return self.family.combine(outputs, self.resolution)


def split_vectors(vectors: dict[str, torch.Tensor], widths: list[int]) -> list[dict[str, torch.Tensor]]:
    """Token vectors [..., D1 + D2] as one dict per encoder (its columns)."""
    parts = {token: vector.split(widths, dim=-1) for token, vector in vectors.items()}
    return [{token: chunks[i] for token, chunks in parts.items()} for i in range(len(widths))]


@contextlib.contextmanager
def family_tokens(parts: ModelParts, tokens: dict[str, str], resolution: int,
                  placeholders: dict[str, str] | None = None) -> Iterator[PromptTokens]:
    """`added_tokens` in each of the family's CLIP text encoders for the block."""
    with contextlib.ExitStack() as stack:
        pairs = list(zip(parts.tokenizers(), parts.text_encoders()))
        encoders = [stack.enter_context(added_tokens(tokenizer, encoder, tokens, placeholders))
                    for tokenizer, encoder in pairs]
        yield PromptTokens(encoders, [encoder for _, encoder in pairs], parts.family, resolution)


TEXTUAL_INVERSION_STEM = "learned_embeds-{i}"  # the i-th token's file name, without ".safetensors"


def textual_inversion_files(vectors: dict[str, torch.Tensor], widths: list[int] | None = None,
                            stem: str = TEXTUAL_INVERSION_STEM) -> dict[str, bytes]:
    """Diffusers textual-inversion files for `vectors` (token -> [D], or [D1 + D2] for SDXL's
    two encoders, as `PromptTokens.vectors()` gives them), each {token: [D]} as
    `textual_inversion.py` saves `learned_embeds.safetensors`; `pipe.load_textual_inversion(path)`
    reads each. SDXL's second encoder's rows go in a `_2` file beside, as
    `textual_inversion_sdxl.py` saves them, for `text_encoder_2` / `tokenizer_2`."""
    files = {}
    for i, (token, vector) in enumerate(vectors.items()):
        for j, part in enumerate(vector.split(widths or [vector.shape[-1]], dim=-1)):
            files[f"{stem.format(i=i)}{'_2' if j else ''}.safetensors"] = save({token: part.contiguous()})
    return files


def textual_inversion_usage(tokens: list[str], widths: list[int] | None = None,
                            stem: str = TEXTUAL_INVERSION_STEM) -> tuple[str, str]:
    """(the stock diffusers pipeline class, its `load_textual_inversion` calls) that load
    `textual_inversion_files`' files, for an export's model card."""
    xl = widths is not None and len(widths) > 1
    calls = []
    for i, token in enumerate(tokens):
        calls.append(f'pipe.load_textual_inversion("./{stem.format(i=i)}.safetensors")')
        if xl:  # SDXL's second text encoder takes its own rows
            calls.append(f'pipe.load_textual_inversion("./{stem.format(i=i)}_2.safetensors", token="{token}", '
                         'text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)')
    return ("StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"), "\n".join(calls)


# -- the masked loss ------------------------------------------------------------------------


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 1, H, W] masks in [0, 1] at pixel (or any) size -> [B, 1, h, w] at the latent's,
    by area averaging, so a thin part keeps a partial weight instead of vanishing."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"masks must be [B, 1, H, W], got {tuple(mask.shape)}")
    return F.adaptive_avg_pool2d(mask.float(), size)


def masked_denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                          normalise: MaskNorm = "area") -> torch.Tensor:
    """Mean over the batch of the squared error inside each sample's mask.

    "area" divides by the mask's area (every sample weighs the same, whatever the size of its
    subject; our recorded choice); "image" by the whole latent, as Break-A-Scene's
    mse(pred * m, target * m). An all-ones mask gives the plain loss under either; an empty
    mask contributes nothing instead of dividing by zero."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    weights = latent_mask(mask, pred.shape[-2:]).to(pred.device)  # [B, 1, h, w]
    squared = (pred.float() - target.float()) ** 2 * weights
    channels = pred.shape[1]
    if normalise == "area":
        area = weights.sum(dim=(1, 2, 3)).clamp_min(torch.finfo(torch.float32).tiny) * channels
    elif normalise == "image":
        area = torch.full((pred.shape[0],), float(pred[0].numel()), device=pred.device)
    else:
        raise ValueError(f"mask normalisation {normalise!r}: use 'area' or 'image'")
    return (squared.sum(dim=(1, 2, 3)) / area).mean()


# -- cross-attention ------------------------------------------------------------------------


class AttentionMaps:
    """Running sums of head-averaged cross-attention probabilities, per level (query count)."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = defaultdict(int)

    def add(self, probs: torch.Tensor) -> None:
        """`probs` [B, heads, Q, T] of one layer call."""
        level = probs.shape[2]
        mean = probs.detach().float().mean(dim=1)  # [B, Q, T]
        self.sums[level] = self.sums[level] + mean if level in self.sums else mean
        self.counts[level] += 1

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def maps(self, latent_size: tuple[int, int]) -> torch.Tensor:
        """[B, T, h, w]: per token, the map averaged over heads and the layers of the level
        nearest `latent_size / MAP_DOWNSCALE`. Every pixel's maps sum to 1 over the tokens."""
        if not self.sums:
            raise ValueError("no cross-attention was recorded; run the UNet inside `cross_attention(recorder=...)`")
        height, width = latent_size

        def downscale(level: int) -> float:
            return math.sqrt(height * width / level)

        level = min(self.sums, key=lambda q: (abs(math.log(downscale(q) / MAP_DOWNSCALE)), q))
        factor = downscale(level)
        h, w = round(height / factor), round(width / factor)
        if h * w != level:
            raise ValueError(f"a {level}-query attention level does not tile a {height}x{width} latent")
        mean = self.sums[level] / self.counts[level]  # [B, Q, T]
        return mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], h, w)


class TokenCrossAttnProcessor:
    """Cross-attention (attn2) as diffusers' `AttnProcessor2_0` computes it, with the
    start-of-text token's key and value detached (`train_custom_diffusion.py`: that token
    is in every prompt, so training K/V on it would shift every prompt) and, when a recorder
    is given, the attention probabilities computed explicitly and handed to it."""

    def __init__(self, detach_start: bool = True, recorder: AttentionMaps | None = None) -> None:
        self.detach_start, self.recorder = detach_start, recorder

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("TokenCrossAttnProcessor is for cross-attention (attn2) only; "
                             "leave attn1 processors as they are (cross_attention does)")
        if attn.spatial_norm is not None or hidden_states.ndim != 3:
            raise ValueError("TokenCrossAttnProcessor expects transformer-block cross-attention: "
                             "[B, tokens, C] inputs and no spatial norm")
        residual = hidden_states
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if self.detach_start:
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.recorder is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        else:
            scores = query @ key.transpose(-1, -2) * attn.scale  # [B, heads, Q, T]
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            self.recorder.add(probs)
            out = probs.to(value.dtype) @ value
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def cross_attention(unet: torch.nn.Module, detach_start: bool = True,
                    recorder: AttentionMaps | None = None) -> Iterator[TokenCrossAttnProcessor]:
    """`TokenCrossAttnProcessor` on every cross-attention layer for the block; self-attention
    keeps its processors (JeDi's coupling, say), and every layer gets its own back on exit."""
    previous = dict(unet.attn_processors)
    if not any(name.endswith(CROSS_ATTENTION_SUFFIX) for name in previous):
        raise ValueError(f"{type(unet).__name__} has no cross-attention processors named "
                         f"'*.{CROSS_ATTENTION_SUFFIX}'; token methods need a text-conditioned diffusers UNet")
    processor = TokenCrossAttnProcessor(detach_start, recorder)  # stateless but for the recorder
    unet.set_attn_processor({name: processor if name.endswith(CROSS_ATTENTION_SUFFIX) else old
                             for name, old in previous.items()})
    try:
        yield processor
    finally:
        unet.set_attn_processor(dict(previous))  # a copy: set_attn_processor pops what it is given
