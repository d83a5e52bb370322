"""The one typed configuration object, read from `params.yaml` and the environment.

Precedence, lowest first: defaults here < `params.yaml` < environment variables
`SUBJECTFLOW_<SECTION>__<KEY>` (e.g. `SUBJECTFLOW_INGEST__RESOLUTION=256`) < explicit
overrides from the command line. Unknown keys are errors, so a typo in `params.yaml`
fails before any work starts instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "SUBJECTFLOW_"


class ConfigError(ValueError):
    """Configuration that cannot be used; the message says which key and how to fix it."""


def added(default: Any, neutral: Any, **constraints: Any) -> Any:
    """A setting added after artefacts were made: at `neutral` (how the code behaved
    before it existed) it is left out of `identity()`, so ids made before it stay valid."""
    return Field(default, json_schema_extra={"neutral": neutral}, **constraints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def identity(self, **dump: Any) -> dict[str, Any]:
        """The settings as artefact ids hash them: `model_dump(**dump)` without the added
        settings that sit at their neutral value (nested sections likewise)."""
        values = self.model_dump(**dump)
        for name, field in type(self).model_fields.items():
            if name not in values:
                continue
            value = getattr(self, name)
            if isinstance(value, _Section):
                values[name] = value.identity()
            elif "neutral" in (field.json_schema_extra or {}) and value == field.json_schema_extra["neutral"]:
                del values[name]
        return values


class MaskConfig(_Section):
    # "grabcut" needs no weights; "package.module:Factory" plugs in any segmenter.
    method: str = "grabcut"
    # GrabCut cost grows with pixels; 128 px keeps product silhouettes and is ~4x
    # cheaper than 256 (see bench/ingest.py).
    size: int = Field(128, ge=32, le=1024)
    iterations: int = Field(3, ge=1, le=20)


class IngestConfig(_Section):
    source: str = "photo_sets"
    resolution: int = Field(512, ge=32, le=4096)
    # crop: centre square crop (DreamBooth's choice); pad: letterbox, nothing cut off.
    fit: Literal["crop", "pad"] = "crop"
    thumbnail_size: int = Field(128, ge=16, le=1024)  # capped at `resolution`
    # Decoded pixels allowed per photo; Pillow's own bomb guard only trips at 2x its limit.
    max_pixels: int = Field(100_000_000, ge=1)
    max_file_mb: float = Field(64.0, gt=0)
    mask: MaskConfig = MaskConfig()
    # 0 means one worker per CPU core.
    workers: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)

    def normalise_settings(self) -> dict[str, Any]:
        """The settings a photo's derived files depend on; changing any re-derives them."""
        return {
            "resolution": self.resolution,
            "fit": self.fit,
            "thumbnail_size": self.thumbnail_side,
            "mask": self.mask.model_dump(),
        }

    @property
    def thumbnail_side(self) -> int:
        return min(self.thumbnail_size, self.resolution)

    def settings_hash(self) -> str:
        return stable_hash(self.normalise_settings())


class ModelConfig(_Section):
    # An embedded model built by the project ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"),
    # a local diffusers folder (SD 1.x/2.x, SDXL, SD3 or FLUX.1), or a hub id already in the
    # local Hugging Face cache: nothing is downloaded at run time.
    base: str = "tiny-sd"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | fp16 | bf16


# "auto" = the base model's native size (tiny-sd 64, SD 1.x 512, SD 2.x 768, SDXL, SD3 and FLUX 1024):
# its denoiser's sample_size times the VAE's downsampling, resolved once per run by
# `Config.at_native_resolution` so every artefact records the number it used.
Resolution = Literal["auto"] | Annotated[int, Field(ge=16, le=4096)]
AUTO = "auto"


class TrainConfig(_Section):
    """What every training run shares (the loop in subjectflow/training/loop.py)."""

    steps: int = Field(400, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    resolution: Resolution = AUTO
    learning_rate: float = Field(1e-4, gt=0)
    # "prodigy" (the SFO paper's) estimates the step size; every learning rate is then a multiplier, 1.0.
    # "adamw8bit" keeps AdamW's moments in 8 bits (bitsandbytes, CUDA only): for SDXL/SD3/FLUX on one GPU.
    optimizer: Literal["adamw", "sgd", "prodigy", "adamw8bit"] = "adamw"
    weight_decay: float = Field(1e-2, ge=0)
    lora_rank: int = Field(4, ge=1)
    max_grad_norm: float = added(1.0, neutral=0.0, ge=0)  # clip the gradients' norm to this; 0 = off
    warmup_steps: int = added(0, neutral=0, ge=0)  # linear learning-rate warm-up over the first steps
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0


class SftConfig(_Section):
    """DreamBooth-LoRA (METHODS.md: SFT is SFO's starting point)."""

    identifier: str = "sks"  # the rare token that names the subject
    prior_preservation: bool = False
    class_images: int = Field(100, ge=1)  # DreamBooth's default class-image count; sampled once per class
    prior_weight: float = Field(1.0, ge=0)


class SfoConfig(_Section):
    """Pairwise subject-fidelity optimisation (METHODS.md section 1)."""

    beta: float = Field(1000.0, gt=0)
    lora_rank: int = Field(16, ge=1)  # the paper's new rank-16 "SFO LoRA" on the frozen SFT one
    steps: int = Field(300, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int | None = added(4, neutral=None, ge=1)  # (photo, negative) pairs a step (paper: 4); None = train's


class NegativesConfig(_Section):
    """CDNS negatives: both conditions degraded (METHODS.md section 1)."""

    per_photo: int = Field(1, ge=1)
    radius_at_512: float = Field(5.0, ge=0)
    strength: float = Field(0.6, gt=0, le=1)
    steps: int = Field(28, ge=1)
    guidance: float = Field(3.5, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _denoises_at_least_once(self) -> "NegativesConfig":
        # img2img runs int(steps * strength) steps; zero fails deep inside diffusers.
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"steps x strength = {self.steps} x {self.strength} gives no img2img denoising step; "
                             f"raise negatives.steps to at least {int(1 / self.strength) + 1}")
        return self


class GenerateConfig(_Section):
    steps: int = Field(30, ge=1)
    guidance: float = Field(7.5, ge=0)
    resolution: Resolution = AUTO
    seed: int = 0
    # Methods that learn a photo's pose and background apart from the subject can keep one
    # training photo's (its image id, file name, or 1-based number in the set); "" = subject only.
    keep_pose: str = added("", neutral="")
    keep_background: str = added("", neutral="")

    @field_validator("keep_pose", "keep_background", mode="before")
    @classmethod
    def _a_photo_number_is_a_name(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # --set ...=2


class AugmentConfig(_Section):
    """Limits of the random augmentations that turn a few photos into many joint sets."""

    background: float = Field(0.5, ge=0, le=1)  # chance the background is replaced (via the mask)
    min_crop: float = Field(0.75, gt=0, le=1)  # smallest crop side, as a fraction of the photo
    # A product's colour and its printed labels are its identity: no mirroring, and colour
    # jitter near zero by default (lighting-like brightness/contrast only).
    flip: bool = False
    brightness: float = Field(0.05, ge=0, le=1)  # colour jitter: factor drawn from 1 +/- this
    contrast: float = Field(0.05, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)
    hue: float = Field(0.0, ge=0, le=0.5)  # fraction of the hue circle


class SyntheticSetsConfig(_Section):
    """Sets the base model draws itself: one collage of an object, split into its panels."""

    enabled: bool = False
    per_subject: int = Field(2, ge=0)
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0)
    min_coverage: float = Field(0.05, ge=0, le=1)  # a panel's mask must show an object
    min_similarity: float = Field(0.5, ge=0, le=1)  # colour-histogram intersection with the real photos


class JointSetsConfig(_Section):
    """Joint-image training sets for JeDi (METHODS.md section 2)."""

    set_size: int = Field(3, ge=2, le=8)
    sets_per_subject: int = Field(8, ge=1)
    resolution: Resolution = AUTO
    shard_rows: int = Field(512, ge=1)  # members per Parquet shard: the streaming unit
    subjects_per_task: int = Field(16, ge=1)  # under an engine: subjects a worker's task builds
    seed: int = 0
    augment: AugmentConfig = AugmentConfig()
    synthetic: SyntheticSetsConfig = SyntheticSetsConfig()


class JointConfig(_Section):
    """The JeDi joint-image model: training (on joint sets) and set-completion sampling."""

    enabled: bool = True  # train it in the `tune` stage and the refresh
    # Subjects the shared models (JeDi, zero-shot SFO) never train on, so scores on them are
    # zero-shot: names or ids, or a fraction drawn per subject (seeded by jointsets.seed).
    holdout: tuple[str, ...] | Annotated[float, Field(ge=0, le=1)] = added((), neutral=())
    weights: Literal["lora", "unet"] = "lora"
    lora_rank: int = Field(16, ge=1)
    steps: int = Field(1000, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    sets_per_step: int = Field(1, ge=1)
    # GPUs (one process each) the joint model trains on as one data-parallel job; each takes
    # its share of a step's train.gradient_accumulation micro-batches, so the model is the
    # same on any number (training/parallel.py). At most one per micro-batch.
    devices: int = Field(1, ge=1)
    # Trained as it is sampled (our choice, METHODS.md section 2): per set a random 1..N-1
    # members are clean known references with the loss on the rest; a noisy member's caption
    # is dropped, or a step trains single images with empty text, at these rates.
    known_references: bool = added(True, neutral=False)
    caption_dropout: float = added(0.1, neutral=0.0, ge=0, le=1)
    reference_dropout: float = added(0.1, neutral=0.0, ge=0, le=1)
    # Reference slots at sampling: "clean" keeps the reference latents at t=0 (as training
    # shows them); "noised" re-noises them to the current t (inpainting style).
    references: Literal["noised", "clean"] = "clean"
    max_references: int = Field(3, ge=1)
    image_guidance: float = Field(2.0, ge=0)  # s_I
    text_guidance: float = Field(7.5, ge=0)  # s_T
    # When changed sets retrain the joint model (JeDi personalises new subjects without
    # retraining): "any" change; a "fraction" of its sets changed (added, removed or
    # rebuilt) of at least retrain_fraction; or on a "schedule", once it is retrain_days old.
    retrain: Literal["any", "fraction", "schedule"] = "fraction"
    retrain_fraction: float = Field(0.1, gt=0, le=1)
    retrain_days: float = Field(7.0, gt=0)


class OneActorConfig(_Section):
    """OneActor: a projector from a subject's UNet features to a text offset, sampled with
    cluster-conditioned guidance (METHODS.md section 3). The UNet stays frozen."""

    steps: int = Field(200, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    aux_images: int = Field(10, ge=1)  # the auxiliary cluster: base-model samples of "a photo of {class}"
    cluster_steps: int = Field(30, ge=1)  # their sampling steps; features are taken at the last one
    aux_per_step: int = Field(3, ge=1)
    aux_weight: float = Field(0.5, ge=0)
    average_weight: float = Field(0.2, ge=0)
    # "paper": eta1 8.5, eta2 1.0, v 0.8 (Eq. 19); "released": 7.5 / 0 / 0.8, what the code does.
    preset: Literal["paper", "released"] = "paper"
    guided_steps: int = Field(20, ge=0)  # cluster guidance on the first steps, plain CFG after
    batch_stats: bool = False  # the release's train-mode BatchNorm at inference (delta depends on the batch)


class DetexConfig(_Section):
    """DETEX: one subject token plus per-photo pose and background embeddings from two
    mapper MLPs, trained with a K/V LoRA on a masked loss (METHODS.md section 4)."""

    steps: int = Field(400, ge=1)
    learning_rate: float = Field(5e-4, gt=0)  # the token and the mappers, textual inversion's scale
    # Custom Diffusion trains full K/V at 1e-5; a rank-r LoRA on them takes SFT's larger steps.
    kv_learning_rate: float = Field(1e-4, gt=0)
    kv_rank: int = Field(4, ge=1)
    mapper_hidden: int = Field(256, ge=1)
    feature_grid: int = Field(4, ge=1)  # the pooled VAE latent the mappers read: C x grid x grid
    # A DINO ViT (local folder, or hub id in the local cache) whose CLS embedding the mappers
    # read instead of the pooled VAE latent; "" = the VAE latent.
    image_encoder: str = added("", neutral="")
    mask_loss: Literal["area", "image"] = "area"  # normalise the masked loss by mask area, or by image
    prior_preservation: bool = False  # on the class images SFT's prior preservation caches
    prior_weight: float = Field(1.0, ge=0)


class ConceptsConfig(_Section):
    """Concept tokens and their masks learned by EM (METHODS.md section 5); which concepts
    a run learns is `subjectflow concepts learn NAME --from ...`, not configuration."""

    steps: int = Field(400, ge=1)
    learning_rate: float = Field(5e-4, gt=0)  # the token rows, Break-A-Scene's phase-1 rate
    kv: bool = False  # also a LoRA on the cross-attention K/V (off: tokens alone, composable)
    kv_learning_rate: float = Field(1e-4, gt=0)
    kv_rank: int = Field(4, ge=1)
    e_step_every: int = Field(100, ge=1)  # M-steps between E-steps
    # the noise levels whose attention each E-step averages (of the scheduler's 1000)
    e_step_timesteps: tuple[int, ...] = Field((200, 400, 600), min_length=1)
    refine: Literal["auto", "crf", "otsu"] = "auto"  # auto: the dense CRF when pydensecrf2 is installed
    init: Literal["ingest", "attention"] = "ingest"  # first masks: ingest's, or the base model's attention
    mask_loss: Literal["area", "image"] = "area"


class EvaluateConfig(_Section):
    """Scoring generated images the way the field does (DreamBench-style)."""

    methods: tuple[str, ...] = ("sft", "sfo", "jedi")
    prompts: int = Field(4, ge=1)  # how many prompt templates (the first N)
    # "" = the project's own templates; else a file of `{subject}` templates, one per line,
    # or DreamBench's prompts_and_classes.txt (what `subjectflow benchmark dreambench` sets).
    prompt_file: str = ""
    images_per_prompt: int = Field(2, ge=1)
    seed: int = 0
    # The published protocol these settings follow, recorded with every score; set by
    # `subjectflow benchmark`, "" = the project's own evaluation.
    protocol: str = added("", neutral="")
    # Local folders or hub ids already in the local cache; nothing is downloaded.
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "openai/clip-vit-base-patch32"
    # When a scoring model is not available: "random-test" scores with tiny random models
    # of the same classes (flagged everywhere, for testing only); "error" stops.
    fallback: Literal["random-test", "error"] = "random-test"
    proxy: bool = True  # also the weight-free masked colour/edge proxy, labelled as such
    # What masks generated images for MDINO/MCLIP-I: "" = ingest.mask.method, else a
    # weight-based segmenter as `package.module:factory` (ingest's plug-in form).
    masker: str = added("", neutral="")


class VersioningConfig(_Section):
    # Off only for callers that version themselves (e.g. `dvc repro` commits its own lock).
    enabled: bool = True
    push: bool = True


class ExecutionConfig(_Section):
    """Where tasks run. Nothing here shapes an artefact, so no id hashes it."""

    # local: the flow's own threads, one per device. dask / ray: a cluster's workers; model
    # tasks ask for one GPU (Dask's "GPU" worker resource, Ray's num_gpus), so the engine
    # places them. Dask is the one recommended (README, "Scaling").
    engine: Literal["local", "dask", "ray"] = "local"
    # A running cluster to attach to (Dask's tcp://host:8786, Ray's host:6379 or
    # ray://host:10001); "" = start a local cluster of `workers` workers for the command,
    # for trying the engine out.
    address: str = ""
    workers: int = Field(2, ge=1)
    worker_gpus: int = Field(1, ge=1)  # "GPU" resources each local worker advertises: its model slots
    # Where engine workers put the blobs and checkpoints they make: "" = the catalog folder,
    # which they then share writable with the flow; s3://bucket/prefix = that S3 prefix (the
    # flow copies a task's blobs into the catalog when it commits the task's rows), so the
    # workers need the catalog folder only to read, and a retry resumes a dead worker's run.
    blob_store: str = Field("", pattern=r"^(|s3://[^/]+(/.*)?)$")
    # Keep the base model loaded across a process's tasks (models/resident.py); off reloads per task.
    resident_models: bool = True
    thumbnails_per_task: int = Field(512, ge=1)  # dashboard thumbnails one engine task makes


class Config(_Section):
    ingest: IngestConfig = IngestConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sft: SftConfig = SftConfig()
    sfo: SfoConfig = SfoConfig()
    negatives: NegativesConfig = NegativesConfig()
    generate: GenerateConfig = GenerateConfig()
    jointsets: JointSetsConfig = JointSetsConfig()
    joint: JointConfig = JointConfig()
    oneactor: OneActorConfig = OneActorConfig()
    detex: DetexConfig = DetexConfig()
    concepts: ConceptsConfig = ConceptsConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    versioning: VersioningConfig = VersioningConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @model_validator(mode="after")
    def _prodigy_reads_learning_rates_as_multipliers(self) -> "Config":
        if self.train.optimizer != "prodigy":
            return self
        rates = {f"{name}.learning_rate": getattr(self, name).learning_rate for name in ("train", "sfo", "joint", "oneactor", "detex",
                                                                                     "concepts")}
        rates["detex.kv_learning_rate"] = self.detex.kv_learning_rate
        rates["concepts.kv_learning_rate"] = self.concepts.kv_learning_rate
        off = [f"{name} ({rate:g})" for name, rate in rates.items() if not 0.1 <= rate <= 10]
        if off:
            raise ValueError(f"train.optimizer prodigy estimates the step size itself and reads a learning rate as "
                             f"a multiplier on it: set {', '.join(off)} to 1.0")
        return self

    def digest(self) -> str:
        return stable_hash(self.model_dump())

    @property
    def resolves_resolution(self) -> bool:
        return AUTO in (self.train.resolution, self.generate.resolution, self.jointsets.resolution)

    def at_native_resolution(self, native: Callable[[], int]) -> Config:
        """This config with every "auto" resolution replaced by `native()`, the base
        model's size (called only when one is "auto"); explicit numbers stay."""
        if not self.resolves_resolution:
            return self
        size = native()
        return self.model_copy(update={
            name: section.model_copy(update={"resolution": size})
            for name, section in (("train", self.train), ("generate", self.generate), ("jointsets", self.jointsets))
            if section.resolution == AUTO})


def stable_hash(value: Any) -> str:
    """A short hash of JSON-able data, stable across processes (unlike `hash()`)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`SUBJECTFLOW_INGEST__MASK__SIZE=64` -> {"ingest": {"mask": {"size": "64"}}}."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw else raw
    return tree


def load_config(
    params_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    data: dict[str, Any] = {}
    if params_file is not None and params_file.exists():
        loaded = yaml.safe_load(params_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{params_file} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = _deep_merge(data, _env_overrides(os.environ if environ is None else environ))
    data = _deep_merge(data, overrides or {})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = f" (from {params_file} and SUBJECTFLOW_* variables)" if params_file else ""
        problems = "; ".join(
            ": ".join(filter(None, (".".join(str(p) for p in err["loc"]), err["msg"]))) for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration{where}: {problems}") from None
