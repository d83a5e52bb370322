"""Training inputs as tensors: photos -> VAE latents, prompts -> text embeddings.

Latents and embeddings are computed once per run (the VAE and text encoder are frozen),
so a training step costs only UNet passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def instance_prompt(identifier: str, class_name: str) -> str:
    """DreamBooth's subject prompt: a rare identifier bound to the class noun."""
    return f"a photo of {identifier} {class_name}"


def class_prompt(class_name: str) -> str:
    return f"a photo of {class_name}"


@torch.no_grad()
def decode_image(vae, latents: torch.Tensor) -> Image.Image:
    """The first of `latents` [N, C, h, w] (scaled, as sampling leaves them) as an RGB image."""
    dtype = next(vae.parameters()).dtype
    image = vae.decode(latents.to(dtype) / vae.config.scaling_factor + _shift(vae)).sample
    array = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """[3, R, R] in [-1, 1], the VAE's input range."""
    image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1)


def load_images(paths: list[Path], resolution: int) -> torch.Tensor:
    """[N, 3, R, R] from image files."""
    return torch.stack([image_tensor(Image.open(p), resolution) for p in paths])


def load_masks(paths: list[Path], resolution: int) -> torch.Tensor:
    """[N, 1, R, R] in [0, 1] from ingest's mask files (255 = subject)."""
    masks = [np.asarray(Image.open(p).convert("L").resize((resolution, resolution), Image.Resampling.BILINEAR),
                        dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(masks))[:, None]


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[N, 3, R, R] pixels -> [N, C, R/f, R/f] shifted and scaled latents, as the denoiser
    sees them (the distribution's mode: deterministic, so cached latents and resumed runs agree)."""
    param = next(vae.parameters())
    chunks = [vae.encode(chunk.to(param.device, param.dtype)).latent_dist.mode()
              for chunk in images.split(batch_size)]
    return (torch.cat(chunks).float() - _shift(vae)) * vae.config.scaling_factor


def _shift(vae) -> float:
    # SD3's and FLUX's VAEs centre their latents (shift_factor); SD's and SDXL's have none.
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    """[1, L, D] text embedding, padded to the tokenizer's max length as SD expects."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float()
