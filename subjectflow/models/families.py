"""Model families: what differs between the base models a user points `model.base` at.

A family is recognised from the pipeline folder's model_index.json (`_class_name`). It
knows the text encoders it has, how a prompt is encoded with all of them (SDXL: both CLIP
encoders' penultimate states side by side, the second's pooled embedding and the size
conditioning), and its sampling pipeline. Methods take `Prompt`s and `parts.family` and
never branch on which family it is; each method lists the families it is written for
(`Method.families`) and the registry refuses the others with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and diffusers take seconds to import; load them on use
    import torch

    from .loading import ModelParts


@dataclass(frozen=True)
class Prompt:
    """An encoded prompt as the denoiser takes it: token states [1 or B, L, D] and, for a
    family with pooled text conditioning (SDXL), the pooled embedding [1 or B, P] and the
    size conditioning "time ids" [1 or B, 6]."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_inputs(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The UNet's conditioning keywords for a batch of `batch` noised latents."""
        inputs: dict[str, Any] = {
            "encoder_hidden_states": self.states.expand(batch, -1, -1).to(device, dtype)}  # [B, L, D]
        if self.pooled is not None:
            inputs["added_cond_kwargs"] = {"text_embeds": self.pooled.expand(batch, -1).to(device, dtype),
                                           "time_ids": self.time_ids.expand(batch, -1).to(device, dtype)}
        return inputs

    def at(self, index: torch.Tensor) -> Prompt:
        """The prompts of batch rows `index`: a shared prompt (batch 1) broadcast to them, or
        one row per prompt picked."""
        if self.states.shape[0] == 1:
            return self._map(lambda t: t.expand(len(index), *t.shape[1:]))
        return self._map(lambda t: t[index.to(t.device)])

    def repeat(self, n: int) -> Prompt:
        """The batch `n` times over, one copy after the other (rows i, B + i, ... match)."""
        return self._map(lambda t: t.repeat(n, *[1] * (t.ndim - 1)))

    def repeat_interleave(self, n: int) -> Prompt:
        """Each row `n` times in a row, as set members laid out consecutively."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def _map(self, fn: Any) -> Prompt:
        return Prompt(fn(self.states), *(None if t is None else fn(t) for t in (self.pooled, self.time_ids)))


class Family:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden states."""

    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipelines: tuple[str, ...] = ("StableDiffusionPipeline",)
    # Set when subjectflow recognises the family but cannot train or sample it yet.
    unsupported: str | None = None

    def second_text_encoder(self, path: str) -> tuple[Any, Any]:
        """(tokenizer_2, text_encoder_2) as loaded from `path`; (None, None) without one."""
        return None, None

    def pipeline_options(self) -> dict[str, Any]:
        """`from_pretrained` keywords for the whole pipeline: SD's ships a safety checker."""
        return {"safety_checker": None, "requires_safety_checker": False}

    def encode(self, parts: ModelParts, prompt: str, resolution: int) -> Prompt:
        from ..training.data import encode_prompt

        return Prompt(encode_prompt(parts.tokenizer, parts.text_encoder, prompt))

    def sampling_pipeline(self, parts: ModelParts, scheduler: Any) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**self._pipeline_parts(parts, scheduler))

    def img2img_pipeline(self, parts: ModelParts, scheduler: Any) -> Any:
        """SDEdit from a given image (CDNS negatives)."""
        from diffusers import StableDiffusionImg2ImgPipeline

        return StableDiffusionImg2ImgPipeline(**self._pipeline_parts(parts, scheduler))

    def _pipeline_parts(self, parts: ModelParts, scheduler: Any) -> dict[str, Any]:
        return {"vae": parts.vae, "text_encoder": parts.text_encoder, "tokenizer": parts.tokenizer,
                "unet": parts.unet, "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
                "requires_safety_checker": False}


class StableDiffusionXL(Family):
    """SDXL: CLIP ViT-L and OpenCLIP bigG, the second with a projection whose pooled output,
    with the image's size and crop ("time ids"), feeds the UNet's added embedding."""

    name = "sdxl"
    label = "SDXL"
    pipelines = ("StableDiffusionXLPipeline",)

    def second_text_encoder(self, path: str) -> tuple[Any, Any]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return (CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))

    def pipeline_options(self) -> dict[str, Any]:
        return {}

    def encode(self, parts: ModelParts, prompt: str, resolution: int) -> Prompt:
        """As diffusers' train_dreambooth_lora_sdxl.py: each encoder's penultimate hidden
        states, concatenated on the feature axis; the pooled embedding of the second; time
        ids (original size, crop top-left, target size) for a square, uncropped image."""
        import torch

        first = _encoded(parts.tokenizer, parts.text_encoder, prompt)
        second = _encoded(parts.tokenizer_2, parts.text_encoder_2, prompt)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).float()  # [1, L, D1 + D2]
        return Prompt(states, second.text_embeds.float(), time_ids)

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


def _encoded(tokenizer: Any, encoder: Any, prompt: str) -> Any:
    import torch

    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids.to(encoder.device), output_hidden_states=True)


class _Recognised(Family):
    def __init__(self, name: str, label: str, pipelines: tuple[str, ...]) -> None:
        self.name, self.label, self.pipelines = name, label, pipelines
        self.unsupported = (f"subjectflow recognises {label} models but does not train or sample them yet "
                            f"(their transformer denoisers and flow-matching schedulers are not wired in)")


SD = Family()
SDXL = StableDiffusionXL()
FAMILIES: tuple[Family, ...] = (
    SD, SDXL,
    _Recognised("sd3", "Stable Diffusion 3", ("StableDiffusion3Pipeline",)),
    _Recognised("flux", "FLUX.1", ("FluxPipeline",)),
)


def by_pipeline(class_name: str | None) -> Family | None:
    """The family of a model_index.json `_class_name`; None for one subjectflow does not know."""
    return next((f for f in FAMILIES if class_name in f.pipelines), None)


def supported() -> str:
    return ", ".join(f.label for f in FAMILIES if f.unsupported is None)
