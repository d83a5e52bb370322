"""JeDi on transformer denoisers (SD3's MMDiT, FLUX.1): our choice, as issue 15 records it.

A UNet's self-attention is coupled by sharing keys and values across a set (attention.py).
An MMDiT block already attends jointly over one image's text and image tokens; coupling it
joins the whole set into that one attention instead: the set's members' text tokens, then
their image tokens (FLUX's double-stream blocks; SD3's put the image tokens first, and its
processor orders them itself), or each member's [text; image] sequence side by side
(FLUX's single-stream blocks). Every member keeps its own caption; the positional
embedding of a member's tokens is its own (FLUX's rotary ids repeat per member, so a patch
sees the same place in the other members as at its own). With a set size of 1 each call is
the model's own attention, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def _join(x: torch.Tensor, set_size: int) -> torch.Tensor:
    """[B, L, D] -> [B/set_size, set_size·L, D]: a set's tokens one member after the other."""
    return x.reshape(x.shape[0] // set_size, set_size * x.shape[1], *x.shape[2:])


def _split(x: torch.Tensor, set_size: int) -> torch.Tensor:
    return x.reshape(x.shape[0] * set_size, x.shape[1] // set_size, *x.shape[2:])


def _tile_rotary(rotary: Any, lengths: list[int], set_size: int) -> Any:
    """FLUX's (cos, sin) [S, d] for one member's sequence (parts of `lengths`) as the set's:
    each part repeated per member, in the order the joined sequence has them."""
    if rotary is None:
        return None
    return tuple(torch.cat([part.repeat(set_size, 1) for part in table.split(lengths)]) for table in rotary)


class CoupledJointAttention:
    """One processor for every attention of the transformer, around each module's own;
    `set_size` is settable between calls, as CoupledSelfAttnProcessor's. Its call signature
    is spelled out: diffusers inspects it for the keywords it may pass."""

    def __init__(self, set_size: int) -> None:
        self.set_size = set_size
        self.inner: dict[int, Any] = {}  # id(attention module) -> its own processor

    def wrap(self, processors: dict[str, Any], modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
        """The processors to install: this one everywhere (diffusers passes each call its module)."""
        for name, module in modules.items():
            self.inner[id(module)] = processors[f"{name}.processor"]
        return {name: self for name in processors}

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        inner, n = self.inner[id(attn)], self.set_size
        if n == 1:
            return inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        if hidden_states.shape[0] % n:
            raise ValueError(f"a batch of {hidden_states.shape[0]} is not whole sets of {n}")
        if encoder_hidden_states is None:  # FLUX single-stream: each member's [text; image] sequence
            rotary = _tile_rotary(image_rotary_emb, [hidden_states.shape[1]], n)
            return _split(inner(attn, _join(hidden_states, n), None, attention_mask, rotary, **kwargs), n)
        rotary = _tile_rotary(image_rotary_emb, [encoder_hidden_states.shape[1], hidden_states.shape[1]], n)
        out = inner(attn, _join(hidden_states, n), _join(encoder_hidden_states, n), attention_mask, rotary, **kwargs)
        return tuple(_split(o, n) for o in out) if isinstance(out, tuple) else _split(out, n)


def couple_transformer(denoiser: torch.nn.Module, set_size: int) -> tuple[CoupledJointAttention, dict[str, Any]]:
    """Install the coupling on every attention of `denoiser` (SD3's or FLUX's transformer);
    returns it and the previous processors, as `couple_unet` does."""
    previous = dict(denoiser.attn_processors)
    modules = {name: module for name, module in denoiser.named_modules() if f"{name}.processor" in previous}
    coupling = CoupledJointAttention(set_size)
    denoiser.set_attn_processor(coupling.wrap(previous, modules))
    return coupling, previous
