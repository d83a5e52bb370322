"""SDXL: two CLIP text encoders and the size conditioning, on an SD-style UNet."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Family, Prompt, encoded

if TYPE_CHECKING:
    from ..loading import ModelParts


class StableDiffusionXL(Family):
    """CLIP ViT-L and OpenCLIP bigG, the second with a projection whose pooled output,
    with the image's size and crop ("time ids"), feeds the UNet's added embedding."""

    name = "sdxl"
    label = "SDXL"
    pipelines = ("StableDiffusionXLPipeline",)

    def extra_text_encoders(self, path: str) -> list[tuple[Any, Any]]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return [(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                 CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))]

    def pipeline_options(self) -> dict[str, Any]:
        return {}

    def encode(self, parts: ModelParts, prompt: str, resolution: int) -> Prompt:
        """As diffusers' train_dreambooth_lora_sdxl.py: each encoder's penultimate hidden
        states, concatenated on the feature axis; the pooled embedding of the second; time
        ids (original size, crop top-left, target size) for a square, uncropped image."""
        import torch

        first = encoded(parts.tokenizer, parts.text_encoder, prompt)
        second = encoded(parts.tokenizer_2, parts.text_encoder_2, prompt)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).float()  # [1, L, D1 + D2]
        return Prompt(states, second.text_embeds.float(), time_ids)

    def unconditional(self, parts: ModelParts, resolution: int) -> Prompt:
        """Zeros for the empty prompt, as StableDiffusionXLPipeline does (force_zeros_for_empty_prompt)."""
        import torch

        empty = self.encode(parts, "", resolution)
        return Prompt(torch.zeros_like(empty.states), torch.zeros_like(empty.pooled), empty.time_ids)

    def sampling_pipeline(self, parts: ModelParts, scheduler: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**self._pipeline_parts(parts, scheduler))

    def img2img_pipeline(self, parts: ModelParts, scheduler: Any) -> Any:
        from diffusers import StableDiffusionXLImg2ImgPipeline

        # The aesthetic-score conditioning is the refiner's; a base model's UNet takes size ids.
        return StableDiffusionXLImg2ImgPipeline(**self._pipeline_parts(parts, scheduler),
                                                requires_aesthetics_score=False)

    def _pipeline_parts(self, parts: ModelParts, scheduler: Any) -> dict[str, Any]:
        return {"vae": parts.vae, "text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2,
                "tokenizer": parts.tokenizer, "tokenizer_2": parts.tokenizer_2, "unet": parts.unet,
                "scheduler": scheduler}


SDXL = StableDiffusionXL()
