"""The method interface: what a method declares and does, and the context it works in.

A method is one module (or small package) beside this one that subclasses `Method` and
is registered in `registry.py`. It declares its name, whether its artefact is per subject
or shared, which methods it needs first, the config sections its identity hashes and the
table its artefacts live in; it says how its artefact id is hashed, trains it on the shared
loop, samples with it and exports it. Methods import this module; nothing here imports a
method, and resolving what a method needs is the registry's job.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog import Catalog
from ..catalog.layout import MODELS_DIR
from ..catalog.schemas import ADAPTERS, TableSpec
from ..config import Config
from ..models.families import SD, Family
from ..models.loading import ModelParts, model_family, resolve_model_path
from ..models.resident import RESIDENT
from ..training.artefacts import at_model_resolution, base_model_id, open_model
from ..training.export import export_lora_policy
from ..training.subjects import Subject

# The rows a method works from: its own artefact and, recursively, those it needs, by method name.
Artefacts = dict[str, dict]


@dataclass
class Context:
    """The catalog, the one config, the base model's id and a logger, plus the model,
    loaded on first use so that finding everything current never loads it. A unit of work
    opens one `with Context.open(...)`: its end gives a borrowed resident model back."""

    catalog: Catalog
    config: Config
    base: str
    load_parts: Callable[[], ModelParts]
    say: Callable[[str], None] = print
    made: list[str] = field(default_factory=list)  # what this unit of work made and reused, for its report
    reused: list[str] = field(default_factory=list)
    ids: dict[tuple[str, str | None], str] = field(default_factory=dict)  # the registry's id cache
    give_back: Callable[[ModelParts], None] | None = None  # returns borrowed parts
    family: Family = SD  # the base model's (models/families/), known without loading it
    _parts: ModelParts | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, catalog: Catalog, config: Config, say: Callable[[str], None] = print) -> Context:
        """The context for work on `catalog`: "auto" resolutions resolved for its base model,
        which comes from this process's resident models unless `execution.resident_models` is off."""
        config = at_model_resolution(catalog, config)
        path = resolve_model_path(config.model.base, catalog.root / MODELS_DIR)
        base, family = base_model_id(catalog, config, path), model_family(path)
        if not config.execution.resident_models:
            return cls(catalog, config, base, lambda: open_model(catalog, config)[0], say, family=family)
        model = config.model
        return cls(catalog, config, base,
                   lambda: RESIDENT.checkout(model.base, catalog.root / MODELS_DIR, model.device, model.precision, say),
                   say, give_back=RESIDENT.checkin, family=family)

    def with_config(self, config: Config) -> Context:
        """The same work under other settings (sampling at the evaluation seed), sharing this one's model."""
        return Context(self.catalog, config, self.base, lambda: self.parts, self.say, family=self.family)

    @property
    def parts(self) -> ModelParts:
        if self._parts is None:
            self._parts = self.load_parts()
        return self._parts

    def close(self) -> None:
        if self._parts is not None and self.give_back is not None:
            self.give_back(self._parts)
        self._parts = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Method:
    name: str = ""
    summary: str = ""  # one line for `subjectflow methods`
    shared: bool = False  # one artefact for every subject (trained once), not one per subject
    needs: tuple[str, ...] = ()  # methods whose artefacts this one starts from
    sections: tuple[str, ...] = ()  # config sections that shape its artefact, shown by `subjectflow methods`
    families: tuple[str, ...] = ("sd",)  # the base model families (models/families/) it is written for
    table: TableSpec = ADAPTERS  # where its artefacts are recorded (adapters or models)
    makes_negatives: bool = False  # `subjectflow negatives --method NAME` renders its CDNS negatives
    steps_setting: str = "train.steps"  # what `tune --method NAME --steps N` sets
    usage: str = ""  # for an exported model card: how it samples, when that is more than txt2img
    keeps_attributes: bool = False  # honours generate.keep_pose / keep_background (a training photo's)
    # Its artefacts are sets a user learns by name from chosen photos (`subjectflow concepts
    # learn`), and a prompt's tokens pick the set it samples with: `learn`, `named`, `for_prompt`,
    # `learning_blocker`, `report`, `score`.
    named_sets: bool = False

    def enabled(self, config: Config) -> bool:
        """False when the configuration switches the method off (the refresh skips it)."""
        return True

    def devices(self, config: Config) -> int:
        """GPUs one training task of it takes (what it asks an engine for)."""
        return 1

    def artefact_id(self, ctx: Context, subject: Subject | None, needs: dict[str, str]) -> str:
        """The id its artefact would have if made now, from the ids of what it needs;
        nothing is run. `subject` is None for a shared method."""
        raise NotImplementedError

    def train(self, ctx: Context, subject: Subject | None, needs: Artefacts, stop_after: int | None = None) -> dict:
        """Train the artefact (resuming from checkpoints) and record its row; with
        `stop_after` below the step count, stop there and return {"interrupted_at": step}."""
        raise NotImplementedError

    def sample(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, prompt: str, n: int,
               references: int | None = None) -> list[dict]:
        """n images of `prompt` (holding `{subject}`) for the subject, recorded in `samples`.
        `references` caps how many of the subject's photos a reference-driven method shows."""
        raise NotImplementedError

    def learn(self, ctx: Context, name: str, sources: list[str], stop_after: int | None = None) -> dict:
        """Learn (or reuse) the set `name` from `sources` and return its row."""
        raise NotImplementedError(f"method {self.name!r} learns no named sets")

    def named(self, ctx: Context, name: str) -> tuple[Artefacts, str | None]:
        """The newest set called `name`, or ({}, why not)."""
        raise NotImplementedError(f"method {self.name!r} learns no named sets")

    def learning_blocker(self, ctx: Context, name: str, sources: list[str]) -> str | None:
        """Why `sources` cannot be learned as set `name` (nothing is loaded); None when they can."""
        raise NotImplementedError(f"method {self.name!r} learns no named sets")

    def report(self, ctx: Context, artefacts: Artefacts) -> str:
        """A named set's summary for `subjectflow concepts show`."""
        raise NotImplementedError(f"method {self.name!r} learns no named sets")

    def score(self, ctx: Context, artefacts: Artefacts, scorers: Any, masker: Any) -> list[dict]:
        """Sample and score a named set's compositions (reused when already scored so)."""
        raise NotImplementedError(f"method {self.name!r} learns no named sets")

    def for_prompt(self, ctx: Context, prompt: str) -> tuple[Artefacts, str | None]:
        """The set holding the tokens `prompt` names, or ({}, why not)."""
        raise NotImplementedError(f"method {self.name!r} learns no named sets")

    def sampling_settings(self, config: Config) -> dict | None:
        """Settings beyond `generate` that decide its images, hashed into evaluation ids."""
        return None

    def variant(self, config: Config) -> str | None:
        """A name for sampling settings that make a different model of the same artefact
        (scored and reported apart, as `metrics.variant`); None = its plain sampling."""
        return None

    def negatives(self, ctx: Context, subject: Subject, artefacts: Artefacts) -> list[dict]:
        """The subject's CDNS negatives this method trains on, made when missing."""
        raise NotImplementedError(f"method {self.name!r} makes no negatives")

    def weights(self, artefacts: Artefacts) -> list[tuple[str, dict]]:
        """(file name, row) of every weight file one needs to use it, base-most first."""
        return [(f"{self.name}.safetensors", artefacts[self.name])]

    def trained_on(self, ctx: Context) -> set[str] | None:
        """For a shared method, the ids of the subjects its current artefact trained on (a
        score on one of them is not zero-shot); None for a per-subject method."""
        return None

    def lora_policy(self, ctx: Context, subject: Subject | None, artefacts: Artefacts) -> tuple[str, list[dict]] | None:
        """(trigger words, LoRA rows base-most first) when plain txt2img with those LoRAs
        stacked is the method's whole sampler, so it exports as one diffusers LoRA."""
        return None

    def export(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, out: Path) -> list[Path]:
        """Its weights and a manifest of their rows in `out`; a LoRA policy also as one
        `pytorch_lora_weights.safetensors` with a model card."""
        out.mkdir(parents=True, exist_ok=True)
        policy = self.lora_policy(ctx, subject, artefacts)
        exported = export_lora_policy(ctx.catalog, self.name, ctx.base, *policy, out, self.usage) if policy else []
        files, manifest = [], []
        for name, row in self.weights(artefacts):
            files.append(Path(shutil.copyfile(ctx.catalog.blob_path(row["file"]), out / name)))
            manifest.append({**{k: _jsonable(v) for k, v in row.items()}, "file": name, "catalog_file": row["file"]})
        (out / "manifest.json").write_text(json.dumps({"method": self.name, "base_model": ctx.base,
                                                       "weights": manifest}, indent=2) + "\n")
        return exported + files

    def settings(self, config: Config) -> dict[str, Any]:
        return {section: getattr(config, section).model_dump(mode="json") for section in self.sections}


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
