"""JeDi: finetuning-free personalisation with a joint-image model (METHODS.md section 2).

Two methods live here: `jedi`, one joint model for every subject that personalises by set
completion from the subject's photos, and `jedi-sfo`, zero-shot SFO's LoRA on top of it.
Their home: coupled attention (`attention.py`), the joint model (`model.py`), set
completion (`completion.py`) and zero-shot SFO (`zero_shot_sfo.py`).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
from diffusers import UNet2DConditionModel

from ...catalog.schemas import MODELS
from ...config import Config
from ...training.artefacts import find_row
from ...training.parallel import devices_for
from ...training.subjects import Subject, TuningError, training_subjects
from ..base import Artefacts, Context, Method
from .completion import jedi_negative_plan, make_jedi_negatives, sample_by_completion
from .model import JEDI, current_model_id, model_subjects, train_joint
from .zero_shot_sfo import sfo_joint_id, train_sfo_joint


USAGE = """JeDi personalises by set completion: the subject's photos sit beside the new image in
one set whose self-attention is coupled across its members. These weights in a plain
pipeline sample single images without references (the class noun as trigger). For
completions run `subjectflow generate --method {method} --subject NAME`, or in Python
`subjectflow.methods.jedi.completion.complete(parts, photos, caption, prompt, completion,
resolution)`, with `parts` a `subjectflow.models.loading.ModelParts` of the pipeline's vae,
text_encoder, tokenizer, scheduler and its UNet carrying these weights."""


class Jedi(Method):
    name = JEDI
    summary = "one joint-image model for every subject; personalises by set completion, no per-subject training"
    shared = True
    sections = ("train", "joint", "jointsets")
    # A UNet's self-attention is coupled across the set; SD3's and FLUX's joint attention is
    # joined over the set (our choice, jedi/joint_attention.py).
    families = ("sd", "sdxl", "sd3", "flux")
    table = MODELS
    steps_setting = "joint.steps"
    usage = USAGE.format(method=JEDI)

    def enabled(self, config: Config) -> bool:
        return config.joint.enabled

    def devices(self, config: Config) -> int:
        return devices_for(config.joint.devices, config.train.gradient_accumulation)

    def artefact_id(self, ctx: Context, subject: Subject | None, needs: dict[str, str]) -> str:
        return current_model_id(ctx.catalog, ctx.config, ctx.base)

    def train(self, ctx: Context, subject: Subject | None, needs: Artefacts, stop_after: int | None = None) -> dict:
        return train_joint(ctx, stop_after)

    def sample(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, prompt: str, n: int,
               references: int | None = None) -> list[dict]:
        return sample_by_completion(ctx.catalog, ctx.config, ctx.parts, ctx.base, prompt, n, _named(subject, self),
                                    artefacts[JEDI], self.name, references)

    def trained_on(self, ctx: Context) -> set[str] | None:
        row = find_row(ctx.catalog, MODELS, current_model_id(ctx.catalog, ctx.config, ctx.base))
        return model_subjects(ctx.catalog, ctx.config, row)

    def lora_policy(self, ctx: Context, subject: Subject | None, artefacts: Artefacts) -> tuple[str, list[dict]] | None:
        rows = [row for _, row in self.weights(artefacts)]
        return (subject.class_name if subject else "", rows) if artefacts[JEDI]["weights"] == "lora" else None

    def export(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, out: Path) -> list[Path]:
        files = super().export(ctx, subject, artefacts, out)
        if artefacts[JEDI]["weights"] == "lora":
            return files
        # A fully trained UNet: a diffusers `unet/` folder, loadable with from_pretrained.
        unet = UNet2DConditionModel.from_config(ctx.parts.unet.config)
        unet.load_state_dict(safetensors.torch.load_file(ctx.catalog.blob_path(artefacts[JEDI]["file"])))
        unet.save_pretrained(out / "unet")
        (out / "README.md").write_text(f"# JeDi joint model (full UNet)\n\n- base model: `{ctx.base}`\n"
                                       f"- model: {artefacts[JEDI]['model_id']}\n\n```python\nunet = "
                                       f"UNet2DConditionModel.from_pretrained(\"<this folder>/unet\")\n```\n\n"
                                       f"{self.usage}\n")
        return [*files, out / "unet", out / "README.md"]


class JediSfo(Jedi):
    name = "jedi-sfo"
    summary = "zero-shot SFO: one SFO LoRA on the joint model from every subject's CDNS pairs"
    needs = (JEDI,)
    sections = ("train", "sfo", "negatives")
    makes_negatives = True
    steps_setting = "sfo.steps"
    usage = USAGE.format(method="jedi-sfo")

    def devices(self, config: Config) -> int:
        return 1  # one SFO LoRA, trained in one process

    def trained_on(self, ctx: Context) -> set[str] | None:
        # Its pairs come from every training subject; its parent saw those with joint sets.
        return {s.subject_id for s in training_subjects(ctx.catalog, ctx.config)} | super().trained_on(ctx)

    def artefact_id(self, ctx: Context, subject: Subject | None, needs: dict[str, str]) -> str:
        return sfo_joint_id(ctx.catalog, ctx.config, ctx.base, needs[JEDI])

    def negatives(self, ctx: Context, subject: Subject, artefacts: Artefacts) -> list[dict]:
        have = set(ctx.catalog.read("negatives").column("negative_id").to_pylist())
        todo = sum(nid not in have for nid, _, _ in jedi_negative_plan(subject, ctx.config, ctx.base, artefacts[JEDI]))
        made = make_jedi_negatives(ctx.catalog, subject, ctx.config, ctx.parts, ctx.base, artefacts[JEDI])
        if todo:
            ctx.made.append(f"{todo} negatives")
        if len(made) > todo:
            ctx.reused.append(f"{len(made) - todo} negatives")
        return made

    def train(self, ctx: Context, subject: Subject | None, needs: Artefacts, stop_after: int | None = None) -> dict:
        return train_sfo_joint(ctx, needs[JEDI], stop_after)

    def sample(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, prompt: str, n: int,
               references: int | None = None) -> list[dict]:
        return sample_by_completion(ctx.catalog, ctx.config, ctx.parts, ctx.base, prompt, n, _named(subject, self),
                                    artefacts[JEDI], self.name, references, artefacts[self.name])

    def weights(self, artefacts: Artefacts) -> list[tuple[str, dict]]:
        return [("jedi.safetensors", artefacts[JEDI]), ("jedi-sfo.safetensors", artefacts[self.name])]


def _named(subject: Subject | None, method: Method) -> Subject:
    if subject is None:
        raise TuningError(f"{method.name} completes a subject's photo set: name a subject with --subject")
    return subject


METHOD = Jedi()
SFO_METHOD = JediSfo()
