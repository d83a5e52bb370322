"""DETEX's parts (METHODS.md section 4): the attribute mappers and the image features they
read, the decoupled prompt, the training objective, and the one weights file.

A training photo i is described as "a photo of <subject> {class}, with <pose> pose, in
<background> background" (our recorded choice), where <subject> is one learned token row
shared by every photo and <pose>, <background> are placeholders whose input vectors the
mappers make from photo i's features. Identity can only go into the shared row; what
varies per photo is free to go into the mappers' outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load, save

from ...evaluation.scorers import ImageScorer
from ...training.adapters import adapter_state, load_adapter_state, lora_file_bytes
from ...training.data import encode_latents
from ...training.diffusion import Metrics, noised_prediction, pick
from ...models.families import Prompt
from ...training.tokens import MaskNorm, PromptTokens, masked_denoising_loss

POSE, BACKGROUND = "<pose>", "<background>"
ATTRIBUTES = {POSE: "pose", BACKGROUND: "background"}  # placeholder -> initialiser word
ENCODED = "pose of the masked foreground, background of the subject masked out"
FEATURES = f"pooled VAE latent: {ENCODED}"
PROMPT = "a photo of {token} {class_name}, with <pose> pose, in <background> background"
MAPPER_NAMES = ("pose", "background")


def training_prompt(token: str, class_name: str) -> str:
    return PROMPT.format(token=token, class_name=class_name)


def keeping(text: str, pose: bool, background: bool) -> str:
    """`text` with the kept attributes' placeholders added, as training phrased them."""
    return text + (f", with {POSE} pose" if pose else "") + (f", in {BACKGROUND} background" if background else "")


class AttributeMapper(torch.nn.Sequential):
    """feature -> hidden -> text width, GELU, LayerNorm. The LayerNorm's gain starts at the
    word embeddings' scale, so a mapped vector first looks like a word, not 30x larger."""

    def __init__(self, features: int, hidden: int, width: int, scale: float | torch.Tensor = 1.0) -> None:
        super().__init__(torch.nn.Linear(features, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width),
                         torch.nn.LayerNorm(width))
        with torch.no_grad():  # one scale, or one per output column (SDXL: each encoder's words')
            self[3].weight.copy_(torch.as_tensor(scale, dtype=torch.float32).expand(width))


@torch.no_grad()
def photo_features(vae, pixels: torch.Tensor, masks: torch.Tensor, grid: int,
                   encoder: ImageScorer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 3, R, R] photos and [N, 1, R, R] masks -> the pose mapper's input (the subject
    alone) and the background mapper's (the photo with the subject removed): the pooled VAE
    latent [N, C*g*g], or the `encoder`'s embedding [N, D] when one is configured. Removed
    pixels are 0: mid-grey in [-1, 1]."""
    def features(images: torch.Tensor) -> torch.Tensor:
        if encoder is None:
            return F.adaptive_avg_pool2d(encode_latents(vae, images), grid).flatten(1)
        array = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        return encoder.embed_images([Image.fromarray(a, "RGB") for a in array])

    return features(pixels * masks), features(pixels * (1 - masks))


@dataclass
class DetexObjective:
    unet: UNet2DConditionModel
    scheduler: object
    concepts: PromptTokens  # the subject token (trained) and the two placeholders, in every text encoder
    prompt: str
    latents: torch.Tensor  # [N, C, h, w] the subject's photos
    masks: torch.Tensor  # [N, 1, H, W] their ingest masks in [0, 1]
    pose_features: torch.Tensor  # [N, F]
    background_features: torch.Tensor  # [N, F]
    mappers: torch.nn.ModuleDict  # "pose", "background"
    kv: list[torch.nn.Parameter]  # the K/V LoRA
    kv_learning_rate: float
    batch_size: int = 1
    normalise: MaskNorm = "area"
    adapter_name: str = "detex"
    class_latents: torch.Tensor | None = None  # prior preservation (unmasked, as DreamBooth's)
    class_embeds: Prompt | None = None
    prior_weight: float = 1.0
    _dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self._dtype = self.unet.dtype

    def _learned(self) -> list[torch.nn.Parameter]:
        return self.concepts.parameters() + list(self.mappers.parameters())

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.kv + self._learned()

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        return [{"params": self.kv, "lr": self.kv_learning_rate}, {"params": self._learned(), "lr": learning_rate}]

    def after_step(self) -> None:
        self.concepts.restore_frozen_rows()

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, Metrics]:
        index = torch.randint(0, self.latents.shape[0], (self.batch_size,), generator=generator,
                              device=generator.device).to(self.latents.device)
        injected = {POSE: self.mappers["pose"](self.pose_features[index]),  # [B, D (SDXL: D1 + D2)]
                    BACKGROUND: self.mappers["background"](self.background_features[index])}
        embeds = self.concepts.embed([self.prompt] * self.batch_size, injected)
        pred, target = noised_prediction(self.unet, self._dtype, self.scheduler, self.latents[index], embeds, generator)
        loss = masked_denoising_loss(pred, target, self.masks[index], self.normalise)
        metrics = {"instance_loss": loss.item()}
        if self.class_latents is not None:
            prior_pred, prior_target = noised_prediction(self.unet, self._dtype, self.scheduler,
                                                         pick(self.class_latents, self.batch_size, generator),
                                                         self.class_embeds, generator)
            prior = F.mse_loss(prior_pred, prior_target)
            loss = loss + self.prior_weight * prior
            metrics["prior_loss"] = prior.item()
        return loss, {"loss": loss.item(), **metrics}

    def learned_state(self) -> dict[str, torch.Tensor]:
        token = self.concepts.tokens[0]
        mappers = {k: v.detach().float().cpu() for k, v in self.mappers.state_dict().items()}
        return {"token": self.concepts.vectors()[token], **mappers}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        lora = adapter_state(self.unet, self.adapter_name)
        return {**{f"lora.{k}": v for k, v in lora.items()}, **self.learned_state()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.unet, {k[5:]: v for k, v in state.items() if k.startswith("lora.")}, self.adapter_name)
        self.concepts.load_vectors({self.concepts.tokens[0]: state["token"]})
        self.mappers.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in MAPPER_NAMES})

    def weights_bytes(self, photos: list[str]) -> bytes:
        """One safetensors file: the K/V LoRA under diffusers' own keys (so the file is also a
        LoRA file diffusers loads), and under `detex.` the token, mappers and features."""
        tensors = load(lora_file_bytes(self.unet, self.adapter_name))
        extra = {**self.learned_state(), "pose_features": self.pose_features, "background_features":
                 self.background_features}
        tensors.update({f"detex.{k}": v.detach().float().cpu().contiguous() for k, v in extra.items()})
        widths = self.concepts.widths  # recorded where the token spans more than one encoder (SDXL)
        return save(tensors, metadata={"format": "pt", "detex.token": self.concepts.tokens[0],
                                       "detex.photos": json.dumps(photos),
                                       **({"detex.widths": json.dumps(widths)} if len(widths) > 1 else {})})


@dataclass
class DetexWeights:
    token: str
    photos: list[str]  # image ids, in feature order
    tensors: dict[str, torch.Tensor]
    encoder_widths: list[int] | None = None  # SDXL: the token's columns per text encoder

    @classmethod
    def read(cls, path: Path) -> DetexWeights:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata()
        widths = json.loads(meta["detex.widths"]) if "detex.widths" in meta else None
        return cls(meta["detex.token"], json.loads(meta["detex.photos"]), load(path.read_bytes()), widths)

    @property
    def widths(self) -> list[int]:
        return self.encoder_widths or [self.vector.shape[-1]]

    @property
    def vector(self) -> torch.Tensor:
        return self.tensors["detex.token"]

    @property
    def lora(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith("detex.")}

    def features(self, name: str) -> torch.Tensor:
        return self.tensors[f"detex.{name}_features"]

    def mapper(self, name: str) -> AttributeMapper:
        prefix = f"detex.{name}."
        state = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        hidden, features = state["0.weight"].shape
        mapper = AttributeMapper(features, hidden, state["2.weight"].shape[0])
        mapper.load_state_dict(state)
        return mapper.eval()
