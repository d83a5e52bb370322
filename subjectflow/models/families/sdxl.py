"""SDXL: two CLIP text encoders and the size conditioning, on an SD-style UNet."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Family, Prompt

if TYPE_CHECKING:
    from ..loading import ModelParts


class StableDiffusionXL(Family):
    """CLIP ViT-L and OpenCLIP bigG, the second with a projection whose pooled output,
    with the image's size and crop ("time ids"), feeds the UNet's added embedding."""

    name = "sdxl"
    label = "SDXL"
    pipelines = ("StableDiffusionXLPipeline",)
    img2img = "StableDiffusionXLImg2ImgPipeline"  # without the refiner's aesthetic score: its default

    def extra_text_encoders(self, path: str) -> list[tuple[Any, Any]]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return [(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                 CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))]

    def pipeline_options(self) -> dict[str, Any]:
        return {}

    def combine(self, outputs: list[Any], resolution: int) -> Prompt:
        """As diffusers' train_dreambooth_lora_sdxl.py: each encoder's penultimate hidden
        states, concatenated on the feature axis; the pooled embedding of the second; time
        ids (original size, crop top-left, target size) for a square, uncropped image."""
        import torch

        first, second = outputs
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).float()  # [B, L, D1 + D2]
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        return Prompt(states, second.text_embeds.float(), time_ids.expand(states.shape[0], -1))

    def pipeline_prompt(self, prompt: Prompt) -> dict[str, Any]:
        # The pipeline makes its own size ids from height and width, as `combine` does.
        return {"prompt_embeds": prompt.states, "pooled_prompt_embeds": prompt.pooled}

    def unconditional(self, parts: ModelParts, resolution: int) -> Prompt:
        """Zeros for the empty prompt, as StableDiffusionXLPipeline does (force_zeros_for_empty_prompt)."""
        import torch

        empty = self.encode(parts, "", resolution)
        return Prompt(torch.zeros_like(empty.states), torch.zeros_like(empty.pooled), empty.time_ids)


SDXL = StableDiffusionXL()
