"""Every catalog table's explicit pyarrow schema, each stamped with its schema version.

A table name is defined here once; paths, DVC stage outputs and readers all derive
from `TABLES`. Bump a table's version whenever its columns change meaning or type.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")
VERSION_KEY = b"subjectflow.schema_version"
NAME_KEY = b"subjectflow.table"


@dataclass(frozen=True)
class TableSpec:
    name: str
    version: int
    key: tuple[str, ...]  # columns that identify a row; upserts replace on these
    fields: tuple[pa.Field, ...]
    # Nullable columns added after version 1, with the version that added them: a table
    # written by an older release reads with these as nulls, so catalogs upgrade in place.
    added: tuple[tuple[str, int], ...] = ()
    # A table that grows with the catalog is stored in partitions by this column (tables.py).
    # Every row of one key has the same value of it (ids hash their subject's inputs), and
    # one task's rows share it, so a commit rewrites only the partitions its tasks touched.
    partition_by: str | None = None

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            list(self.fields),
            metadata={VERSION_KEY: str(self.version).encode(), NAME_KEY: self.name.encode()},
        )


SUBJECTS = TableSpec(
    "subjects",
    version=1,
    key=("subject_id",),
    fields=(
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ),
)

IMAGES = TableSpec(
    "images",
    version=1,
    partition_by="subject_id",
    key=("image_id",),
    fields=(
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the original bytes
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),  # after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),
        pa.field("photo_file", pa.string(), nullable=False),  # original bytes, untouched
        pa.field("normalised_file", pa.string(), nullable=False),
        pa.field("mask_file", pa.string(), nullable=False),
        pa.field("thumbnail_file", pa.string(), nullable=False),
        pa.field("resolution", pa.int32(), nullable=False),
        pa.field("fit", pa.string(), nullable=False),
        # Region of the oriented original mapped onto the square training copy, as
        # (left, top, right, bottom) pixels; it reaches outside the photo when padded.
        pa.field("box", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("mask_method", pa.string(), nullable=False),
        pa.field("mask_coverage", pa.float32(), nullable=False),
        pa.field("ingested_at", TIMESTAMP, nullable=False),
    ),
)

QUARANTINE = TableSpec(
    "quarantine",
    version=1,
    key=("source_uri", "fingerprint"),
    fields=(
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=True),  # null when the bytes were unreadable
        pa.field("size_bytes", pa.int64(), nullable=True),
        pa.field("detected_at", TIMESTAMP, nullable=False),
    ),
)

# The ingest ledger: what became of every source file, so an unchanged source is
# recognised from its listing alone (size + mtime/ETag) without reading a byte.
SOURCE_FILES = TableSpec(
    "source_files",
    version=1,
    key=("source_uri",),
    fields=(
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("settings", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # ingested | duplicate | quarantined
        pa.field("detail", pa.string(), nullable=True),
        pa.field("sha256", pa.string(), nullable=True),
        pa.field("image_id", pa.string(), nullable=True),
        pa.field("seen_at", TIMESTAMP, nullable=False),
    ),
)

# A CDNS negative: made by the model itself from a degraded reference and a generic
# prompt (METHODS.md section 1). Every parameter needed to make it again is recorded.
NEGATIVES = TableSpec(
    "negatives",
    version=1,
    partition_by="subject_id",
    key=("negative_id",),
    fields=(
        pa.field("negative_id", pa.string(), nullable=False),  # hash of everything below but file
        pa.field("image_id", pa.string(), nullable=False),  # the positive it was made from
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("generator", pa.string(), nullable=False),  # e.g. "sft-img2img"
        pa.field("generator_adapter_id", pa.string(), nullable=True),
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("blur_radius", pa.float32(), nullable=False),
        pa.field("strength", pa.float32(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("guidance", pa.float32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("resolution", pa.int32(), nullable=False),
        pa.field("created_at", TIMESTAMP, nullable=False),
    ),
)

ADAPTERS = TableSpec(
    "adapters",
    version=1,
    partition_by="subject_id",
    key=("adapter_id",),
    fields=(
        pa.field("adapter_id", pa.string(), nullable=False),  # hash of method, subject, params, inputs
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("parent_adapter_id", pa.string(), nullable=True),  # SFO trains on top of an SFT adapter
        pa.field("file", pa.string(), nullable=False),  # diffusers LoRA safetensors
        pa.field("params", pa.string(), nullable=False),  # JSON of every setting that shaped it
        pa.field("inputs_hash", pa.string(), nullable=False),  # photos (and negatives) it saw
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("final_loss", pa.float64(), nullable=False),
        pa.field("trained_on_version", pa.int32(), nullable=True),  # catalog version of its data
        pa.field("created_at", TIMESTAMP, nullable=False),
    ),
)

# Long format (one metric value per row) so any dashboard can plot any metric.
TRAIN_LOG = TableSpec(
    "train_log",
    version=1,
    partition_by="adapter_id",
    key=("adapter_id", "step", "metric"),
    fields=(
        pa.field("adapter_id", pa.string(), nullable=False),  # an adapter_id, or a `models` model_id
        pa.field("step", pa.int32(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ),
)

SAMPLES = TableSpec(
    "samples",
    version=2,
    partition_by="subject_id",
    key=("sample_id",),
    fields=(
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.string(), nullable=True),
        pa.field("adapter_id", pa.string(), nullable=True),
        pa.field("method", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("guidance", pa.float32(), nullable=False),
        pa.field("resolution", pa.int32(), nullable=False),
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("created_at", TIMESTAMP, nullable=False),
        pa.field("model_id", pa.string(), nullable=True),  # a `models` row (JeDi) that generated it
        pa.field("params", pa.string(), nullable=True),  # JSON of method-specific settings
    ),
    added=(("model_id", 2), ("params", 2)),
)

# One member of a JeDi joint-image set (METHODS.md section 2). Pixels live in sharded
# Parquet files (`blobs/jointsets/`) so a trainer can stream sets shard by shard; this
# table says where each member came from and how it was augmented.
JOINTSETS = TableSpec(
    "jointsets",
    version=1,
    partition_by="subject_id",
    key=("set_id", "member"),
    fields=(
        pa.field("set_id", pa.string(), nullable=False),  # hash of its members' provenance
        pa.field("member", pa.int32(), nullable=False),  # position in the set, 0..set_size-1
        pa.field("set_size", pa.int32(), nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("origin", pa.string(), nullable=False),  # photo | synthetic
        pa.field("image_id", pa.string(), nullable=True),  # the source photo; null when synthetic
        pa.field("augmentation", pa.string(), nullable=False),  # JSON: every parameter applied
        pa.field("caption", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # blob path of the Parquet shard holding its pixels
        pa.field("builder", pa.string(), nullable=False),  # hash of the jointsets settings that made it
        pa.field("created_at", TIMESTAMP, nullable=False),
    ),
)

# Models shared across subjects: the JeDi joint-image model and LoRAs trained on it
# (zero-shot SFO). Per-subject adapters stay in `adapters`.
MODELS = TableSpec(
    "models",
    version=2,
    key=("model_id",),
    fields=(
        pa.field("model_id", pa.string(), nullable=False),  # hash of method, params, inputs
        pa.field("method", pa.string(), nullable=False),  # jedi | sfo-joint
        pa.field("weights", pa.string(), nullable=False),  # lora | unet
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("parent_model_id", pa.string(), nullable=True),  # sfo-joint sits on a jedi model
        pa.field("file", pa.string(), nullable=False),  # safetensors: diffusers LoRA or UNet state dict
        pa.field("params", pa.string(), nullable=False),
        pa.field("inputs_hash", pa.string(), nullable=False),  # joint sets (and negatives) it saw
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("final_loss", pa.float64(), nullable=False),
        pa.field("trained_on_version", pa.int32(), nullable=True),
        pa.field("created_at", TIMESTAMP, nullable=False),
        # A JSON blob {set_id: subject_id} of the joint sets it trained on: what a model kept
        # by its retrain policy (joint.retrain) is compared with, and who it has seen.
        pa.field("sets_file", pa.string(), nullable=True),
    ),
    added=(("sets_file", 2),),
)

# Prior-preservation class images: the base model's samples of a class prompt, one row per
# image, made once per (base, prompt, seed, settings) and shared by every subject and method.
CLASS_IMAGES = TableSpec(
    "class_images",
    version=1,
    key=("class_image_id",),
    fields=(
        pa.field("class_image_id", pa.string(), nullable=False),  # hash of base, prompt, seed, index, settings
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("class_prompt", pa.string(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),  # image i is seeded by seed + i, whatever the count
        pa.field("file", pa.string(), nullable=False),  # png
        pa.field("params", pa.string(), nullable=False),  # JSON: seed, steps, guidance, resolution
        pa.field("created_at", TIMESTAMP, nullable=False),
    ),
)

# OneActor's auxiliary clusters: base-model samples of a class prompt with their last-step
# UNet features, made once per (base, class, seed) and shared by every subject of the class.
CLUSTERS = TableSpec(
    "clusters",
    version=1,
    key=("cluster_id",),
    fields=(
        pa.field("cluster_id", pa.string(), nullable=False),  # hash of base, class, settings
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("images", pa.int32(), nullable=False),
        pa.field("file", pa.string(), nullable=False),  # safetensors: latents [N, C, h, w], features h [N, C', S, S]
        pa.field("params", pa.string(), nullable=False),  # JSON: prompt, seed, steps, guidance, resolution
        pa.field("created_at", TIMESTAMP, nullable=False),
    ),
)

# Every E-step's mask of every concept in every photo of a concept set (a `models` row),
# iteration 0 being the masks EM started from, so a run's convergence can be read back.
CONCEPT_MASKS = TableSpec(
    "concept_masks",
    version=1,
    key=("model_id", "iteration", "concept", "image_id"),
    fields=(
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("concept", pa.string(), nullable=False),  # its token, as prompts write it
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),  # subject | background: of the ingest mask
        pa.field("iteration", pa.int32(), nullable=False),  # E-step number; 0 = the initial masks
        pa.field("step", pa.int32(), nullable=False),  # the training step it followed
        pa.field("file", pa.string(), nullable=False),  # png, 255 = the concept
        pa.field("coverage", pa.float32(), nullable=False),  # its share of the photo
        pa.field("iou_ingest", pa.float32(), nullable=False),  # against the ingest mask's region
        pa.field("iou_exact", pa.float32(), nullable=True),  # against a drawn demo photo's true mask
        pa.field("created_at", TIMESTAMP, nullable=False),
    ),
)

# A concept set's compositions scored: CLIP-T per prompt, masked DINO per concept in it.
CONCEPT_SCORES = TableSpec(
    "concept_scores",
    version=1,
    key=("evaluation_id", "metric", "prompt", "concept"),
    fields=(
        pa.field("evaluation_id", pa.string(), nullable=False),  # hash of the set, seeds, sampling, scorers
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("set_name", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),  # clip_t | mdino
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("concept", pa.string(), nullable=False),  # the token scored; "" = the whole prompt
        pa.field("value", pa.float64(), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("scorer", pa.string(), nullable=False),
        pa.field("scorer_kind", pa.string(), nullable=False),  # pretrained | random-test
        pa.field("evaluated_at", TIMESTAMP, nullable=False),
    ),
)

# One score per row, so a trend across catalog versions is a filter and a group-by.
METRICS = TableSpec(
    "metrics",
    version=3,
    partition_by="subject_id",
    key=("evaluation_id", "metric"),
    fields=(
        pa.field("evaluation_id", pa.string(), nullable=False),  # hash of what was generated and how scored
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("model_ref", pa.string(), nullable=True),  # adapter_id or model_id that generated
        pa.field("base_model", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),  # dino, clip_i, clip_t, mdino, mclip_i, diversity, ...
        pa.field("value", pa.float64(), nullable=False),
        pa.field("prompt_set", pa.string(), nullable=False),  # name@hash of the prompts
        pa.field("seeds", pa.list_(pa.int64()), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("scorer", pa.string(), nullable=False),  # model name@version that scored
        pa.field("scorer_kind", pa.string(), nullable=False),  # pretrained | random-test | proxy
        pa.field("catalog_version", pa.int32(), nullable=True),  # the version the scored model was made at
        pa.field("evaluated_at", TIMESTAMP, nullable=False),
        # The published protocol the numbers follow ("DreamBench", or "DreamBench-subset" for
        # a --quick run); null = the project's own evaluation. Its parameters beside it, so a
        # query never mixes runs: prompts per subject, images per prompt.
        pa.field("protocol", pa.string(), nullable=True),
        pa.field("prompt_count", pa.int32(), nullable=True),
        pa.field("images_per_prompt", pa.int32(), nullable=True),
        pa.field("masker", pa.string(), nullable=True),  # what masked the generated images (MDINO, MCLIP-I)
        # For a model shared across subjects: "heldout" (it never trained on this subject:
        # zero-shot) or "in-catalog" (it did); null for a per-subject model.
        pa.field("split", pa.string(), nullable=True),
        # A method's sampling variant beyond its artefact ("keep pose 2" for DETEX); null = plain.
        pa.field("variant", pa.string(), nullable=True),
    ),
    added=(("protocol", 2), ("prompt_count", 2), ("images_per_prompt", 2), ("masker", 2), ("split", 2),
           ("variant", 3)),
)

# Per-prompt values of every evaluation (join `metrics` on evaluation_id for the rest), so
# the dashboard and a query can see which prompts fail.
PROMPT_METRICS = TableSpec(
    "prompt_metrics",
    version=1,
    partition_by="subject_id",
    key=("evaluation_id", "metric", "prompt"),
    fields=(
        pa.field("evaluation_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the template, with {subject}
        pa.field("value", pa.float64(), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
    ),
)

# One row per pipeline run: what ran, what was reused, what failed and why.
RUNS = TableSpec(
    "runs",
    version=1,
    key=("run_id",),
    fields=(
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("flow", pa.string(), nullable=False),
        pa.field("started_at", TIMESTAMP, nullable=False),
        pa.field("finished_at", TIMESTAMP, nullable=False),
        pa.field("status", pa.string(), nullable=False),  # completed | partial | failed
        pa.field("ran", pa.list_(pa.string()), nullable=False),
        pa.field("reused", pa.list_(pa.string()), nullable=False),
        pa.field("failures", pa.string(), nullable=False),  # JSON list of {"item", "error"}
        pa.field("catalog_version", pa.int32(), nullable=True),
        pa.field("summary", pa.string(), nullable=False),
    ),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (SUBJECTS, IMAGES, QUARANTINE, SOURCE_FILES, NEGATIVES, ADAPTERS, TRAIN_LOG, SAMPLES,
                 JOINTSETS, MODELS, CLASS_IMAGES, CLUSTERS, CONCEPT_MASKS, CONCEPT_SCORES, METRICS, PROMPT_METRICS, RUNS)
}
