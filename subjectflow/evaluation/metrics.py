"""Subject-driven generation metrics, DreamBench style (METHODS.md, Evaluation).

- dino / clip_i: mean cosine similarity between the embeddings of every generated image
  and every real photo of the subject (DINO ViT-S/16 CLS token; CLIP image embedding).
- mdino / mclip_i: the same on subject crops only: each image is cut to its mask's
  bounding box with the background filled grey, so the background cannot count.
  Real photos bring their ingest masks; generated images are masked by `mask_fn`.
- clip_t: cosine between each generated image and its prompt, the subject placeholder
  replaced by the class noun.
- diversity: 1 - mean pairwise DINO cosine among the images of one prompt.
- proxy_colour / proxy_edges: weight-free stand-ins (scorer_kind "proxy"): histogram
  intersection of masked HSV colour and edge-orientation histograms with the real photos.

Scores carry the scorer that made them and its kind; a "random-test" scorer's numbers
test the plumbing and are never a measure of quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import MaskConfig
from .prompts import class_prompt
from .scorers import PROXY, ClipScorer, DinoScorer, ImageScorer, Scorers

MaskFn = Callable[[Image.Image], Image.Image]  # image -> L mask at any size, >= 128 = subject

GREY = (128, 128, 128)
PROXY_SIDE = 128  # the proxy compares images at this size
PROXY_SCORER = "proxy:hsv12x4x4+edges12@v1"
_HSV_BINS = (12, 4, 4)
_EDGE_BINS = 12


@dataclass(frozen=True)
class Score:
    """One value for the `metrics` table; prompt None is the subject's overall value."""

    metric: str
    value: float
    scorer: str
    scorer_kind: str  # pretrained | random-test | proxy
    prompt: str | None
    n_images: int  # generated images that went into the value


@dataclass(frozen=True)
class Masker:
    name: str  # "grabcut", or the `package.module:factory` of a weight-based segmenter
    fn: MaskFn


def ingest_masker(config: MaskConfig | None = None) -> MaskFn:
    """The ingest stage's segmenter (GrabCut by default) as a `mask_fn` for generated images."""
    from ..ingest.masks import subject_mask

    mask_config = config or MaskConfig()
    return lambda image: subject_mask(image.convert("RGB"), mask_config)[0]


def generated_masker(masker: str, mask: MaskConfig) -> Masker:
    """`evaluate.masker` for generated images ("" = ingest's own segmenter), run at
    ingest's mask size; a plug-in is loaded as ingest loads one."""
    config = mask.model_copy(update={"method": masker}) if masker else mask
    return Masker(config.method, ingest_masker(config))


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, m] cosine similarities between the rows of `a` [n, d] and `b` [m, d], clamped to
    [-1, 1] (rounding would otherwise give an image 1.0000001 with itself)."""
    similarity = torch.nn.functional.normalize(a.float(), dim=-1) @ torch.nn.functional.normalize(b.float(), dim=-1).T
    return similarity.clamp(-1.0, 1.0)


def fidelity(scorer: ImageScorer, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """DINO or CLIP-I: mean cosine over all (generated, reference) pairs."""
    return float(cosine_matrix(scorer.embed_images(generated), scorer.embed_images(references)).mean())


def clip_t(scorer: ClipScorer, images: Sequence[Image.Image], text: str) -> float:
    """Mean cosine between each image's CLIP embedding and the text's."""
    return float(cosine_matrix(scorer.embed_images(images), scorer.embed_texts([text])).mean())


def diversity(scorer: DinoScorer, images: Sequence[Image.Image]) -> float:
    """1 - mean pairwise cosine among `images` (each unordered pair once)."""
    return _diversity(scorer.embed_images(images))


def _diversity(embeddings: torch.Tensor) -> float:
    n = len(embeddings)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images of one prompt, got {n}")
    upper = torch.triu_indices(n, n, offset=1)
    return float(1 - cosine_matrix(embeddings, embeddings)[upper[0], upper[1]].mean())


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A mask as bool HxW at `size` (width, height); >= 128 is the subject."""
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return np.asarray(mask) >= 128


def subject_crop(image: Image.Image, mask: Image.Image, fill: tuple[int, int, int] = GREY) -> Image.Image | None:
    """The subject alone: background filled with `fill`, cut to the mask's bounding box and
    padded to a square (so no preprocessing crop cuts the subject off). None if the mask is empty."""
    crop, _ = _square_crop(image, binary_mask(mask, image.size), fill)
    return crop


def _square_crop(image: Image.Image, subject: np.ndarray, fill: tuple[int, int, int]
                 ) -> tuple[Image.Image | None, np.ndarray | None]:
    if not subject.any():
        return None, None
    rows, cols = np.flatnonzero(subject.any(axis=1)), np.flatnonzero(subject.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    rgb = np.asarray(image.convert("RGB"))[top:bottom, left:right]
    inside = subject[top:bottom, left:right]
    side = max(inside.shape)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = fill
    keep = np.zeros((side, side), bool)
    y, x = (side - inside.shape[0]) // 2, (side - inside.shape[1]) // 2
    canvas[y:y + inside.shape[0], x:x + inside.shape[1]] = np.where(inside[..., None], rgb, np.array(fill, np.uint8))
    keep[y:y + inside.shape[0], x:x + inside.shape[1]] = inside
    return Image.fromarray(canvas), keep


def colour_histogram(image: Image.Image, mask: Image.Image | None = None) -> np.ndarray:
    """Normalised HSV histogram of the subject's pixels (all pixels when `mask` is None)."""
    rgb, keep = _proxy_view(image, mask)
    if rgb is None:
        return np.zeros(int(np.prod(_HSV_BINS)))
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).astype(np.int64)[keep]
    index = np.zeros(len(hsv), np.int64)
    for channel, bins in enumerate(_HSV_BINS):
        index = index * bins + hsv[:, channel] * bins // 256
    counts = np.bincount(index, minlength=int(np.prod(_HSV_BINS))).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def edge_histogram(image: Image.Image, mask: Image.Image | None = None) -> np.ndarray:
    """Normalised histogram of gradient orientations (mod 180 degrees) weighted by magnitude.

    With a mask, edges are taken on the subject over grey, so its outline counts and the
    real background does not. An image without edges gives the uniform histogram."""
    rgb, _ = _proxy_view(image, mask)
    if rgb is None:
        return np.zeros(_EDGE_BINS)
    grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(grey)
    magnitude = np.hypot(gx, gy).ravel()
    bins = (np.mod(np.arctan2(gy, gx), np.pi) / np.pi * _EDGE_BINS).astype(np.int64).ravel() % _EDGE_BINS
    counts = np.bincount(bins, weights=magnitude, minlength=_EDGE_BINS)
    total = counts.sum()
    return counts / total if total > 0 else np.full(_EDGE_BINS, 1.0 / _EDGE_BINS)


def _proxy_view(image: Image.Image, mask: Image.Image | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The pixels the proxy compares, at PROXY_SIDE, and which of them are the subject."""
    if mask is None:
        rgb = np.asarray(image.convert("RGB").resize((PROXY_SIDE, PROXY_SIDE), Image.Resampling.BILINEAR))
        return rgb, np.ones((PROXY_SIDE, PROXY_SIDE), bool)
    crop, keep = _square_crop(image, binary_mask(mask, image.size), GREY)
    if crop is None:
        return None, None
    small_keep = Image.fromarray(keep.astype(np.uint8) * 255).resize((PROXY_SIDE, PROXY_SIDE), Image.Resampling.NEAREST)
    return (np.asarray(crop.resize((PROXY_SIDE, PROXY_SIDE), Image.Resampling.BILINEAR)),
            np.asarray(small_keep) >= 128)


def histogram_intersection(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of bin-wise minima of two normalised histograms: 1 identical, 0 disjoint."""
    return min(float(np.minimum(a, b).sum()), 1.0)  # rounding may pass 1 by an ulp


def proxy_similarity(generated: Sequence[Image.Image], references: Sequence[Image.Image],
                     generated_masks: Sequence[Image.Image | None] | None = None,
                     reference_masks: Sequence[Image.Image | None] | None = None) -> dict[str, float]:
    """Mean histogram intersection over all (generated, reference) pairs; masks None = whole images."""
    per_image = _proxy_per_image(generated, references, generated_masks, reference_masks)
    return {metric: float(np.mean(values)) for metric, values in per_image.items()}


def _proxy_per_image(generated: Sequence[Image.Image], references: Sequence[Image.Image],
                     generated_masks: Sequence[Image.Image | None] | None,
                     reference_masks: Sequence[Image.Image | None] | None) -> dict[str, np.ndarray]:
    generated_masks = generated_masks or [None] * len(generated)
    reference_masks = reference_masks or [None] * len(references)
    out = {}
    for metric, histogram in (("proxy_colour", colour_histogram), ("proxy_edges", edge_histogram)):
        refs = [histogram(image, mask) for image, mask in zip(references, reference_masks)]
        hists = [histogram(image, mask) for image, mask in zip(generated, generated_masks)]
        out[metric] = np.array([np.mean([histogram_intersection(h, ref) for ref in refs]) for h in hists])
    return out


def score_subject(generated: Mapping[str, Sequence[Image.Image]], references: Sequence[Image.Image],
                  reference_masks: Sequence[Image.Image], class_name: str, scorers: Scorers,
                  mask_fn: MaskFn) -> list[Score]:
    """Every metric for one subject: per prompt and overall (prompt None).

    `generated` maps each prompt template (with the `{subject}` placeholder) to its images.
    Overall values average over all generated images (DreamBench); overall diversity is the
    mean over prompts with >= 2 images. A mask that finds no subject (generated image or
    photo) drops that image from the masked metrics; `n_images` counts what was scored.
    """
    _check_inputs(generated, references, reference_masks)
    prompts = list(generated)
    images = [image for prompt in prompts for image in generated[prompt]]
    owner = np.array([i for i, prompt in enumerate(prompts) for _ in generated[prompt]])
    ref_crops = [subject_crop(image, mask) for image, mask in zip(references, reference_masks)]
    masked_refs = [(image, mask) for image, mask, crop in zip(references, reference_masks, ref_crops)
                   if crop is not None]
    ref_crops = [crop for crop in ref_crops if crop is not None]
    gen_masks = [mask_fn(image) for image in images]
    gen_crops = [subject_crop(image, mask) for image, mask in zip(images, gen_masks)]
    masked = np.array([crop is not None for crop in gen_crops], bool)

    scores: list[Score] = []

    def add(metric: str, per_image: np.ndarray, scorer: str, kind: str, scored: np.ndarray | None = None) -> None:
        scored = np.ones(len(images), bool) if scored is None else scored
        for i, prompt in enumerate([*prompts, None]):
            take = scored & (owner == i) if prompt is not None else scored
            if take.any():
                scores.append(Score(metric, float(per_image[take].mean()), scorer, kind, prompt, int(take.sum())))

    for scorer, metric, masked_metric in ((scorers.dino, "dino", "mdino"), (scorers.clip, "clip_i", "mclip_i")):
        if scorer is None:
            continue
        embeddings = scorer.embed_images(images)
        add(metric, _mean_rows(embeddings, scorer.embed_images(references)), scorer.name, scorer.kind)
        if masked.any() and ref_crops:
            crop_embeddings = scorer.embed_images([crop for crop in gen_crops if crop is not None])
            per_image = np.zeros(len(images))
            per_image[masked] = _mean_rows(crop_embeddings, scorer.embed_images(ref_crops))
            add(masked_metric, per_image, scorer.name, scorer.kind, masked)
        if metric == "dino":
            _add_diversity(scores, embeddings, owner, prompts, scorer)
        else:
            texts = scorer.embed_texts([class_prompt(prompt, class_name) for prompt in prompts])
            add("clip_t", (embeddings * texts[owner]).sum(-1).numpy(), scorer.name, scorer.kind)
    if scorers.proxy and masked.any() and masked_refs:
        ref_images, ref_masks = zip(*masked_refs)
        for metric, per_image in _proxy_per_image(images, ref_images, gen_masks, ref_masks).items():
            add(metric, per_image, PROXY_SCORER, PROXY, masked)
    return scores


def _mean_rows(generated: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """Per generated image: its mean cosine to every reference."""
    return cosine_matrix(generated, references).mean(dim=1).numpy()


def _add_diversity(scores: list[Score], embeddings: torch.Tensor, owner: np.ndarray, prompts: list[str],
                   scorer: DinoScorer) -> None:
    values, counts = [], []
    for i, prompt in enumerate(prompts):
        rows = torch.from_numpy(np.flatnonzero(owner == i))
        if len(rows) >= 2:
            values.append(_diversity(embeddings[rows]))
            counts.append(len(rows))
            scores.append(Score("diversity", values[-1], scorer.name, scorer.kind, prompt, len(rows)))
    if values:
        scores.append(Score("diversity", float(np.mean(values)), scorer.name, scorer.kind, None, sum(counts)))


def _check_inputs(generated: Mapping[str, Sequence[Image.Image]], references: Sequence[Image.Image],
                  reference_masks: Sequence[Image.Image]) -> None:
    if not references:
        raise ValueError("no real photos of the subject to compare with")
    if len(reference_masks) != len(references):
        raise ValueError(f"{len(references)} real photos but {len(reference_masks)} masks; give one mask per photo")
    empty = [prompt for prompt, images in generated.items() if not images]
    if not generated or empty:
        raise ValueError(f"no generated images for prompt(s) {empty or 'any'}")


def summary(scores: Sequence[Score]) -> dict[str, float]:
    """The overall value of each metric: {"dino": 0.71, ...}."""
    return {score.metric: score.value for score in scores if score.prompt is None}
