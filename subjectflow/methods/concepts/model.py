"""Concept tokens and masks learned together (METHODS.md section 5): the M-step objective,
its E-step over every photo, and the one weights file.

M-step (every training step): each sample is one photo and a random non-empty subset of
the concepts in it (Break-A-Scene's union sampling), prompted "a photo of <c1> and <c2>",
with the denoising loss restricted to the union of those concepts' current masks. E-step
(every `e_step_every` steps): each concept's mask in each photo re-estimated from its
token's cross-attention (`em.py`). `history[i]` holds the masks after E-step i, the
initial ones at 0, and rides in checkpoints so a resumed run repeats the same EM.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load, save

from ...training.adapters import adapter_state, load_adapter_state, lora_file_bytes
from ...training.diffusion import Metrics, noised_prediction
from ...training.tokens import MaskNorm, PromptTokens, masked_denoising_loss
from .em import Refiner, iou, refine, token_maps

PREFIX = "concepts."


def composed_prompt(tokens: list[str]) -> str:
    return "a photo of " + " and ".join(tokens)


@dataclass
class ConceptObjective:
    unet: UNet2DConditionModel
    scheduler: object
    concepts: PromptTokens  # one learned token per concept, in every text encoder
    latents: torch.Tensor  # [N, C, h, w] every photo any concept appears in
    photos: np.ndarray  # [N, H, W, 3] uint8: what the CRF's appearance kernel reads
    present: list[tuple[int, ...]]  # per photo, the concepts in it
    references: torch.Tensor  # [N, K, 1, H, W] each concept's region from the ingest mask (0 where absent)
    masks: torch.Tensor  # [N, K, 1, H, W] the current masks
    kv: list[torch.nn.Parameter] = field(default_factory=list)  # the optional K/V LoRA
    kv_learning_rate: float = 1e-4
    batch_size: int = 1
    normalise: MaskNorm = "area"
    e_step_every: int = 100
    timesteps: tuple[int, ...] = (200, 400, 600)
    refiner: Refiner = "otsu"
    seed: int = 0
    adapter_name: str = "concepts"
    history: list[torch.Tensor] = field(default_factory=list)  # [N, K, 1, H, W] bool, per E-step
    e_step_seconds: list[float] = field(default_factory=list)
    refine_seconds: list[float] = field(default_factory=list)  # per photo
    _dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self._dtype = self.unet.dtype
        if not self.history:
            self.history.append(self.masks > 0.5)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.kv + self.concepts.parameters()

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        groups = [{"params": self.concepts.parameters(), "lr": learning_rate}]
        return groups + ([{"params": self.kv, "lr": self.kv_learning_rate}] if self.kv else [])

    def after_step(self) -> None:
        self.concepts.restore_frozen_rows()

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, Metrics]:
        device = generator.device
        index = torch.randint(0, self.latents.shape[0], (self.batch_size,), generator=generator, device=device)
        prompts, masks = [], []
        for i in index.tolist():
            present = self.present[i]
            count = int(torch.randint(1, len(present) + 1, (1,), generator=generator, device=device))
            chosen = sorted(present[j] for j in torch.randperm(len(present), generator=generator,
                                                               device=device)[:count].tolist())
            prompts.append(composed_prompt([self.concepts.tokens[c] for c in chosen]))
            masks.append(self.masks[i, chosen].amax(dim=0))  # [1, H, W] the union
        embeds = self.concepts.embed(prompts)
        pred, target = noised_prediction(self.unet, self._dtype, self.scheduler,
                                         self.latents[index.to(self.latents.device)], embeds, generator)
        loss = masked_denoising_loss(pred, target, torch.stack(masks).to(pred.device), self.normalise)
        return loss, {"loss": loss.item()}

    def on_step(self, step: int, row: dict[str, float]) -> None:
        """The loop's per-step callback: an E-step every `e_step_every` steps; its mean IoU
        against the ingest masks joins the step's row, so `train_log` charts EM."""
        if step % self.e_step_every == 0:
            row["mask_iou"] = self.e_step(len(self.history))

    @torch.no_grad()
    def e_step(self, iteration: int) -> float:
        """Re-estimate every mask; a concept whose refined mask comes out empty keeps its
        previous one (an empty mask would train nothing). Returns the mean IoU."""
        start = time.perf_counter()
        generator = torch.Generator(self.latents.device).manual_seed(self.seed * 7919 + iteration)
        new = self.masks.clone()
        for i, present in enumerate(self.present):
            prompt = composed_prompt([self.concepts.tokens[c] for c in present])
            embeds = self.concepts.embed([prompt])
            ids = self.concepts.tokenizer(prompt).input_ids
            positions = [ids.index(self.concepts.ids[c]) for c in present]
            maps = token_maps(self.unet, self.scheduler, self.latents[i:i + 1], embeds, positions, self.timesteps,
                              generator)
            tic = time.perf_counter()
            hard = refine(maps, self.photos[i], self.refiner)
            self.refine_seconds.append(time.perf_counter() - tic)
            for c, mask in zip(present, hard):
                if mask.any():
                    new[i, c, 0] = torch.from_numpy(mask).to(new)
        self.masks = new
        self.history.append(new > 0.5)
        self.e_step_seconds.append(time.perf_counter() - start)
        return float(np.mean([score for _, _, _, score in self.scores(len(self.history) - 1)]))

    def scores(self, iteration: int) -> list[tuple[int, int, np.ndarray, float]]:
        """(photo, concept, mask [H, W] bool, IoU against the ingest region) after E-step `iteration`."""
        return [(i, c, self.history[iteration][i, c, 0].cpu().numpy(),
                 iou(self.history[iteration][i, c, 0].cpu().numpy(), self.references[i, c, 0].cpu().numpy()))
                for i, present in enumerate(self.present) for c in present]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        lora = adapter_state(self.unet, self.adapter_name) if self.kv else {}
        return {**{f"lora.{k}": v for k, v in lora.items()}, **self._vectors(), "masks": self.masks.cpu(),
                "history": torch.stack(self.history).cpu()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.kv:
            load_adapter_state(self.unet, {k[5:]: v for k, v in state.items() if k.startswith("lora.")},
                               self.adapter_name)
        self.concepts.load_vectors({t: state[PREFIX + t] for t in self.concepts.tokens})
        self.masks = state["masks"].to(self.masks)
        self.history = list(state["history"].to(self.masks.device))

    def _vectors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + token: vector for token, vector in self.concepts.vectors().items()}

    def weights_bytes(self, initialisers: dict[str, str], sources: list[str]) -> bytes:
        """One safetensors file: the token vectors under `concepts.` and, when K/V trained,
        the LoRA under diffusers' own keys (so the file is also a LoRA diffusers loads)."""
        tensors = load(lora_file_bytes(self.unet, self.adapter_name)) if self.kv else {}
        tensors.update({k: v.contiguous() for k, v in self._vectors().items()})
        widths = self.concepts.widths  # recorded where a token spans more than one encoder (SDXL)
        return save(tensors, metadata={"format": "pt", "concepts.initialisers": json.dumps(initialisers),
                                       "concepts.sources": json.dumps(sources),
                                       **({"concepts.widths": json.dumps(widths)} if len(widths) > 1 else {})})


@dataclass
class ConceptWeights:
    initialisers: dict[str, str]  # token -> the words its row started from, in concept order
    tensors: dict[str, torch.Tensor]
    widths: list[int] | None = None  # SDXL: each token's columns per text encoder

    @classmethod
    def read(cls, path: Path) -> ConceptWeights:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata()
        widths = json.loads(meta["concepts.widths"]) if "concepts.widths" in meta else None
        return cls(json.loads(meta["concepts.initialisers"]), load(path.read_bytes()), widths)

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        return {token: self.tensors[PREFIX + token] for token in self.initialisers}

    @property
    def has_lora(self) -> bool:
        return any(not k.startswith(PREFIX) for k in self.tensors)

    @property
    def lora(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(PREFIX)}
