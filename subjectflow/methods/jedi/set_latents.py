"""Joint sets as the trainer reads them: latents cached on disk per (set, base model,
resolution) and read a batch of sets at a time, and every distinct caption embedded once.

Host memory holds one shard's images while encoding and one step's sets while training, not
the catalog: at a thousand subjects [S, N, 4, 64, 64] latents alone are GBs. The cache lives
under the catalog's untracked `work/` (it is derived data: deleting it costs one re-encode).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...catalog import Catalog
from ...config import stable_hash
from ...jointsets import read_sets
from ...models.families import Prompt
from ...models.loading import ModelParts
from ...training.data import encode_latents, image_tensor

NULL_CAPTION = ""  # the empty prompt: its embedding is the unconditional one
VAE_BATCH = 8  # member images per VAE call while encoding


class CachedSetLatents:
    """[S, N, C, h, w] set latents, one safetensors file per set, indexed like a tensor."""

    def __init__(self, files: list[Path], shape: tuple[int, ...], device: torch.device) -> None:
        self.files, self.shape, self.device = files, torch.Size(shape), device

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([load_file(self.files[i])["latents"] for i in index.tolist()]).to(self.device)


@dataclass
class EncodedSets:
    latents: CachedSetLatents  # [S, N, C, h, w]
    captions: Prompt  # batch U + 1: the distinct captions, encoded, then the empty prompt
    set_captions: torch.Tensor  # [S, N] each member's caption, an index into `captions`

    @property
    def null_caption(self) -> int:
        return self.captions.states.shape[0] - 1


def embed_all(parts: ModelParts, captions: list[str], resolution: int) -> dict[str, Prompt]:
    """Each distinct caption encoded (batch 1) by the base model's family, once."""
    return {c: parts.family.encode(parts, c, resolution) for c in sorted(set(captions))}


def latent_cache(catalog: Catalog, base: str, resolution: int) -> Path:
    return catalog.work_dir("set-latents", stable_hash([base, resolution]))


def encode_sets(catalog: Catalog, parts: ModelParts, rows: list[dict], resolution: int, base: str) -> EncodedSets:
    """The sets of `rows` (jointsets rows), encoded where the cache lacks them: shard by
    shard, in VAE batches across sets."""
    by_set: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["set_id"], r["member"])):
        by_set.setdefault(row["set_id"], []).append(row)
    cache = latent_cache(catalog, base, resolution)
    cache.mkdir(parents=True, exist_ok=True)
    files = {set_id: cache / f"{set_id}.safetensors" for set_id in by_set}
    todo = {set_id for set_id, path in files.items() if not path.exists()}
    pending: list[tuple[str, list[torch.Tensor]]] = []
    for joint_set in read_sets(catalog, sorted({by_set[s][0]["shard"] for s in todo}), todo):
        pending.append((joint_set.set_id, [image_tensor(im, resolution) for im in joint_set.images]))
        if sum(len(images) for _, images in pending) >= VAE_BATCH:
            _encode(parts, pending, files)
    if pending:
        _encode(parts, pending, files)

    embedded = embed_all(parts, [r["caption"] for r in rows], resolution)
    position = {caption: i for i, caption in enumerate(embedded)}
    null = parts.family.encode(parts, NULL_CAPTION, resolution)
    device = parts.unet.device
    captions = Prompt.cat([*embedded.values(), null]).to(device)
    set_captions = torch.tensor([[position[r["caption"]] for r in members] for members in by_set.values()], device=device)
    first = load_file(next(iter(files.values())))["latents"]
    latents = CachedSetLatents(list(files.values()), (len(files), *first.shape), device)
    return EncodedSets(latents, captions, set_captions)


def _encode(parts: ModelParts, pending: list[tuple[str, list[torch.Tensor]]], files: dict[str, Path]) -> None:
    latents = encode_latents(parts.vae, torch.stack([im for _, images in pending for im in images])).float().cpu()
    start = 0
    for set_id, images in pending:
        # Written beside, then renamed: a killed run never leaves a half-written set.
        tmp = files[set_id].with_name(f".{set_id}.{uuid.uuid4().hex}")
        save_file({"latents": latents[start:start + len(images)].contiguous()}, tmp)
        tmp.rename(files[set_id])
        start += len(images)
    pending.clear()
