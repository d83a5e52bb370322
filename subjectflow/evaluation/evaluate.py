"""Evaluate a subject's current model for a method: generate the prompt set, score, record.

An evaluation's id hashes everything that decides its numbers: the subject's photos, the
method's current adapter or model, the prompt set, seeds, sampling settings and scoring
settings. So a refresh re-evaluates exactly what changed, and an unchanged catalog finds
every evaluation already in `metrics`. The scoring models count by identity (a hub
snapshot's commit, a local folder's configs and weight files), not only by the name in config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image

from ..catalog import Catalog
from ..catalog.layout import MODELS_DIR
from ..catalog.schemas import ADAPTERS, METRICS
from ..catalog.store import utcnow
from ..config import Config, stable_hash
from ..models.loading import ModelParts
from ..tuning.generate import generate_jedi_samples, generate_samples
from ..tuning.joint import JEDI_METHODS, current_joint_model, current_sfo_joint_model
from ..tuning.runs import Subject, TuningError, load_subjects, target_adapter_id
from .dreambench import read_prompt_file
from .metrics import MaskFn, score_subject
from .prompts import PromptSet, evaluation_prompts
from .scorers import Scorers, scorer_names

ADAPTER_METHODS = ("sft", "sfo")


@dataclass(frozen=True)
class Evaluation:
    subject: Subject
    method: str
    model_ref: str  # the adapter_id (sft, sfo) or model_id (jedi, jedi-sfo) that generates
    evaluation_id: str
    catalog_version: int | None  # the version the model was trained on


@dataclass
class EvaluationPlan:
    todo: list[Evaluation]
    done: list[str]  # "subject/method" already evaluated with these settings
    unavailable: list[str]  # "subject/method: why" (no current model yet)


def _settings(config: Config, models_dir: Path) -> dict:
    return {"evaluate": config.evaluate.model_dump(mode="json"),
            "scorers": scorer_names(config.evaluate, models_dir),
            "generate": config.generate.model_dump(exclude={"seed"}),
            "joint": config.joint.model_dump(include={"references", "max_references", "image_guidance",
                                                      "text_guidance"})}


def prompt_set(config: Config) -> PromptSet:
    if not config.evaluate.prompt_file:
        return evaluation_prompts(config.evaluate.prompts)
    templates = read_prompt_file(Path(config.evaluate.prompt_file))[:config.evaluate.prompts]
    return PromptSet(f"{Path(config.evaluate.prompt_file).name}@{stable_hash(list(templates))}", templates)


def seeds(config: Config) -> list[int]:
    return [config.evaluate.seed + i for i in range(config.evaluate.images_per_prompt)]


def plan_evaluations(catalog: Catalog, config: Config, base: str, subjects: list[str] | None = None,
                     methods: list[str] | None = None) -> EvaluationPlan:
    methods = list(methods or config.evaluate.methods)
    unknown = set(methods) - set(ADAPTER_METHODS) - set(JEDI_METHODS)
    if unknown:
        raise TuningError(f"cannot evaluate method(s) {sorted(unknown)}; methods are "
                          f"{', '.join(ADAPTER_METHODS + JEDI_METHODS)}")
    adapters = {r["adapter_id"]: r for r in catalog.read(ADAPTERS.name).to_pylist()}
    evaluated = set(catalog.read(METRICS.name).column("evaluation_id").to_pylist())
    joint = _joint_models(catalog, config, base, methods)
    plan = EvaluationPlan([], [], [])
    prompts, settings = prompt_set(config), _settings(config, catalog.root / MODELS_DIR)
    for subject in load_subjects(catalog, subjects or None):
        for method in methods:
            label = f"{subject.name}/{method}"
            if method in ADAPTER_METHODS:
                ref = target_adapter_id(subject, method, config, base)
                row = adapters.get(ref)
                missing = f"no current {method} adapter: run `subjectflow tune --method {method}`"
            else:
                row = joint.get(method)
                ref = row["model_id"] if row else None
                missing = joint.get(f"{method}:why", "")
            if row is None:
                plan.unavailable.append(f"{label}: {missing}")
                continue
            evaluation_id = stable_hash([subject.subject_id, subject.inputs_hash, method, ref, prompts.name,
                                         seeds(config), settings])
            if evaluation_id in evaluated:
                plan.done.append(label)
            else:
                plan.todo.append(Evaluation(subject, method, ref, evaluation_id, row["trained_on_version"]))
    return plan


def _joint_models(catalog: Catalog, config: Config, base: str, methods: list[str]) -> dict:
    """The current jedi / jedi-sfo model rows (or why there is none), found once per plan."""
    found: dict = {}
    if not set(methods) & set(JEDI_METHODS):
        return found
    try:
        found["jedi"] = current_joint_model(catalog, config, base)
        found["jedi-sfo"] = current_sfo_joint_model(catalog, config, base, found["jedi"])
    except TuningError as exc:
        for method in JEDI_METHODS:
            found.setdefault(f"{method}:why", str(exc))
    return found


def evaluate(catalog: Catalog, config: Config, parts: ModelParts, base: str, job: Evaluation, scorers: Scorers,
             mask_fn: MaskFn, say: Callable[[str], None] = print) -> list[dict]:
    """Generate the prompt set with the job's model, score it, record the `metrics` rows."""
    prompts = prompt_set(config)
    sampling = config.model_copy(update={"generate": config.generate.model_copy(update={"seed": config.evaluate.seed})})
    n = config.evaluate.images_per_prompt
    subject = job.subject
    generated: dict[str, list[Image.Image]] = {}
    say(f"{subject.name}/{job.method}: {len(prompts.prompts)} prompts x {n} images")
    if job.method in JEDI_METHODS:  # looked up once: each lookup re-reads the joint sets and negatives
        model = current_joint_model(catalog, config, base)
        sfo = current_sfo_joint_model(catalog, config, base, model) if job.method == "jedi-sfo" else None
    for template in prompts.prompts:
        if job.method in JEDI_METHODS:
            rows = generate_jedi_samples(catalog, sampling, parts, base, template, n, subject, model, sfo_model=sfo)
        else:
            rows = generate_samples(catalog, sampling, parts, base, template, n, subject, job.model_ref, job.method)
        generated[template] = [Image.open(catalog.blob_path(r["file"])).convert("RGB") for r in rows]
    references = [Image.open(catalog.blob_path(r["normalised_file"])).convert("RGB") for r in subject.images]
    masks = [Image.open(catalog.blob_path(r["mask_file"])).convert("L") for r in subject.images]
    scores = score_subject(generated, references, masks, subject.class_name, scorers, mask_fn)
    now = utcnow()
    rows = [{"evaluation_id": job.evaluation_id, "subject_id": subject.subject_id, "method": job.method,
             "model_ref": job.model_ref, "base_model": base, "metric": s.metric, "value": s.value,
             "prompt_set": prompts.name, "seeds": seeds(config), "n_images": s.n_images, "scorer": s.scorer,
             "scorer_kind": s.scorer_kind, "catalog_version": job.catalog_version, "evaluated_at": now}
            for s in scores if s.prompt is None]  # the subject's overall values (the metrics key)
    with catalog.writer():
        catalog.upsert(METRICS.name, pa.Table.from_pylist(rows, schema=METRICS.schema))
    return rows
