"""The JeDi joint-image model (METHODS.md section 2): train it, find it, use it.

One model serves every subject: it is trained on the catalog's joint sets (standard
noise-prediction loss over every member of a set, self-attention coupled within the set)
and then personalises to any subject by set completion with the subject's photos as the
known members, with no per-subject training. Zero-shot SFO trains one more LoRA on top of
it from CDNS pairs of all subjects. Both are registered in the `models` table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load, save

from ..catalog import Catalog
from ..catalog.layout import WORK_DIR
from ..catalog.schemas import JOINTSETS, MODELS, NEGATIVES
from ..catalog.store import utcnow
from ..config import Config, stable_hash
from ..ingest.photo import encode_png
from ..jointsets import read_sets
from ..methods.jedi import complete_set, coupled
from ..methods.sfo import denoising_target, sft_loss
from ..models.loading import ModelParts
from .adapters import adapter_state, add_lora, load_adapter_state, load_lora_file, lora_file_bytes
from .data import encode_latents, encode_prompt, image_tensor
from .loop import train
from .objectives import Metrics, SfoObjective, _unet_eps
from .runs import (
    Subject, TuningError, autocast_dtype, file_latents, load_subjects, negative_id, planned_negatives,
    record_trained,
)

JEDI = "jedi"
SFO_JOINT = "sfo-joint"
JEDI_METHODS = ("jedi", "jedi-sfo")  # sampling methods: the joint model, and with its zero-shot SFO LoRA
# Not "sfo": diffusers filters its missing-key warnings by substring, and "sfo" is in "transformer".
SFO_ADAPTER = "sfo_joint"
NEGATIVE_GENERATOR = "jedi"


# -- identities ---------------------------------------------------------------------

def current_sets(catalog: Catalog, config: Config) -> list[dict]:
    """`jointsets` rows of the configured set size (one training run needs one layout)."""
    rows = [r for r in catalog.read(JOINTSETS.name).to_pylist() if r["set_size"] == config.jointsets.set_size]
    if not rows:
        raise TuningError(f"catalog {catalog.root} has no joint sets of size {config.jointsets.set_size}; "
                          f"build them with `subjectflow jointsets --catalog {catalog.root}`")
    return sorted(rows, key=lambda r: (r["set_id"], r["member"]))


def joint_params(config: Config, base: str) -> dict:
    joint = config.joint.model_dump(include={"weights", "lora_rank", "steps", "learning_rate", "sets_per_step"})
    return {"method": JEDI, "base": base, "joint": joint, "train": config.train.model_dump()}


def joint_model_id(catalog: Catalog, config: Config, base: str) -> str:
    """The id the joint model would have if trained now on the current joint sets."""
    set_ids = sorted({r["set_id"] for r in current_sets(catalog, config)})
    return stable_hash([joint_params(config, base), set_ids])


def find_model(catalog: Catalog, model_id: str) -> dict | None:
    return next((r for r in catalog.read(MODELS.name).to_pylist() if r["model_id"] == model_id), None)


def current_joint_model(catalog: Catalog, config: Config, base: str) -> dict:
    row = find_model(catalog, joint_model_id(catalog, config, base))
    if row is None:
        raise TuningError(f"no current JeDi model for these joint sets and settings; train it with "
                          f"`subjectflow train-joint --catalog {catalog.root}`")
    return row


def install_joint_model(catalog: Catalog, parts: ModelParts, row: dict) -> list[str]:
    """Put the joint model's weights into `parts.unet`; returns the adapter names it added."""
    path = catalog.blob_path(row["file"])
    if row["weights"] == "lora":
        load_lora_file(parts.unet, path, JEDI)
        return [JEDI]
    state = load(path.read_bytes())
    parts.unet.load_state_dict({k: v.to(parts.unet.dtype) for k, v in state.items()})
    return []


# -- training -----------------------------------------------------------------------

@dataclass
class JointObjective:
    """Noise prediction over whole sets: each set gets one t (the set is denoised jointly)
    and its own noise per member; the loss averages over every member."""

    unet: torch.nn.Module  # coupled with set size = members per set
    scheduler: object
    set_latents: torch.Tensor  # [S, N, C, h, w]
    captions: torch.Tensor  # [U, L, D] each distinct caption's text embedding
    set_captions: torch.Tensor  # [S, N] each member's caption, an index into `captions`
    trainable: list[torch.nn.Parameter]
    sets_per_step: int = 1
    adapter_name: str | None = JEDI  # None: the full UNet trains
    _dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self._dtype = next(self.unet.parameters()).dtype

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.trainable

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, Metrics]:
        sets, members = self.set_latents.shape[:2]
        index = torch.randint(0, sets, (self.sets_per_step,), generator=generator, device=generator.device)
        index = index.to(self.set_latents.device)
        x0 = self.set_latents[index].flatten(0, 1)  # [B*N, C, h, w], sets consecutive
        embeds = self.captions[self.set_captions[index].flatten(0, 1)]  # [B*N, L, D]
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        steps = int(self.scheduler.config.num_train_timesteps)
        t = torch.randint(0, steps, (self.sets_per_step,), generator=generator, device=generator.device)
        t = t.to(x0.device).repeat_interleave(members)
        pred = _unet_eps(self.unet, self._dtype, self.scheduler.add_noise(x0, noise, t), t, embeds)
        return sft_loss(pred, denoising_target(self.scheduler, x0, noise, t))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        if self.adapter_name is None:
            return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        return adapter_state(self.unet, self.adapter_name)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.adapter_name is None:
            self.unet.load_state_dict(state)
        else:
            load_adapter_state(self.unet, state, self.adapter_name)


def _embed_all(parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
    """Each distinct caption's [L, D] text embedding, computed once."""
    return {c: encode_prompt(parts.tokenizer, parts.text_encoder, c)[0] for c in sorted(set(captions))}


def encode_sets(catalog: Catalog, parts: ModelParts, rows: list[dict],
                resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stream the sets from their shards into latents [S, N, C, h, w], the distinct
    captions' embeddings [U, L, D] and each member's caption index [S, N].

    Embeddings are kept once per caption, not per member: a subject's sets share a few
    captions, and [S, N, 77, 768] floats would be GBs at a thousand subjects.
    """
    sets = list(read_sets(catalog, sorted({r["shard"] for r in rows}), {r["set_id"] for r in rows}))
    sets.sort(key=lambda s: s.set_id)
    embedded = _embed_all(parts, [c for s in sets for c in s.captions])
    position = {caption: i for i, caption in enumerate(embedded)}
    captions = torch.stack(list(embedded.values()))
    set_captions = torch.tensor([[position[c] for c in s.captions] for s in sets])
    latents = torch.stack([encode_latents(parts.vae, torch.stack([image_tensor(im, resolution) for im in s.images]))
                           for s in sets])
    device = parts.unet.device
    return latents.to(device), captions.to(device), set_captions.to(device)


def train_joint(catalog: Catalog, config: Config, parts: ModelParts, base: str,
                stop_after: int | None = None) -> dict:
    """Train (or resume) the joint model on the current joint sets and register it."""
    rows = current_sets(catalog, config)
    model_id = joint_model_id(catalog, config, base)
    cfg = config.joint
    latents, captions, set_captions = encode_sets(catalog, parts, rows, config.train.resolution)
    if config.train.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    parts.unet.train()
    if cfg.weights == "lora":
        trainable = add_lora(parts.unet, cfg.lora_rank, JEDI, config.train.seed)
    else:
        parts.unet.requires_grad_(True)
        trainable = list(parts.unet.parameters())
    objective = JointObjective(parts.unet, parts.noise_scheduler, latents, captions, set_captions, trainable,
                               cfg.sets_per_step, JEDI if cfg.weights == "lora" else None)
    with coupled(parts.unet, config.jointsets.set_size):
        result = train(objective, config.train, catalog.root / WORK_DIR / "joint" / model_id, cfg.steps,
                       cfg.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after)
    parts.unet.eval()
    if stop_after is not None and stop_after < cfg.steps:
        return {"model_id": model_id, "interrupted_at": stop_after}
    file_bytes = (lora_file_bytes(parts.unet, JEDI) if cfg.weights == "lora"
                  else save({k: v.contiguous() for k, v in parts.unet.state_dict().items()}))
    row = {"model_id": model_id, "method": JEDI, "weights": cfg.weights, "base_model": base,
           "parent_model_id": None, "params": json.dumps(joint_params(config, base), sort_keys=True),
           "inputs_hash": stable_hash(sorted({r["set_id"] for r in rows})), "steps": result.steps,
           "final_loss": result.final_loss}
    return record_trained(catalog, MODELS, "models", row, result.history, file_bytes)


# -- set completion -----------------------------------------------------------------

@dataclass(frozen=True)
class Completion:
    """How a JeDi image was made: recorded with every sample and negative."""

    references: tuple[str, ...]  # image ids (or files) of the known members
    reference_mode: str
    image_guidance: float
    text_guidance: float
    steps: int
    seed: int

    def as_record(self) -> dict:
        return {"references": list(self.references), "reference_mode": self.reference_mode,
                "image_guidance": self.image_guidance, "text_guidance": self.text_guidance,
                "steps": self.steps, "seed": self.seed}


def complete(parts: ModelParts, reference_images: list[Image.Image], reference_caption: str, prompt: str,
             completion: Completion, resolution: int) -> Image.Image:
    """One new image of the set whose known members are `reference_images`."""
    device = parts.unet.device
    pixels = torch.stack([image_tensor(im, resolution) for im in reference_images])
    references = encode_latents(parts.vae, pixels).to(device)
    caption = encode_prompt(parts.tokenizer, parts.text_encoder, reference_caption)
    latents = complete_set(
        parts.unet, DDIMScheduler.from_config(parts.noise_scheduler.config), references,
        caption.expand(len(reference_images), -1, -1), encode_prompt(parts.tokenizer, parts.text_encoder, prompt),
        encode_prompt(parts.tokenizer, parts.text_encoder, ""), 1, completion.steps, completion.image_guidance,
        completion.text_guidance, completion.reference_mode, torch.Generator("cpu").manual_seed(completion.seed))
    vae_dtype = next(parts.vae.parameters()).dtype
    image = parts.vae.decode(latents.to(vae_dtype) / parts.vae.config.scaling_factor).sample
    array = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def reference_caption(subject: Subject) -> str:
    return f"a photo of a {subject.class_name}"


# -- CDNS with the joint model --------------------------------------------------------

def make_jedi_negatives(catalog: Catalog, subject: Subject, config: Config, parts: ModelParts, base: str,
                        model: dict) -> list[dict]:
    """METHODS.md section 1 with JeDi as the generator: each negative completes a set whose
    one known member is the blurred photo, under the generic prompt. Existing ones are reused."""
    existing = {r["negative_id"]: r for r in catalog.read(NEGATIVES.name).to_pylist()}
    planned = _jedi_negative_plan(subject, config, base, model)
    todo = [p for p in planned if p[0] not in existing]
    if todo:
        names = install_joint_model(catalog, parts, model)
        rows = []
        try:
            for nid, image, degradation in todo:
                with Image.open(catalog.blob_path(image["normalised_file"])) as photo:
                    blurred = degradation.degrade(photo.convert("RGB"))
                completion = Completion((image["image_id"],), config.joint.references, config.joint.image_guidance,
                                        degradation.guidance, degradation.steps, degradation.seed)
                out = complete(parts, [blurred], reference_caption(subject), degradation.generic_prompt,
                               completion, config.train.resolution)
                rows.append({"negative_id": nid, "image_id": image["image_id"], "subject_id": subject.subject_id,
                             "file": catalog.put_blob("negatives", encode_png(out), ".png"), "generator": NEGATIVE_GENERATOR,
                             "generator_adapter_id": model["model_id"], "base_model": base,
                             "prompt": degradation.generic_prompt, "blur_radius": degradation.blur_radius,
                             # Set completion starts from pure noise: strength 1 in img2img terms.
                             "strength": 1.0, "steps": degradation.steps, "guidance": degradation.guidance,
                             "seed": degradation.seed, "resolution": config.train.resolution, "created_at": utcnow()})
        finally:
            if names:
                parts.unet.delete_adapters(names)
        with catalog.writer():
            catalog.upsert(NEGATIVES.name, pa.Table.from_pylist(rows, schema=NEGATIVES.schema))
        existing.update({r["negative_id"]: r for r in rows})
    return [existing[nid] for nid, _, _ in planned]


# -- zero-shot SFO on the joint model ---------------------------------------------------

def sfo_joint_params(config: Config, base: str, parent: str) -> dict:
    return {"method": SFO_JOINT, "base": base, "parent": parent, "sfo": config.sfo.model_dump(),
            "negatives": config.negatives.model_dump(), "train": config.train.model_dump()}


def _jedi_negative_plan(subject: Subject, config: Config, base: str, model: dict) -> list:
    return [(negative_id(image["image_id"], d, NEGATIVE_GENERATOR, model["model_id"], base), image, d)
            for _, image, d in planned_negatives(subject, config, model["model_id"], base)]


def sfo_joint_negative_ids(catalog: Catalog, config: Config, base: str, model: dict) -> list[str]:
    """The JeDi negatives zero-shot SFO trains on: every subject's, planned (none is made)."""
    return [nid for subject in load_subjects(catalog) for nid, _, _ in _jedi_negative_plan(subject, config, base, model)]


def current_sfo_joint_model(catalog: Catalog, config: Config, base: str, model: dict) -> dict:
    params = sfo_joint_params(config, base, model["model_id"])
    row = find_model(catalog, stable_hash([params, sorted(sfo_joint_negative_ids(catalog, config, base, model))]))
    if row is None:
        raise TuningError(f"no current zero-shot SFO model on the joint model; train it with "
                          f"`subjectflow tune --method sfo --target joint --catalog {catalog.root}`")
    return row


def train_sfo_joint(catalog: Catalog, config: Config, parts: ModelParts, base: str, model: dict,
                    say: Callable[[str], None] = print, stop_after: int | None = None) -> dict:
    """One SFO LoRA on the (LoRA) joint model from the CDNS pairs of every subject: each pair
    is scored as the unknown member of a set of two whose known member is another photo of
    the same subject, so the LoRA learns fidelity to references rather than to one subject."""
    if model["weights"] != "lora":
        raise TuningError("zero-shot SFO needs a LoRA joint model (joint.weights: lora) as its frozen reference")
    positives, negatives, contexts, captions, negative_ids = [], [], [], [], []
    for subject in load_subjects(catalog):
        made = make_jedi_negatives(catalog, subject, config, parts, base, model)
        files = {r["image_id"]: r["normalised_file"] for r in subject.images}
        order = [r["image_id"] for r in subject.images]
        for negative in made:
            other = order[(order.index(negative["image_id"]) + 1) % len(order)]  # itself when the only photo
            positives.append(files[negative["image_id"]])
            negatives.append(negative["file"])
            contexts.append(files[other])
            captions.append(reference_caption(subject))
            negative_ids.append(negative["negative_id"])
        say(f"{subject.name}: {len(made)} CDNS pairs from the joint model")
    params = sfo_joint_params(config, base, model["model_id"])
    model_id = stable_hash([params, sorted(negative_ids)])
    found = find_model(catalog, model_id)
    if found is not None:
        return found
    resolution = config.train.resolution
    embeds = _embed_all(parts, captions)
    load_lora_file(parts.unet, catalog.blob_path(model["file"]), JEDI)
    trainable = add_lora(parts.unet, config.sfo.lora_rank, SFO_ADAPTER, config.train.seed)
    try:
        objective = SfoObjective(parts.unet, parts.noise_scheduler, file_latents(parts, catalog, positives, resolution),
                                 file_latents(parts, catalog, negatives, resolution),
                                 torch.stack([embeds[c] for c in captions]).to(parts.unet.device), trainable,
                                 config.sfo.beta, config.train.batch_size, reference=JEDI, adapter_name=SFO_ADAPTER,
                                 context_latents=file_latents(parts, catalog, contexts, resolution))
        with coupled(parts.unet, 2):
            result = train(objective, config.train, catalog.root / WORK_DIR / "joint" / model_id, config.sfo.steps,
                           config.sfo.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after)
        if stop_after is not None and stop_after < config.sfo.steps:
            return {"model_id": model_id, "interrupted_at": stop_after}
        row = {"model_id": model_id, "method": SFO_JOINT, "weights": "lora", "base_model": base,
               "parent_model_id": model["model_id"], "params": json.dumps(params, sort_keys=True),
               "inputs_hash": stable_hash(sorted(negative_ids)), "steps": result.steps,
               "final_loss": result.final_loss}
        return record_trained(catalog, MODELS, "models", row, result.history, lora_file_bytes(parts.unet, SFO_ADAPTER))
    finally:
        parts.unet.delete_adapters([SFO_ADAPTER, JEDI])
