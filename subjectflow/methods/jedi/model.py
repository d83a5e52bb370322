"""The JeDi joint-image model (METHODS.md section 2): its identity and its training.

One model serves every subject: it is trained on the catalog's joint sets (standard
noise-prediction loss over every member of a set, self-attention coupled within the set).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

from ...catalog import Catalog
from ...catalog.blobstore import BlobStore
from ...catalog.layout import MODELS_DIR
from ...catalog.schemas import JOINTSETS, MODELS
from ...config import Config, stable_hash
from ...models.families import Prompt
from ...models.loading import ModelParts, load_components, resolve_device
from ...training.adapters import adapter_state, add_lora, load_adapter_state, load_lora_file, lora_file_bytes
from ...training.artefacts import autocast_dtype, find_row, record_trained
from ...training.diffusion import Metrics, denoising_loss, denoising_target, noised, training_timesteps, unet_eps
from ...training.loop import TrainResult, train
from ...training.parallel import SINGLE, Ranks, devices_for, run_ranks
from ...training.subjects import TuningError, training_subjects
from ..base import Context
from .attention import CoupledSelfAttnProcessor, coupled
from .retrain import SetMembers, kept_model, trained_sets
from .set_latents import CachedSetLatents, encode_sets

JEDI = "jedi"
RANK_RESULT = "rank-result.pt"  # a data-parallel job's leader leaves its result here


def current_sets(catalog: Catalog, config: Config) -> list[dict]:
    """`jointsets` rows of the configured set size (one training run needs one layout), of
    the subjects not held out (`joint.holdout`)."""
    rows = [r for r in catalog.read(JOINTSETS.name).to_pylist() if r["set_size"] == config.jointsets.set_size]
    if config.joint.holdout:
        training = {s.subject_id for s in training_subjects(catalog, config)}
        rows = [r for r in rows if r["subject_id"] in training]
    if not rows:
        held = f" outside joint.holdout ({config.joint.holdout})" if config.joint.holdout else ""
        raise TuningError(f"catalog {catalog.root} has no joint sets of size {config.jointsets.set_size}{held}; "
                          f"build them with `subjectflow jointsets --catalog {catalog.root}`")
    return sorted(rows, key=lambda r: (r["set_id"], r["member"]))


# The joint settings that shape training (the rest shape sampling); `holdout` is the split
# rule, recorded with the model although its sets already differ.
TRAINING_SETTINGS = ("weights", "lora_rank", "steps", "learning_rate", "sets_per_step", "holdout",
                     "known_references", "caption_dropout", "reference_dropout")


def joint_params(config: Config, base: str) -> dict:
    joint = {k: v for k, v in config.joint.identity().items() if k in TRAINING_SETTINGS}
    return {"method": JEDI, "base": base, "joint": joint, "train": config.train.identity()}


def joint_model_id(config: Config, base: str, rows: list[dict]) -> str:
    """The id the joint model has when trained on the joint sets `rows` (`current_sets`)."""
    return stable_hash([joint_params(config, base), sorted({r["set_id"] for r in rows})])


def current_model_id(catalog: Catalog, config: Config, base: str) -> str:
    """The joint model to use now: the one for exactly the current sets when it exists, else
    the newest one `joint.retrain` keeps, else the one to train."""
    rows = current_sets(catalog, config)
    fresh = joint_model_id(config, base, rows)
    if find_row(catalog, MODELS, fresh) is not None:
        return fresh
    kept = kept_model(catalog, config.joint, JEDI, joint_params(config, base), set_members(rows))
    return kept["model_id"] if kept else fresh


def set_members(rows: list[dict]) -> SetMembers:
    return {r["set_id"]: r["subject_id"] for r in rows}


def model_subjects(catalog: Catalog, config: Config, row: dict | None) -> set[str]:
    """Who a joint model trained on: its recorded sets, else (an older row, or none yet)
    the current sets'."""
    members = trained_sets(catalog, row) if row is not None else None
    return set((members or set_members(current_sets(catalog, config))).values())


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
    """Noise prediction over whole sets, shown the conditions set completion samples under
    (METHODS.md section 2; the rates are our choice, recorded in the model's params):
    - per set, a random 1..N-1 members are known references, kept clean (timestep 0, as
      `joint.references: clean` samples them), and the loss is on the other, noisy members;
    - a noisy member's caption is dropped for the empty prompt with `caption_dropout`,
      which trains e(z, refs, ∅);
    - with `reference_dropout` a step trains single images with empty text instead, each set
      reduced to one member alone: e(z, ∅, ∅).
    All off, every member is noisy at the set's t and scored (the model before these settings).
    """

    unet: torch.nn.Module  # coupled with set size = members per set
    scheduler: object
    set_latents: torch.Tensor | CachedSetLatents  # [S, N, C, h, w]
    captions: Prompt | torch.Tensor  # batch U: each distinct caption, encoded (and the empty prompt)
    set_captions: torch.Tensor  # [S, N] each member's caption, an index into `captions`
    trainable: list[torch.nn.Parameter]
    sets_per_step: int = 1
    adapter_name: str | None = JEDI  # None: the full UNet trains
    null_caption: int = 0  # the index of the empty prompt in `captions`
    known_references: bool = False
    caption_dropout: float = 0.0
    reference_dropout: float = 0.0
    processor: CoupledSelfAttnProcessor | None = None  # the UNet's coupling, for sets reduced to one image
    _dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self.captions = Prompt.of(self.captions)
        self._dtype = next(self.unet.parameters()).dtype

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.trainable

    @contextlib.contextmanager
    def _sets_of(self, size: int) -> Iterator[None]:
        """The coupling's set size for one call (1 for the single images of reference dropout)."""
        if self.processor is None:
            yield
            return
        previous, self.processor.set_size = self.processor.set_size, size
        try:
            yield
        finally:
            self.processor.set_size = previous

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(self.set_latents.device)

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, Metrics]:
        sets, members = self.set_latents.shape[:2]
        b = self.sets_per_step
        index = torch.randint(0, sets, (b,), generator=generator, device=generator.device).to(self.set_latents.device)
        x0 = self.set_latents[index]  # [B, N, C, h, w]
        caption = self.set_captions[index]  # [B, N]
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        t = training_timesteps(self.scheduler, b, generator).to(x0.device)[:, None].expand(b, members)
        alone = self.reference_dropout > 0 and self._draw((1,), generator).item() < self.reference_dropout
        if alone:  # one member per set, by itself, under the empty prompt
            pick = torch.randint(0, members, (b,), generator=generator, device=generator.device).to(x0.device)
            rows = torch.arange(b, device=x0.device)
            x0, noise, t = x0[rows, pick, None], noise[rows, pick, None], t[:, :1]
            caption = torch.full((b, 1), self.null_caption, device=x0.device)
            known = torch.zeros((b, 1), dtype=torch.bool, device=x0.device)
        else:
            known = torch.zeros((b, members), dtype=torch.bool, device=x0.device)
            if self.known_references:  # k in 1..N-1 known members, at random places in the set
                k = torch.randint(1, members, (b, 1), generator=generator, device=generator.device).to(x0.device)
                known = self._draw((b, members), generator).argsort(dim=1).argsort(dim=1) < k
            if self.caption_dropout > 0:
                dropped = (self._draw((b, members), generator) < self.caption_dropout) & ~known
                caption = torch.where(dropped, torch.full_like(caption, self.null_caption), caption)
            t = torch.where(known, torch.zeros_like(t), t)
        x0, noise, t, known = x0.flatten(0, 1), noise.flatten(0, 1), t.flatten(), known.flatten()  # sets consecutive
        mask = known.view(-1, *([1] * (x0.ndim - 1)))
        noisy = torch.where(mask, x0, noised(self.scheduler, x0, noise, t))  # known members exactly clean
        with self._sets_of(x0.shape[0] // b):
            pred = unet_eps(self.unet, self._dtype, noisy, t, self.captions.at(caption.flatten()))
        scored = (~known).float()
        return denoising_loss(pred, denoising_target(self.scheduler, x0, noise, t), weights=scored * len(scored) / scored.sum())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        if self.adapter_name is None:
            return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        return adapter_state(self.unet, self.adapter_name)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.adapter_name is None:
            self.unet.load_state_dict(state)
        else:
            load_adapter_state(self.unet, state, self.adapter_name)


def train_joint(ctx: Context, stop_after: int | None = None) -> dict:
    """Train (or resume) the joint model on the current joint sets and register it: in this
    process, or over `joint.devices` GPUs as one data-parallel job (training/parallel.py)."""
    catalog, config, base = ctx.catalog, ctx.config, ctx.base
    rows = current_sets(catalog, config)
    model_id = joint_model_id(config, base, rows)
    work_dir = catalog.work_dir("joint", model_id)
    world = devices_for(config.joint.devices, config.train.gradient_accumulation)
    if world == 1:
        result, file_bytes = _fit(catalog, config, ctx.parts, base, rows, work_dir, stop_after)
    else:
        encode_sets(catalog, ctx.parts, rows, config.train.resolution, base)  # the ranks read the latent cache
        ctx.say(f"joint model {model_id}: {world} ranks, {config.train.gradient_accumulation} micro-batches a step")
        store = {"uri": catalog.store.uri, "cache": str(catalog.cache)} if catalog.store else None
        run_ranks(f"{__name__}:fit_on_rank", {"catalog": str(catalog.root), "config": config.model_dump(mode="json"),
                                              "base": base, "stop_after": stop_after, "work_dir": str(work_dir),
                                              "store": store}, world, work_dir, ctx.say)
        handed = torch.load(work_dir / RANK_RESULT, weights_only=False)
        result, file_bytes = handed["result"], handed["file_bytes"]
    if stop_after is not None and stop_after < config.joint.steps:
        return {"model_id": model_id, "interrupted_at": stop_after}
    sets = json.dumps(set_members(rows), sort_keys=True).encode()
    cfg = config.joint
    policy = {"retrain": cfg.retrain, "retrain_fraction": cfg.retrain_fraction, "retrain_days": cfg.retrain_days}
    row = {"model_id": model_id, "method": JEDI, "weights": cfg.weights, "base_model": base,
           "parent_model_id": None, "sets_file": catalog.put_blob("models", sets, ".json"),
           "params": json.dumps({**joint_params(config, base), "retrain": policy}, sort_keys=True),
           "inputs_hash": stable_hash(sorted({r["set_id"] for r in rows})), "steps": result.steps,
           "final_loss": result.final_loss}
    return record_trained(catalog, MODELS, "models", row, result.history, file_bytes)


def fit_on_rank(spec: dict, ranks: Ranks) -> None:
    """One rank of a data-parallel joint job: its own copy of the base model on its device;
    the leader leaves the result for `train_joint`."""
    catalog, config = Catalog.open(Path(spec["catalog"])), Config.model_validate(spec["config"])
    if spec["store"]:  # the worker's store and cache: its latent cache and checkpoints are there
        catalog = catalog.staging(BlobStore(spec["store"]["uri"]), Path(spec["store"]["cache"]))
    device, dtype = resolve_device(config.model.device, config.model.precision)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    parts = load_components(config.model.base, catalog.root / MODELS_DIR, device, dtype)
    rows = current_sets(catalog, config)
    work_dir = Path(spec["work_dir"])
    result, file_bytes = _fit(catalog, config, parts, spec["base"], rows, work_dir, spec["stop_after"], ranks)
    if ranks.leader:
        torch.save({"result": result, "file_bytes": file_bytes}, work_dir / RANK_RESULT)


def _fit(catalog: Catalog, config: Config, parts: ModelParts, base: str, rows: list[dict], work_dir: Path,
         stop_after: int | None, ranks: Ranks = SINGLE) -> tuple[TrainResult, bytes | None]:
    """The joint objective trained on `parts`: (the loop's result, the model file's bytes,
    None when stopped early)."""
    cfg = config.joint
    encoded = encode_sets(catalog, parts, rows, config.train.resolution, base)
    if config.train.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    parts.unet.train()
    autocast = autocast_dtype(parts)
    if cfg.weights == "lora":
        trainable = add_lora(parts.unet, cfg.lora_rank, JEDI, config.train.seed)
    else:
        # Master weights in fp32 under bf16/fp16 autocast: AdamW steps on bf16 weights
        # mostly round away. The UNet goes back to its dtype once trained.
        parts.unet.float().requires_grad_(True)
        trainable = list(parts.unet.parameters())
    objective = JointObjective(parts.unet, parts.noise_scheduler, encoded.latents, encoded.captions,
                               encoded.set_captions, trainable, cfg.sets_per_step, JEDI if cfg.weights == "lora" else None,
                               null_caption=encoded.null_caption, known_references=cfg.known_references,
                               caption_dropout=cfg.caption_dropout, reference_dropout=cfg.reference_dropout)
    try:
        with coupled(parts.unet, config.jointsets.set_size) as objective.processor:
            result = train(objective, config.train, work_dir, cfg.steps, cfg.learning_rate, autocast,
                           parts.unet.device, stop_after, ranks=ranks, on_checkpoint=catalog.keep_work)
        if stop_after is not None and stop_after < cfg.steps:
            return result, None
        file_bytes = (lora_file_bytes(parts.unet, JEDI) if cfg.weights == "lora"
                      else save({k: v.contiguous() for k, v in parts.unet.state_dict().items()}))
    finally:
        parts.unet.eval()
        if cfg.weights == "lora":  # saved above: the next user of the model (jedi-sfo, sampling) loads it anew
            parts.unet.delete_adapters(JEDI)
        if cfg.weights == "unet" and autocast is not None:
            parts.unet.to(autocast)
    return result, file_bytes
