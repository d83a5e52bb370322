"""Concept tokens + masks learned by EM (METHODS.md section 5; Rahman et al., 2402.11487).

A concept set is up to three concepts, each a subject's photo set or one region of one
photo (`sources.py`), learned together under a name: one new token per concept and, per
photo, a mask per concept, alternating token updates on the masked loss with masks
re-estimated from the tokens' cross-attention (`model.py`, `em.py`). Every E-step's masks
are catalogued in `concept_masks`. A prompt composes any of a set's tokens ("a photo of
<teapot> on <beach>"); the prompt's tokens pick the set. Its home: the parts beside this
file; learning, sampling and export here.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save

from ...catalog.schemas import CONCEPT_MASKS, CONCEPT_SCORES, MODELS
from ...catalog.store import utcnow
from ...config import Config, stable_hash
from ...demo_photos import drawn_mask
from ...ingest.photo import encode_png
from ...training.adapters import WEIGHT_NAME, frozen, trained_adapter
from ...training.artefacts import autocast_dtype, find_row, prepare_unet, record_trained
from ...training.data import encode_latents, load_images, load_masks
from ...training.loop import train
from ...training.sampling import generate_with_loras
from ...training.subjects import TuningError
from ...training.tokens import (KV_TARGETS, cross_attention, family_tokens, textual_inversion_files,
                               textual_inversion_usage)
from .. import SETS_COMMAND
from ..base import Artefacts, Context, Method
from .em import iou, refiner
from .model import ConceptObjective, ConceptWeights, composed_prompt
from .scoring import evaluation_id, score_lines, score_set
from .sources import MAX_CONCEPTS, SYNTAX, Concept, parse_source, resolve

NAME = "concepts"
TOKEN = re.compile(r"<[^<>\s]+>")
LEARN = f"subjectflow {SETS_COMMAND} learn NAME --from {SYNTAX}"


def concept_params(config: Config, base: str, name: str, concepts: list[Concept]) -> dict:
    train_cfg = config.train.identity(include={"resolution", "seed", "batch_size", "gradient_accumulation",
                                               "optimizer", "weight_decay", "max_grad_norm", "warmup_steps"})
    return {"method": NAME, "base": base, "train": train_cfg, "concepts": config.concepts.identity(),
            "refine": refiner(config.concepts.refine), "set": name, "sources": [c.source for c in concepts],
            "tokens": [c.token for c in concepts], "prompt": composed_prompt(["<c1>", "<c2>"])}


def _inputs(concepts: list[Concept]) -> list:
    return [[c.token, [[row["image_id"], row["normalised_file"], row["mask_file"], region]
                       for row, region in c.photos]] for c in concepts]


def concept_set_id(config: Config, base: str, name: str, concepts: list[Concept]) -> str:
    return stable_hash([concept_params(config, base, name, concepts), _inputs(concepts)])


def _photos(concepts: list[Concept]) -> tuple[list[dict], list[tuple[int, ...]], list[list[str]]]:
    """Every photo any concept is in (first-seen order), the concepts in each and their regions."""
    rows: dict[str, dict] = {}
    present: dict[str, dict[int, str]] = {}
    for c, concept in enumerate(concepts):
        for row, region in concept.photos:
            rows.setdefault(row["image_id"], row)
            present.setdefault(row["image_id"], {})[c] = region
    ids = list(rows)
    return ([rows[i] for i in ids], [tuple(sorted(present[i])) for i in ids],
            [[present[i].get(c, "") for c in range(len(concepts))] for i in ids])


@contextlib.contextmanager
def concept_objective(ctx: Context, concepts: list[Concept]) -> Iterator[ConceptObjective]:
    """The objective over every photo of the set, its tokens (and K/V LoRA) in place for
    the block; the model is given back as it was after."""
    config, parts, catalog, cc = ctx.config, ctx.parts, ctx.catalog, ctx.config.concepts
    device, resolution = parts.unet.device, config.train.resolution
    rows, present, regions = _photos(concepts)
    pixels = load_images([catalog.blob_path(r["normalised_file"]) for r in rows], resolution)
    ingest = load_masks([catalog.blob_path(r["mask_file"]) for r in rows], resolution)  # [N, 1, R, R]
    references = torch.zeros(len(rows), len(concepts), 1, resolution, resolution)
    for i, photo_regions in enumerate(regions):
        for c, region in enumerate(photo_regions):
            if region:
                references[i, c] = ingest[i] if region == "subject" else 1 - ingest[i]
    photos = ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    latents = encode_latents(parts.vae, pixels).to(device)
    prepare_unet(parts, config.train)
    with (frozen(parts.unet),  # before the LoRA, which alone then trains in it
          family_tokens(parts, {c.token: c.initialiser for c in concepts}, resolution) as tokens,
          trained_adapter(parts.unet, cc.kv_rank, NAME, config.train.seed, KV_TARGETS) if cc.kv
          else contextlib.nullcontext([]) as kv_params,
          cross_attention(parts.unet) if cc.kv else contextlib.nullcontext()):
        objective = ConceptObjective(parts.unet, parts.noise_scheduler, tokens, latents, photos,
                                     present, references.to(device), references.to(device).clone(), kv_params,
                                     cc.kv_learning_rate, config.train.batch_size, cc.mask_loss, cc.e_step_every,
                                     cc.e_step_timesteps, refiner(cc.refine), config.train.seed, NAME)
        if cc.init == "attention":  # the untrained tokens' attention, not ingest's masks, starts EM
            objective.history.clear()
            objective.e_step(0)
        yield objective


def _exact_masks(ctx: Context, rows: list[dict]) -> list[np.ndarray | None]:
    """Per photo, the true subject mask at the training resolution where the demo drew the
    photo (cropped by the box ingest cut the training copy with), else None."""
    resolution, exact = ctx.config.train.resolution, []
    for row in rows:
        mask = drawn_mask(ctx.catalog.blob_path(row["photo_file"]).read_bytes(), row["source_uri"])
        exact.append(None if mask is None else np.asarray(mask.crop(tuple(row["box"])).resize(
            (resolution, resolution), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0)
    return exact


def _mask_rows(ctx: Context, model_id: str, objective: ConceptObjective, concepts: list[Concept]) -> list[dict]:
    rows, _, regions = _photos(concepts)
    exact = _exact_masks(ctx, rows)
    made = []
    for iteration in range(len(objective.history)):
        step = iteration * objective.e_step_every
        for i, c, mask, score in objective.scores(iteration):
            truth = exact[i] if regions[i][c] == "subject" or exact[i] is None else 1 - exact[i]
            png = encode_png(Image.fromarray(mask.astype(np.uint8) * 255, "L"))
            made.append({"model_id": model_id, "concept": concepts[c].token, "image_id": rows[i]["image_id"],
                         "region": regions[i][c], "iteration": iteration, "step": step,
                         "file": ctx.catalog.put_blob("concept_masks", png, ".png"),
                         "coverage": float(mask.mean()), "iou_ingest": score,
                         "iou_exact": None if truth is None else iou(mask, truth), "created_at": utcnow()})
    return made


def learn_concepts(ctx: Context, name: str, specs: list[str], stop_after: int | None = None) -> dict:
    """The concept set `name` from `specs` (`sources.SYNTAX`): its `models` row, reused when
    the same set was learned from the same photos and settings."""
    config, cc = ctx.config, ctx.config.concepts
    concepts = resolve(ctx.catalog, [parse_source(s) for s in specs])
    model_id = concept_set_id(config, ctx.base, name, concepts)
    found = find_row(ctx.catalog, MODELS, model_id)
    label = f"{NAME} {name} ({', '.join(c.token for c in concepts)}) {model_id}"
    if found is not None:
        ctx.reused.append(label)
        return found
    with concept_objective(ctx, concepts) as objective:
        result = train(objective, config.train, ctx.catalog.work_dir(NAME, model_id), cc.steps,
                       cc.learning_rate, autocast_dtype(ctx.parts), ctx.parts.unet.device, stop_after,
                       on_step=objective.on_step, on_checkpoint=ctx.catalog.keep_work)
        if stop_after is not None and stop_after < cc.steps:
            return {"model_id": model_id, "interrupted_at": stop_after}
        params = concept_params(config, ctx.base, name, concepts)
        row = {"model_id": model_id, "method": NAME, "weights": "tokens+kv-lora" if cc.kv else "tokens",
               "base_model": ctx.base, "parent_model_id": None, "params": json.dumps(params, sort_keys=True),
               "inputs_hash": stable_hash(_inputs(concepts)), "steps": result.steps,
               "final_loss": result.final_loss}
        weights = objective.weights_bytes({c.token: c.initialiser for c in concepts}, params["sources"])
        masks = _mask_rows(ctx, model_id, objective, concepts)
        ctx.made.append(label)
        return record_trained(ctx.catalog, MODELS, "models", row, result.history, weights, ((CONCEPT_MASKS, masks),))


def learned_sets(ctx: Context) -> list[dict]:
    """This base model's concept sets, newest first."""
    rows = [r for r in ctx.catalog.read(MODELS.name).to_pylist() if r["method"] == NAME and r["base_model"] == ctx.base]
    return sorted(rows, key=lambda r: r["created_at"], reverse=True)


def _tokens(row: dict) -> list[str]:
    return json.loads(row["params"])["tokens"]


def for_prompt(ctx: Context, prompt: str) -> tuple[Artefacts, str | None]:
    """The newest concept set holding every token `prompt` names."""
    wanted = sorted(set(TOKEN.findall(prompt)))
    sets = learned_sets(ctx)
    known = ", ".join(sorted({t for r in sets for t in _tokens(r)})) or "none yet"
    if not wanted:
        return {}, f"name learned concepts in the prompt, as in 'a photo of <teapot> on <beach>' (learned: {known})"
    if len(wanted) > MAX_CONCEPTS:
        return {}, f"a prompt composes at most {MAX_CONCEPTS} concepts; it names {', '.join(wanted)}"
    fitting = [r for r in sets if set(wanted) <= set(_tokens(r))]
    if not fitting:
        return {}, (f"no concept set learned on {ctx.base} holds {', '.join(wanted)} together (learned: {known}); "
                    f"learn them in one set: `{LEARN}`")
    return {NAME: fitting[0]}, None


def named(ctx: Context, name: str) -> tuple[Artefacts, str | None]:
    """The newest concept set called `name`."""
    sets = learned_sets(ctx)
    found = next((r for r in sets if json.loads(r["params"])["set"] == name), None)
    if found is None:
        known = ", ".join(sorted({json.loads(r["params"])["set"] for r in sets})) or "none yet"
        return {}, f"no concept set {name!r} learned on {ctx.base} (sets: {known}); learn it: `{LEARN}`"
    return {NAME: found}, None


def report(ctx: Context, row: dict) -> str:
    """The set's tokens and, per concept and EM iteration, its masks' mean IoU against the
    ingest masks (the exact drawn masks too, for demo photos) and mean coverage."""
    params = json.loads(row["params"])
    masks = [r for r in ctx.catalog.read(CONCEPT_MASKS.name).to_pylist() if r["model_id"] == row["model_id"]]
    lines = [f"concept set {params['set']} ({row['model_id']}, {row['steps']} steps, refined by {params['refine']}): "
             + ", ".join(f"{t} from {s}" for t, s in zip(params["tokens"], params["sources"])),
             f"  {'concept':<24} {'iteration':>9} {'step':>6} {'photos':>6} {'IoU ingest':>10} {'IoU exact':>9} "
             f"{'coverage':>8}"]
    for token in params["tokens"]:
        for iteration in sorted({r["iteration"] for r in masks if r["concept"] == token}):
            rows = [r for r in masks if r["concept"] == token and r["iteration"] == iteration]
            exact = [r["iou_exact"] for r in rows if r["iou_exact"] is not None]
            lines.append(f"  {token:<24} {iteration:>9} {rows[0]['step']:>6} {len(rows):>6} "
                         f"{np.mean([r['iou_ingest'] for r in rows]):>10.3f} "
                         f"{f'{np.mean(exact):.3f}' if exact else '-':>9} "
                         f"{np.mean([r['coverage'] for r in rows]):>8.3f}")
    scores = [r for r in ctx.catalog.read(CONCEPT_SCORES.name).to_pylist() if r["model_id"] == row["model_id"]]
    return "\n".join(lines + score_lines(scores))


@torch.no_grad()
def sample_concepts(ctx: Context, row: dict, prompt: str, n: int) -> list[dict]:
    parts = ctx.parts
    path = ctx.catalog.blob_path(row["file"])
    weights = ConceptWeights.read(path)
    with family_tokens(parts, weights.initialisers, ctx.config.generate.resolution) as tokens:
        tokens.load_vectors(weights.vectors)
        embeds = tokens.embed([prompt])
    loras = [(NAME, path)] if weights.has_lora else []
    recorded = json.dumps({"concept_set": json.loads(row["params"])["set"]})
    return generate_with_loras(ctx.catalog, ctx.config, parts, ctx.base, prompt, n, None, loras, NAME, None, embeds,
                               recorded, row["model_id"])


def export_files(weights: ConceptWeights, out: Path) -> list[Path]:
    """What a plain diffusers user loads: one textual-inversion file per token, the LoRA."""
    files = []
    for name, data in textual_inversion_files(weights.vectors, weights.widths).items():
        files.append(out / name)
        files[-1].write_bytes(data)
    if weights.has_lora:
        files.append(out / WEIGHT_NAME)
        files[-1].write_bytes(save(weights.lora, metadata={"format": "pt"}))
    return files


class Concepts(Method):
    name = NAME
    summary = f"up to three concept tokens and their masks, learned by EM (`subjectflow {SETS_COMMAND} learn`)"
    shared = True
    table = MODELS
    sections = ("train", "concepts")
    families = ("sd", "sdxl")  # the tokens go into every CLIP text encoder
    steps_setting = "concepts.steps"
    named_sets = True

    def artefact_id(self, ctx: Context, subject, needs: dict[str, str]) -> str:
        raise TuningError(f"concept sets are learned by name from chosen photos, not tuned: `{LEARN}`")

    def learn(self, ctx: Context, name: str, sources: list[str], stop_after: int | None = None) -> dict:
        return learn_concepts(ctx, name, sources, stop_after)

    def learning_blocker(self, ctx: Context, name: str, sources: list[str]) -> str | None:
        try:
            resolve(ctx.catalog, [parse_source(s) for s in sources])
            refiner(ctx.config.concepts.refine)
        except TuningError as exc:
            return f"concepts {name}: {exc}"
        return None

    def report(self, ctx: Context, artefacts: Artefacts) -> str:
        return report(ctx, artefacts[NAME])

    def score(self, ctx: Context, artefacts: Artefacts, scorers, masker) -> list[dict]:
        row = artefacts[NAME]
        key = evaluation_id(ctx, row)
        done = [r for r in ctx.catalog.read(CONCEPT_SCORES.name).to_pylist() if r["evaluation_id"] == key]
        if done:
            ctx.reused.append(f"{NAME} scores {key}")
            return done
        generate = ctx.config.generate.model_copy(update={"seed": ctx.config.evaluate.seed})
        sampler = ctx.with_config(ctx.config.model_copy(update={"generate": generate}))
        return score_set(ctx, row, scorers, masker, lambda prompt, n: sample_concepts(sampler, row, prompt, n))

    def for_prompt(self, ctx: Context, prompt: str) -> tuple[Artefacts, str | None]:
        return for_prompt(ctx, prompt)

    def named(self, ctx: Context, name: str) -> tuple[Artefacts, str | None]:
        return named(ctx, name)

    def sample(self, ctx: Context, subject, artefacts: Artefacts, prompt: str, n: int,
               references: int | None = None) -> list[dict]:
        return sample_concepts(ctx, artefacts[NAME], prompt, n)

    def export(self, ctx: Context, subject, artefacts: Artefacts, out: Path) -> list[Path]:
        files = super().export(ctx, subject, artefacts, out)
        weights = ConceptWeights.read(ctx.catalog.blob_path(artefacts[NAME]["file"]))
        exported = export_files(weights, out)
        readme = out / "README.md"
        readme.write_text(_readme(ctx.base, weights, json.loads(artefacts[NAME]["params"])["set"]))
        return exported + [readme] + files


def _readme(base: str, weights: ConceptWeights, name: str) -> str:
    tokens = list(weights.vectors)
    pipeline, loads = textual_inversion_usage(tokens, weights.widths)
    lora = f'pipe.load_lora_weights(".", weight_name="{WEIGHT_NAME}")\n' if weights.has_lora else ""
    return f"""# Concept set {name}: {', '.join(tokens)}

Base model: `{base}`. Learned by subjectflow's `{NAME}` method (tokens and masks by EM);
stock diffusers calls load it:

```python
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("<the base model>")
{lora}{loads}
image = pipe("{composed_prompt(tokens[:2])}").images[0]
```
"""


METHOD = Concepts()
