"""JeDi coupled self-attention (METHODS.md section 2).

Zeng et al., "JeDi: Joint-Image Diffusion Models for Finetuning-Free Personalized
Text-to-Image Generation", CVPR 2024, arXiv 2407.06187. There is no official code and the
paper's exact layer details are not available, so this is "our choice" as METHODS.md
section 2 describes it: the images of one subject form a set, and in every self-attention
layer (attn1) the queries of image i attend to the keys/values of *all* images of its set,
concatenated along the token axis:

    K_set = [K_1; ...; K_N],  V_set = [V_1; ...; V_N]    (token axis, one set of N images)
    out_i = softmax(Q_i K_set^T · scale) V_set           (per head), then the out projection

Cross-attention (attn2) is untouched: each image keeps its own caption. A batch is laid
out as consecutive sets of `set_size` images, so putting the classifier-free-guidance
halves in separate sets (e.g. [uncond set..., cond set...]) means they never mix. With
`set_size == 1` every set is one image and the layer is plain self-attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from ...models.families import Prompt
from ...training.diffusion import model_time, noised, scaled_input, set_sampling_timesteps
from .joint_attention import CoupledJointAttention, couple_transformer

if TYPE_CHECKING:  # diffusers only for annotations: callers hand us their own modules
    from diffusers.models.attention_processor import Attention

# Key suffix of a self-attention processor in a diffusers UNet's `attn_processors` dict
# (BasicTransformerBlock names its self-attention `attn1`, its cross-attention `attn2`).
SELF_ATTENTION_SUFFIX = "attn1.processor"


def _join_sets(x: torch.Tensor, set_size: int) -> torch.Tensor:
    """[B, heads, L, d] -> [B/set_size, heads, set_size*L, d]: a set's tokens side by side."""
    batch, heads, tokens, dim = x.shape
    x = x.reshape(batch // set_size, set_size, heads, tokens, dim).transpose(1, 2)
    return x.reshape(batch // set_size, heads, set_size * tokens, dim)


def _split_sets(x: torch.Tensor, set_size: int) -> torch.Tensor:
    """Inverse of `_join_sets`: [B/set_size, heads, set_size*L, d] -> [B, heads, L, d]."""
    sets, heads, set_tokens, dim = x.shape
    x = x.reshape(sets, heads, set_size, set_tokens // set_size, dim).transpose(1, 2)
    return x.reshape(sets * set_size, heads, set_tokens // set_size, dim)


class CoupledSelfAttnProcessor:
    """Coupled self-attention for one set layout (METHODS.md section 2, JeDi, arXiv 2407.06187).

    A drop-in diffusers attention processor for self-attention layers that follows
    `AttnProcessor2_0` step by step (spatial norm, 4-D inputs, group norm, q/k norms,
    residual connection, output rescaling) except that keys and values are shared within
    each set of `set_size` consecutive batch images. Queries are joined the same way, which
    is equivalent (every query sees the same keys) and lets one SDPA call serve a whole set;
    outputs are split back per image.
    """

    def __init__(self, set_size: int) -> None:
        self.set_size = set_size

    @property
    def set_size(self) -> int:
        return self._set_size

    @set_size.setter
    def set_size(self, value: int) -> None:
        # Settable, so one installed processor serves calls with different set layouts
        # (set completion runs the reference-free guidance term as sets of one).
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"CoupledSelfAttnProcessor: set_size must be an int >= 1, got {value!r}")
        self._set_size = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(set_size={self.set_size})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Extra positional args / a `scale` kwarg are what AttnProcessor2_0 accepts and ignores
        # (deprecated LoRA scale); we accept them too so the call sites need not change.
        if encoder_hidden_states is not None:
            raise ValueError(
                "CoupledSelfAttnProcessor is for self-attention (attn1) only, but it was called with "
                "encoder_hidden_states (cross-attention); leave attn2 processors as they are "
                "(couple_unet does)"
            )
        set_size = self.set_size
        batch_size = hidden_states.shape[0]
        if batch_size % set_size:
            raise ValueError(
                f"CoupledSelfAttnProcessor: batch size {batch_size} is not a multiple of set_size "
                f"{set_size}; lay the batch out as whole sets (with classifier-free guidance, "
                f"each guidance half as its own set(s))"
            )
        if attention_mask is not None and set_size > 1:
            # A per-image mask has no agreed meaning over another image's keys; SD UNets pass none to attn1.
            raise ValueError(
                f"CoupledSelfAttnProcessor: attention_mask is not supported with set_size {set_size} > 1"
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            _, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        sequence_length = hidden_states.shape[1]

        if attention_mask is not None:  # set_size == 1 here: exactly AttnProcessor2_0's handling
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:  # per image, before coupling: normalisation stats stay per image
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # The coupling: one SDPA call per set over the set's concatenated tokens. attn.scale is
        # SDPA's default unless the layer was built with scale_qk=False, where diffusers' own
        # default processor (AttnProcessor) also uses attn.scale.
        hidden_states = F.scaled_dot_product_attention(
            _join_sets(query, set_size), _join_sets(key, set_size), _join_sets(value, set_size),
            attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale,
        )
        hidden_states = _split_sets(hidden_states, set_size)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def couple_unet(unet: torch.nn.Module, set_size: int) -> tuple[CoupledSelfAttnProcessor, dict[str, Any]]:
    """Install `CoupledSelfAttnProcessor(set_size)` on every self-attention (attn1) layer.

    METHODS.md section 2 (JeDi, arXiv 2407.06187): only self-attention is coupled; the
    cross-attention (attn2) processors are kept as the very same objects. Returns the
    installed processor (its `set_size` may be changed between calls) and the previous
    processors, keyed as in `unet.attn_processors`; restore them with
    `unet.set_attn_processor(previous)` (note that diffusers empties the dict it is given).
    """
    processor = CoupledSelfAttnProcessor(set_size)  # stateless, so one instance serves every layer
    previous = dict(unet.attn_processors)
    if not any(name.endswith(SELF_ATTENTION_SUFFIX) for name in previous):
        raise ValueError(
            f"couple_unet: {type(unet).__name__} has no self-attention processors named "
            f"'*.{SELF_ATTENTION_SUFFIX}'; JeDi coupling needs a diffusers UNet with transformer blocks"
        )
    coupled_processors = {
        name: processor if name.endswith(SELF_ATTENTION_SUFFIX) else old for name, old in previous.items()
    }
    unet.set_attn_processor(coupled_processors)
    return processor, previous


@contextmanager
def coupled(unet: torch.nn.Module, set_size: int) -> Iterator[CoupledSelfAttnProcessor | CoupledJointAttention]:
    """Run `unet` with coupled self-attention inside the block (a transformer, SD3's or
    FLUX's: joint attention over the set, joint_attention.py); the previous processors come
    back on exit, also after an error (METHODS.md section 2)."""
    couple = couple_unet if hasattr(unet, "down_blocks") else couple_transformer
    processor, previous = couple(unet, set_size)
    try:
        yield processor
    finally:
        unet.set_attn_processor(dict(previous))  # a copy: set_attn_processor pops what it is given


# -- personalisation as set completion --------------------------------------------------

ReferenceMode = Literal["noised", "clean"]


def compositional_guidance(e_none: torch.Tensor, e_image: torch.Tensor, e_full: torch.Tensor,
                           image_scale: float, text_scale: float) -> torch.Tensor:
    """METHODS.md section 2, image guidance in compositional form:

        e = e(z,∅,∅) + s_I·[e(z,refs,∅) − e(z,∅,∅)] + s_T·[e(z,refs,text) − e(z,refs,∅)]
    """
    return e_none + image_scale * (e_image - e_none) + text_scale * (e_full - e_image)


@torch.no_grad()
def complete_set(
    unet: torch.nn.Module,
    scheduler: Any,
    references: torch.Tensor,  # [K, C, h, w] clean reference latents (K may be 0)
    reference_embeds: Prompt | torch.Tensor,  # batch K: the references' captions
    prompt_embeds: Prompt | torch.Tensor,  # batch 1: the new images' prompt
    null_embeds: Prompt | torch.Tensor,  # batch 1: the empty prompt
    n_new: int,
    steps: int,
    image_scale: float,
    text_scale: float,
    reference_mode: ReferenceMode = "noised",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate `n_new` latents [n_new, C, h, w] as the unknown members of a joint set whose
    known members are the references (JeDi inference, METHODS.md section 2).

    Each step denoises the set [references; new] with coupled self-attention. The reference
    slots are overwritten before every UNet call: "noised" puts them at the current t with
    one fixed noise draw (inpainting style, and what training showed the model: every member
    of a set at the same t); "clean" keeps them at t=0 and tells the UNet so through
    per-image timesteps. Only the new slots are stepped by the scheduler.

    The three guidance terms take two UNet calls: one batch of two sets ([refs; new] with the
    new images' text empty, then with the prompt; the references keep their captions in
    both), and the reference-free term as sets of one (the new images alone, empty text).
    """
    if reference_mode not in ("noised", "clean"):
        raise ValueError(f"reference_mode must be 'noised' or 'clean', got {reference_mode!r}")
    k = references.shape[0]
    size = k + n_new
    device = references.device
    dtype = next(unet.parameters()).dtype
    shape = (n_new, *references.shape[1:])
    latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(device)
    set_sampling_timesteps(scheduler, steps, latents)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    reference_noise = torch.randn(references.shape, generator=generator,
                                  device=generator.device if generator else "cpu").to(device)
    references_text = Prompt.of(reference_embeds)
    new_null, new_text = Prompt.of(null_embeds).expand(n_new), Prompt.of(prompt_embeds).expand(n_new)
    sets_text = Prompt.cat([references_text, new_null, references_text, new_text]).to(device, dtype)
    null_text = new_null.to(device, dtype)

    with coupled(unet, size) as processor:
        for t in scheduler.timesteps:
            at = model_time(scheduler, t)
            if reference_mode == "noised":  # every member at t, so every input is scaled for t
                known = noised(scheduler, references, reference_noise, at.expand(k)) if k else references
                members = scaled_input(scheduler, torch.cat([known, latents]), t)
                known_t = at
            else:  # clean references are at t=0: only the noisy members are scaled (Euler, DPM)
                members = torch.cat([references, scaled_input(scheduler, latents, t)])
                known_t = torch.zeros_like(at)
            member_t = torch.cat([known_t.expand(k), at.expand(n_new)]).repeat(2)

            processor.set_size = size
            eps = sets_text.predict(unet, dtype, torch.cat([members, members]), member_t)
            e_image, e_full = eps[k:size], eps[size + k:]
            processor.set_size = 1
            e_none = null_text.predict(unet, dtype, members[k:], at.expand(n_new))

            guided = compositional_guidance(e_none, e_image, e_full, image_scale, text_scale)
            latents = scheduler.step(guided, t, latents).prev_sample
    return latents
