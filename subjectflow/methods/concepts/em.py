"""The E-step: each concept's mask re-estimated from where its token attends.

Per photo, the prompt naming all its concepts runs through the UNet at a few noise levels
with the cross-attention recorder on; each token's map (averaged over heads, the ~16x16
layers and the timesteps, divided by its max, as Break-A-Scene normalises) is upsampled to
the photo and refined into hard masks by a dense CRF guided by the photo's colours, or
Otsu's threshold plus a morphological open/close where `pydensecrf2` is not installed.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...models.families import Prompt
from ...training.subjects import TuningError
from ...training.tokens import AttentionMaps, cross_attention

Refiner = Literal["crf", "otsu"]
CRF_ITERATIONS = 5
CRF_GAIN = 2.0
# The CRF's pairwise terms, pydensecrf's documented defaults: a smoothness kernel over
# position, and an appearance kernel over position and colour.
SMOOTH_SXY, SMOOTH_COMPAT = 3, 3
APPEARANCE_SRGB, APPEARANCE_COMPAT = 13, 10


def crf_installed() -> bool:
    return importlib.util.find_spec("pydensecrf") is not None


def refiner(choice: str) -> Refiner:
    """`concepts.refine` resolved: "auto" is the CRF when it is installed."""
    if choice == "auto":
        return "crf" if crf_installed() else "otsu"
    if choice == "crf" and not crf_installed():
        raise TuningError("concepts.refine=crf needs the dense CRF: `pip install pydensecrf2` "
                          "(or set concepts.refine=otsu)")
    return choice  # type: ignore[return-value]


@torch.no_grad()
def token_maps(unet, scheduler, latent: torch.Tensor, embeds: Prompt | torch.Tensor, positions: list[int],
               timesteps: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """[k, h', w'] in [0, 1]: the attention map of the tokens at `positions` of one photo's
    prompt, `latent` [1, C, h, w] noised to each of `timesteps`, `embeds` its encoding (batch 1)."""
    steps = torch.tensor([min(t, scheduler.config.num_train_timesteps - 1) for t in timesteps],
                         device=latent.device)
    x0 = latent.expand(len(steps), -1, -1, -1)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(latent)
    recorder = AttentionMaps()
    dtype = unet.dtype
    with cross_attention(unet, recorder=recorder):
        Prompt.of(embeds).predict(unet, dtype, scheduler.add_noise(x0, noise, steps), steps)
    maps = recorder.maps(tuple(latent.shape[-2:])).mean(dim=0)[positions]  # [k, h', w']
    return maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def refine(maps: torch.Tensor, photo: np.ndarray, how: Refiner) -> np.ndarray:
    """[k, h', w'] soft maps and the photo [H, W, 3] uint8 -> [k, H, W] bool hard masks,
    disjoint: a pixel two concepts claim goes to the one attending more."""
    height, width = photo.shape[:2]
    probs = F.interpolate(maps[None].float(), size=(height, width), mode="bilinear",
                          align_corners=False)[0].clamp(0, 1).cpu().numpy()  # [k, H, W]
    labels = _crf(probs, photo) if how == "crf" else _otsu(probs)
    return np.stack([labels == j for j in range(probs.shape[0])])


def _otsu_threshold(p: np.ndarray) -> float:
    return cv2.threshold((p * 255).astype(np.uint8), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0] / 255


def _centred(p: np.ndarray) -> np.ndarray:
    """A max-normalised map as a probability that crosses 1/2 at its Otsu threshold. Raw,
    a noisy map's subject sits near 0.5 against a background near 0.3, and the CRF's
    smoothing then labels everything "neither" (bench/refine.py: IoU 0.04 at noise 0.5;
    0.95 centred, gain CRF_GAIN per standard deviation)."""
    spread = max(float(p.std()), 0.05)
    return 1 / (1 + np.exp(-(p - _otsu_threshold(p)) * CRF_GAIN / spread))


def _crf(probs: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """Labels 0..k-1 (a concept) or -1 (neither), by mean-field inference on a dense CRF
    whose unaries are the centred maps, "neither" being 1 - the strongest."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, height, width = probs.shape  # (the photo is copied: pydensecrf needs a writable buffer)
    probs = np.stack([_centred(p) for p in probs])
    labelled = np.concatenate([probs, 1 - probs.max(axis=0, keepdims=True)])  # [k+1, H, W]
    labelled = np.clip(labelled, 1e-4, None)
    labelled /= labelled.sum(axis=0, keepdims=True)
    crf = dcrf.DenseCRF2D(width, height, k + 1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(labelled.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=SMOOTH_SXY, compat=SMOOTH_COMPAT)
    # the appearance kernel's reach scales with the photo: 80 px at SD's 512, as its examples
    crf.addPairwiseBilateral(sxy=max(4, width // 6), srgb=APPEARANCE_SRGB, rgbim=np.array(photo, np.uint8, order="C"),
                             compat=APPEARANCE_COMPAT)
    q = np.asarray(crf.inference(CRF_ITERATIONS)).reshape(k + 1, height, width)
    labels = q.argmax(axis=0)
    return np.where(labels == k, -1, labels)


def _otsu(probs: np.ndarray) -> np.ndarray:
    """Labels by Otsu's threshold on each map, opened then closed with a disc 1/16 of the
    photo wide (removing specks, filling pinholes), ties to the strongest map."""
    size = max(3, probs.shape[1] // 16) | 1
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    claimed = []
    for p in probs:
        binary = ((p * 255).astype(np.uint8) > round(_otsu_threshold(p) * 255)).astype(np.uint8)
        binary = cv2.morphologyEx(cv2.morphologyEx(binary, cv2.MORPH_OPEN, disc), cv2.MORPH_CLOSE, disc)
        claimed.append(binary.astype(bool))
    claimed = np.stack(claimed)
    strongest = np.where(claimed, probs, -1.0).argmax(axis=0)
    return np.where(claimed.any(axis=0), strongest, -1)


def iou(mask: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union of two masks, the reference (ingest's soft mask) at 0.5;
    1.0 when both are empty."""
    a, b = mask > 0.5, reference > 0.5
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
