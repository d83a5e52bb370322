"""The interface every family implements, and Stable Diffusion 1.x/2.x, the first of them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and diffusers take seconds to import; load them on use
    import torch

    from ..loading import ModelParts


@dataclass(frozen=True)
class Prompt:
    """An encoded prompt as the denoiser takes it: token states [1 or B, L, D] and, for a
    family with pooled text conditioning (SDXL, FLUX), the pooled embedding [1 or B, P]; SDXL
    also has the size conditioning "time ids" [1 or B, 6]. A family whose denoiser is called
    differently subclasses it and overrides `predict`."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def predict(self, denoiser: Any, dtype: torch.dtype, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for `noisy` latents [B, C, h, w] at timesteps `t` [B], in fp32."""
        inputs: dict[str, Any] = {
            "encoder_hidden_states": self.states.expand(noisy.shape[0], -1, -1).to(noisy.device, dtype)}
        if self.pooled is not None:
            inputs["added_cond_kwargs"] = {"text_embeds": self._batch(self.pooled, noisy, dtype),
                                           "time_ids": self._batch(self.time_ids, noisy, dtype)}
        return denoiser(noisy.to(dtype), t, **inputs).sample.float()

    @staticmethod
    def _batch(t: torch.Tensor, noisy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.expand(noisy.shape[0], *t.shape[1:]).to(noisy.device, dtype)

    @staticmethod
    def of(embeds: Prompt | torch.Tensor) -> Prompt:
        """`embeds` as a Prompt: an SD prompt's bare token states [B, L, D] are one."""
        return embeds if isinstance(embeds, Prompt) else Prompt(embeds)

    @staticmethod
    def cat(prompts: list[Prompt]) -> Prompt:
        """The prompts' batches one after the other (all of one family)."""
        import torch

        first = prompts[0]
        fields = [[getattr(p, name) for p in prompts] for name in ("states", "pooled", "time_ids")]
        return type(first)(*(None if parts[0] is None else torch.cat(parts) for parts in fields))

    def with_states(self, states: torch.Tensor) -> Prompt:
        """The same prompt with other token states (a learned offset on some tokens)."""
        return replace(self, states=states)

    def to(self, *args: Any) -> Prompt:
        """Every tensor moved and/or cast, as `Tensor.to(*args)`."""
        return self._map(lambda t: t.to(*args))

    def expand(self, n: int) -> Prompt:
        """A prompt of batch 1 as a batch of `n` (views, no copies)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def at(self, index: torch.Tensor) -> Prompt:
        """The prompts of batch rows `index`: a shared prompt (batch 1) broadcast to them, or
        one row per prompt picked."""
        if self.states.shape[0] == 1:
            return self.expand(len(index))
        return self._map(lambda t: t[index.to(t.device)])

    def repeat(self, n: int) -> Prompt:
        """The batch `n` times over, one copy after the other (rows i, B + i, ... match)."""
        return self._map(lambda t: t.repeat(n, *[1] * (t.ndim - 1)))

    def repeat_interleave(self, n: int) -> Prompt:
        """Each row `n` times in a row, as set members laid out consecutively."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def _map(self, fn: Any) -> Prompt:
        return type(self)(fn(self.states), *(None if t is None else fn(t) for t in (self.pooled, self.time_ids)))


class Family:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder (its last hidden states), a UNet
    trained on DDPM noise, sampled with DDIM."""

    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipelines: tuple[str, ...] = ("StableDiffusionPipeline",)  # model_index.json classes; the first samples
    img2img = "StableDiffusionImg2ImgPipeline"
    denoiser_folder = "unet"
    denoiser_class = "UNet2DConditionModel"  # diffusers' class in `denoiser_folder`
    # How SFT draws its timesteps: uniform (DreamBooth; diffusers' SDXL and FLUX scripts), or
    # logit-normal (diffusers' SD3 script); training.diffusion.training_timesteps.
    sft_timesteps = "uniform"
    # Each text encoder's padded prompt length, in order; None: its tokenizer's own (CLIP's 77).
    max_lengths: tuple[int | None, ...] = ()

    def load_denoiser(self, path: str, **kwargs: Any) -> Any:
        import diffusers

        return getattr(diffusers, self.denoiser_class).from_pretrained(path, subfolder=self.denoiser_folder, **kwargs)

    def training_scheduler(self, path: str) -> Any:
        from diffusers import DDPMScheduler

        # Whatever sampler the model ships (SD 1.5: PNDM), training adds noise the DDPM way.
        return DDPMScheduler.from_pretrained(path, subfolder="scheduler")

    def sampling_scheduler(self, training: Any) -> Any:
        from diffusers import DDIMScheduler

        # DDIM samples well in tens of steps; the training scheduler (DDPM) needs hundreds.
        return DDIMScheduler.from_config(training.config)

    def first_text_encoder(self, path: str) -> Any:
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(path, subfolder="text_encoder")

    def extra_text_encoders(self, path: str) -> list[tuple[Any, Any]]:
        """[(tokenizer_2, text_encoder_2), (tokenizer_3, text_encoder_3)] as far as the family has them."""
        return []

    def pipeline_options(self) -> dict[str, Any]:
        """Pipeline keywords beside its modules (`from_pretrained` and the constructor): SD's
        ships a safety checker, which sampling here goes without."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode(self, parts: ModelParts, prompt: str, resolution: int) -> Prompt:
        lengths = (*self.max_lengths, None, None, None)
        return self.combine([encoded(tokenizer, encoder, prompt, length) for tokenizer, encoder, length
                             in zip(parts.tokenizers(), parts.text_encoders(), lengths)], resolution)

    def combine(self, outputs: list[Any], resolution: int) -> Prompt:
        """A batch of prompts from each text encoder's output (every hidden state), in the
        family's order: the one place a family says which states it conditions on. SD: the
        last hidden states."""
        return Prompt(outputs[0][0].float())

    def pipeline_prompt(self, prompt: Prompt) -> dict[str, Any]:
        """A prompt encoded here as the sampling pipeline's keywords (learned tokens' embeddings)."""
        return {"prompt_embeds": prompt.states}

    def unconditional(self, parts: ModelParts, resolution: int) -> Prompt:
        """The prompt classifier-free guidance contrasts with: the empty one, as SD's pipeline uses."""
        return self.encode(parts, "", resolution)

    def sampling_pipeline(self, parts: ModelParts, scheduler: Any) -> Any:
        import diffusers

        return getattr(diffusers, self.pipelines[0])(**self._pipeline_parts(parts, scheduler))

    def img2img_pipeline(self, parts: ModelParts, scheduler: Any) -> Any:
        """SDEdit from a given image (CDNS negatives)."""
        import diffusers

        return getattr(diffusers, self.img2img)(**self._pipeline_parts(parts, scheduler))

    def img2img_options(self, resolution: int) -> dict[str, Any]:
        """Keywords an img2img call needs beyond the prompt and image: SD's works at the image's size."""
        return {}

    def _pipeline_parts(self, parts: ModelParts, scheduler: Any) -> dict[str, Any]:
        """The pipeline's modules, the model's own, under the names model_index.json gives them."""
        modules = {"vae": parts.vae, "scheduler": scheduler, self.denoiser_folder: parts.unet}
        for suffix, tokenizer, encoder in zip(("", "_2", "_3"), parts.tokenizers(), parts.text_encoders()):
            modules |= {f"tokenizer{suffix}": tokenizer, f"text_encoder{suffix}": encoder}
        return modules | self.pipeline_options()


class FlowMatchingFamily(Family):
    """What SD3 and FLUX share: a transformer trained by flow matching, sampled with the same
    Euler scheduler, and img2img pipelines that resize to the size asked for."""

    denoiser_folder = "transformer"

    def training_scheduler(self, path: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")

    def sampling_scheduler(self, training: Any) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(training.config)

    def pipeline_options(self) -> dict[str, Any]:
        return {}

    def img2img_options(self, resolution: int) -> dict[str, Any]:
        # Their img2img pipelines resize the image to height x width, by default 1024 px.
        return {"height": resolution, "width": resolution}


def encoded(tokenizer: Any, encoder: Any, prompt: str, max_length: int | None = None) -> Any:
    """A text encoder's full output (all hidden states) for one prompt padded to `max_length`."""
    import torch

    ids = tokenizer(prompt, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids.to(encoder.device), output_hidden_states=True)


SD = Family()
