"""What every trained artefact shares: the base model's identity, the model on its device,
content-addressed ids, and one locked write of weights + table row + training log."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import torch

from ..catalog import Catalog, list_versions
from ..catalog.layout import MODELS_DIR
from ..catalog.schemas import TRAIN_LOG, TableSpec
from ..catalog.store import utcnow
from ..config import Config, TrainConfig, stable_hash
from ..models.loading import ModelParts, load_components, native_resolution, resolve_device, resolve_model_path
from .data import encode_latents, load_images
from .subjects import Subject


def model_version(path: str) -> str:
    """Base model name plus a hash of its configs and weight sizes (cheap, changes with it)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*")):
        if file.is_file():
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes() if file.suffix == ".json" else str(file.stat().st_size).encode())
    return digest.hexdigest()[:12]


def base_model_id(catalog: Catalog, config: Config, path: str | None = None) -> str:
    """How artefacts name their base model: config name @ content version. `path` is the
    resolved model folder, when the caller has it (resolving checks the whole folder)."""
    path = path or resolve_model_path(config.model.base, catalog.root / MODELS_DIR)
    return f"{config.model.base}@{model_version(path)}"


def at_model_resolution(catalog: Catalog, config: Config) -> Config:
    """`config` with each "auto" resolution set to the base model's native size."""
    return config.at_native_resolution(
        lambda: native_resolution(resolve_model_path(config.model.base, catalog.root / MODELS_DIR)))


def open_model(catalog: Catalog, config: Config) -> tuple[ModelParts, str]:
    device, dtype = resolve_device(config.model.device, config.model.precision)
    parts = load_components(config.model.base, catalog.root / MODELS_DIR, device, dtype)
    return parts, base_model_id(catalog, config)


def autocast_dtype(parts: ModelParts) -> torch.dtype | None:
    return parts.unet.dtype if parts.unet.dtype != torch.float32 else None


def prepare_unet(parts: ModelParts, train: TrainConfig) -> None:
    if train.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        parts.unet.train()


def file_latents(parts: ModelParts, catalog: Catalog, files: list[str], resolution: int) -> torch.Tensor:
    """[N, C, h, w] latents of catalog image files, on the UNet's device."""
    return encode_latents(parts.vae, load_images([catalog.blob_path(f) for f in files], resolution)).to(parts.unet.device)


def adapter_id(params: dict, subject: Subject, extra_inputs: list[str] = ()) -> str:
    """A per-subject artefact's id: its parameters, the subject and its photos, and any
    other inputs (negatives) it was trained on."""
    return stable_hash([params, subject.subject_id, subject.inputs_hash, sorted(extra_inputs)])


def find_row(catalog: Catalog, table: TableSpec, key: str) -> dict | None:
    return next((r for r in catalog.read(table.name).to_pylist() if r[table.key[0]] == key), None)


def record_trained(catalog: Catalog, table: TableSpec, blob_kind: str, row: dict, history: list[dict],
                   file_bytes: bytes, also: tuple[tuple[TableSpec, list[dict]], ...] = ()) -> dict:
    """Store a trained artefact's weights, its `table` row (adapters or models), its
    per-step metrics in `train_log` and any rows `also` holds about it, in one locked write."""
    versions = list_versions(catalog)
    row = {**row, "file": catalog.put_blob(blob_kind, file_bytes, ".safetensors"), "created_at": utcnow(),
           "trained_on_version": versions[0].number if versions else None}
    log = [{"adapter_id": row[table.key[0]], "step": int(h["step"]), "metric": k, "value": float(v)}
           for h in history for k, v in h.items() if k != "step"]
    with catalog.writer():
        catalog.upsert(TRAIN_LOG.name, pa.Table.from_pylist(log, schema=TRAIN_LOG.schema))
        for spec, rows in also:
            catalog.upsert(spec.name, pa.Table.from_pylist(rows, schema=spec.schema))
        catalog.upsert(table.name, pa.Table.from_pylist([row], schema=table.schema))
    return row
