"""Evaluate a subject's current model for a method: generate the prompt set, score, record.

An evaluation's id hashes everything that decides its numbers: the subject's photos, the
method's current adapter or model, the prompt set, seeds, sampling settings and scoring
settings. So a refresh re-evaluates exactly what changed, and an unchanged catalog finds
every evaluation already in `metrics`. The scoring models count by identity (a hub
snapshot's commit, a local folder's configs and weight files), not only by the name in config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image

from ..catalog.layout import MODELS_DIR
from ..catalog.schemas import METRICS, PROMPT_METRICS
from ..catalog.store import utcnow
from ..config import Config, stable_hash
from ..methods import registry
from ..methods.base import Artefacts, Context
from ..progress import progress
from ..training.subjects import HELDOUT, IN_CATALOG, Subject, load_subjects
from .dreambench import read_prompt_file
from .metrics import Masker, score_subject
from .prompts import PromptSet, evaluation_prompts
from .scorers import Scorers, scorer_names

@dataclass(frozen=True)
class Evaluation:
    subject: Subject
    method: str
    model_ref: str  # the id of the method's artefact (adapter or model) that generates
    evaluation_id: str
    catalog_version: int | None  # the version the model was trained on
    artefacts: Artefacts  # the rows it samples with (its own and what it stacks on)
    split: str | None = None  # a shared model's: heldout (zero-shot) or in-catalog; None per subject
    variant: str | None = None  # the method's sampling variant (Method.variant); None = plain


@dataclass
class EvaluationPlan:
    todo: list[Evaluation]
    done: list[str]  # "subject/method" already evaluated with these settings
    unavailable: list[str]  # "subject/method: why" (no current model yet)


def _settings(config: Config, models_dir: Path) -> dict:
    return {"evaluate": config.evaluate.identity(mode="json"),
            "scorers": scorer_names(config.evaluate, models_dir),
            # what a kept photo changes is the method's variant, hashed per method below
            "generate": config.generate.identity(exclude={"seed", "keep_pose", "keep_background"}),
            "joint": config.joint.model_dump(include={"references", "max_references", "image_guidance",
                                                      "text_guidance"})}


def prompt_set(config: Config, subject: Subject) -> PromptSet:
    """The subject's prompts: the project's templates, or a prompt file's list for its class
    (DreamBench: the live-subject list for its cats and dogs, else the object list)."""
    if not config.evaluate.prompt_file:
        return evaluation_prompts(config.evaluate.prompts)
    kind, templates = read_prompt_file(config.evaluate.prompt_file).for_class(subject.class_name)
    if config.evaluate.prompts > len(templates):
        raise ValueError(f"evaluate.prompts is {config.evaluate.prompts}, but {config.evaluate.prompt_file} "
                         f"has {len(templates)} {kind} prompts; use 1..{len(templates)}")
    templates = templates[:config.evaluate.prompts]
    return PromptSet(f"{Path(config.evaluate.prompt_file).name}:{kind}@{stable_hash(list(templates))}", templates)


def seeds(config: Config) -> list[int]:
    return [config.evaluate.seed + i for i in range(config.evaluate.images_per_prompt)]


def plan_evaluations(ctx: Context, subjects: list[str] | None = None,
                     methods: list[str] | None = None) -> EvaluationPlan:
    config, catalog = ctx.config, ctx.catalog
    methods = list(methods or config.evaluate.methods)
    for method in methods:
        registry.get(method)
    evaluated = set(catalog.read(METRICS.name).column("evaluation_id").to_pylist())
    tables = {}
    for method in methods:  # each artefact table read once, not once per subject
        for need in (method, *registry.get(method).needs):
            table = registry.get(need).table
            tables.setdefault(table.name, {r[table.key[0]]: r for r in catalog.read(table.name).to_pylist()})
    plan = EvaluationPlan([], [], [])
    settings = _settings(config, catalog.root / MODELS_DIR)
    trained: dict[str, set[str] | None] = {}  # per shared method, the subjects its model saw
    for subject in load_subjects(catalog, subjects or None):
        prompts = prompt_set(config, subject)
        for method in methods:
            label = f"{subject.name}/{method}"
            rows, why = registry.current(ctx, method, subject, tables)
            if why:
                plan.unavailable.append(f"{label}: {why}")
                continue
            row = rows[method]
            ref = row[registry.get(method).table.key[0]]
            extra = registry.get(method).sampling_settings(config)
            variant = registry.get(method).variant(config)
            evaluation_id = stable_hash([subject.subject_id, subject.inputs_hash, method, ref, prompts.name,
                                         seeds(config), settings] + ([extra] if extra is not None else [])
                                        + ([variant] if variant is not None else []))
            if evaluation_id in evaluated:
                plan.done.append(label)
                continue
            if method not in trained:
                trained[method] = registry.get(method).trained_on(ctx)
            split = None if trained[method] is None else IN_CATALOG if subject.subject_id in trained[method] else HELDOUT
            plan.todo.append(Evaluation(subject, method, ref, evaluation_id, row["trained_on_version"], rows, split,
                                        variant))
    # A new shared model's zero-shot numbers (subjects it never trained on) come first: the
    # scores it is judged by are in even when a long evaluation stage is cut short.
    plan.todo.sort(key=lambda job: job.split != HELDOUT)
    return plan


def evaluate(ctx: Context, job: Evaluation, scorers: Scorers, masker: Masker) -> list[dict]:
    """Generate the prompt set with the job's model, score it, record the `metrics` rows."""
    catalog, config = ctx.catalog, ctx.config
    prompts = prompt_set(config, job.subject)
    sampling = config.model_copy(update={"generate": config.generate.model_copy(update={"seed": config.evaluate.seed})})
    sampler = ctx.with_config(sampling)
    n = config.evaluate.images_per_prompt
    subject = job.subject
    generated: dict[str, list[Image.Image]] = {}
    ctx.say(f"{subject.name}/{job.method}: {len(prompts.prompts)} prompts x {n} images")
    method = registry.get(job.method)
    with progress(len(prompts.prompts), f"evaluate {subject.name}/{job.method}", unit="prompt") as shown:
        for template in prompts.prompts:
            rows = method.sample(sampler, subject, job.artefacts, template, n)
            generated[template] = [Image.open(catalog.blob_path(r["file"])).convert("RGB") for r in rows]
            shown.update(1)
    references = [Image.open(catalog.blob_path(r["normalised_file"])).convert("RGB") for r in subject.images]
    masks = [Image.open(catalog.blob_path(r["mask_file"])).convert("L") for r in subject.images]
    scores = score_subject(generated, references, masks, subject.class_name, scorers, masker.fn)
    now = utcnow()
    rows = [{"evaluation_id": job.evaluation_id, "subject_id": subject.subject_id, "method": job.method,
             "model_ref": job.model_ref, "base_model": ctx.base, "metric": s.metric, "value": s.value,
             "prompt_set": prompts.name, "seeds": seeds(config), "n_images": s.n_images, "scorer": s.scorer,
             "scorer_kind": s.scorer_kind, "catalog_version": job.catalog_version, "evaluated_at": now,
             "protocol": config.evaluate.protocol or None, "prompt_count": len(prompts.prompts),
             "images_per_prompt": n, "masker": masker.name, "split": job.split, "variant": job.variant}
            for s in scores if s.prompt is None]  # the subject's overall values (the metrics key)
    per_prompt = [{"evaluation_id": job.evaluation_id, "subject_id": subject.subject_id, "method": job.method,
                   "metric": s.metric, "prompt": s.prompt, "value": s.value, "n_images": s.n_images}
                  for s in scores if s.prompt is not None]
    with catalog.writer():  # both tables in one locked write: never one without the other
        catalog.upsert(METRICS.name, pa.Table.from_pylist(rows, schema=METRICS.schema))
        catalog.upsert(PROMPT_METRICS.name, pa.Table.from_pylist(per_prompt, schema=PROMPT_METRICS.schema))
    return rows
