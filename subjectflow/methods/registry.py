"""Every method by name, and what follows from what they declare: current artefact ids,
what is stale, making an artefact after what it needs, sampling and export.

Flows, tasks, evaluation and the CLI go through here and never name a method; adding one
is its module, a `register` line at the bottom, its config section and its tests.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..catalog import Catalog
from ..catalog.layout import MODELS_DIR
from ..catalog.schemas import ADAPTERS
from ..config import Config
from ..models.families import FAMILIES, Family
from ..models.loading import model_family, resolve_model_path
from ..training.artefacts import find_row
from ..training.sampling import generate_with_loras, identified, subject_prompt
from ..training.subjects import Subject, TuningError, load_subject, load_subjects
from . import SETS_COMMAND
from .base import Artefacts, Context, Method

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    unknown = [n for n in method.needs if n not in METHODS]
    if unknown:
        raise ValueError(f"method {method.name!r} needs {unknown}, which are not registered before it")
    if method.shared and any(not METHODS[n].shared for n in method.needs):
        raise ValueError(f"shared method {method.name!r} cannot start from a per-subject artefact")
    METHODS[method.name] = method
    return method


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """A method registered for the duration (tests, experiments), then removed again."""
    register(method)
    try:
        yield method
    finally:
        METHODS.pop(method.name, None)


def names() -> list[str]:
    return list(METHODS)


def get(name: str) -> Method:
    if name not in METHODS:
        raise TuningError(f"unknown method {name!r}; methods are {', '.join(METHODS)} (see `subjectflow methods`)")
    return METHODS[name]


def targets(config: Config, wanted: list[str] | tuple[str, ...]) -> list[str]:
    """The wanted methods that are switched on, in registration order (needs come first)."""
    for name in wanted:
        get(name)
    return [name for name, method in METHODS.items() if name in wanted and method.enabled(config)]


def _for(method: Method, subject: Subject | None) -> Subject | None:
    return None if method.shared else subject


def artefact_ids(ctx: Context, name: str, subject: Subject | None) -> dict[str, str]:
    """The ids `name`'s artefact and everything it needs would have if made now, by method;
    nothing is run. Raises TuningError when an input is missing (no joint sets yet)."""
    method = get(name)
    refuse_family(ctx, name)
    if subject is None and not method.shared:
        raise TuningError(f"{name} trains one adapter per subject: name a subject with --subject")
    ids: dict[str, str] = {}
    for need in method.needs:
        ids.update(artefact_ids(ctx, need, _for(get(need), subject)))
    key = (name, subject.subject_id if subject and not method.shared else None)
    if key not in ctx.ids:  # a shared id may hash every subject's inputs: compute it once
        ctx.ids[key] = method.artefact_id(ctx, _for(method, subject), {n: ids[n] for n in method.needs})
    ids[name] = ctx.ids[key]
    return ids


def runs_on(method: Method) -> str:
    """The base model families `method` is written for, by label."""
    return ", ".join(f.label for f in FAMILIES if f.name in method.families)


def refuse_family(ctx: Context, name: str) -> None:
    """TuningError when `name` is not written for the base model's family."""
    refuse_families(ctx.family, ctx.config.model.base, [name])


def refuse_families(family: Family, base: str, names: list[str]) -> None:
    """TuningError naming the first of `names` not written for `family` (the base model
    `base`'s), and where it runs: a command checks before it starts any work."""
    for name in names:
        method = get(name)
        if family.name not in method.families:
            raise TuningError(f"{name} does not run on {family.label} base models ({base}); it runs on "
                              f"{runs_on(method)}: pick such a base model, or leave {name} out of evaluate.methods")


def check_base_model(catalog: Catalog, config: Config, names: list[str]) -> None:
    """Before a command starts any work: every method of `names` runs on the base model's family."""
    family = model_family(resolve_model_path(config.model.base, catalog.root / MODELS_DIR))
    refuse_families(family, config.model.base, names)


def tune_command(ctx: Context, name: str, subject: Subject | None) -> str:
    who = "" if get(name).shared or subject is None else f" --subject {subject.name}"
    return f"subjectflow tune --method {name}{who} --catalog {ctx.catalog.root}"


def current(ctx: Context, name: str, subject: Subject | None,
            tables: dict[str, dict[str, dict]] | None = None) -> tuple[Artefacts, str | None]:
    """The current rows of `name` and what it needs, or ({}, why not) with the command to
    run. `tables` (table -> key -> row) lets a planner read each table once."""
    try:
        ids = artefact_ids(ctx, name, subject)
    except TuningError as exc:
        return {}, str(exc)
    found = {}
    for need, key in ids.items():
        table = get(need).table
        row = tables[table.name].get(key) if tables is not None else find_row(ctx.catalog, table, key)
        if row is None:
            return {}, (f"no current {need} {kind(need)} for these inputs and settings: "
                        f"run `{tune_command(ctx, name, subject)}`")
        found[need] = row
    return found, None


def kind(name: str) -> str:
    return "adapter" if get(name).table is ADAPTERS else "model"


def stale_subjects(ctx: Context, name: str) -> list[str]:
    """Subjects whose current artefact for a per-subject method is missing (new photos,
    parameters or base model all change the id)."""
    table = get(name).table
    have = set(ctx.catalog.read(table.name).column(table.key[0]).to_pylist())
    return [s.subject_id for s in load_subjects(ctx.catalog) if artefact_ids(ctx, name, s)[name] not in have]


@dataclass
class TuneOutcome:
    subject: str
    method: str
    artefact: dict
    made: list[str]
    reused: list[str]
    negatives: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        made = "; made " + ", ".join(self.made) if self.made else ""
        reused = "; reused " + ", ".join(self.reused) if self.reused else ""
        return f"{self.subject} ({self.method}){made}{reused}"


def ensure(ctx: Context, name: str, subject: Subject | None, stop_after: int | None = None,
           needed_by: str | None = None) -> Artefacts:
    """`name`'s current artefact and what it needs, training whatever is missing, needs first."""
    method = get(name)
    needs: Artefacts = {}
    for need in method.needs:
        needs.update(ensure(ctx, need, _for(get(need), subject), needed_by=name))
    key = artefact_ids(ctx, name, subject)[name]
    row = find_row(ctx.catalog, method.table, key)
    label = f"{name} {kind(name)} {key}"
    who = subject.name if subject and not method.shared else "all subjects"
    if row is not None:
        ctx.reused.append(label)
        if needed_by:
            ctx.say(f"{who}: {needed_by} starts from {label}, made {_age(row)} ago")
        return {**needs, name: row}
    if needed_by:
        ctx.say(f"{who}: {needed_by} starts from the {name} {kind(name)} for these inputs and settings; "
                f"training that first{_other_settings(ctx, method, subject)}")
    row = method.train(ctx, _for(method, subject), needs, stop_after)
    if "interrupted_at" not in row:
        ctx.made.append(label)
    return {**needs, name: row}


def _age(row: dict) -> str:
    seconds = (datetime.now(timezone.utc) - row["created_at"]).total_seconds()
    return next(f"{seconds / size:.0f} {unit}" for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s"))
                if seconds >= size or unit == "s")


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _other_settings(ctx: Context, method: Method, subject: Subject | None) -> str:
    """When the catalog holds this method's artefact for other settings: what differs, and
    the `--set` that would use the existing one instead (nothing when there is none)."""
    key_column = method.table.key[0]
    rows = [r for r in ctx.catalog.read(method.table.name).to_pylist()
            if r["method"] == method.name
            and (method.shared or subject is None or r.get("subject_id") == subject.subject_id)]
    if not rows:
        return ""
    newest = max(rows, key=lambda r: r["created_at"])
    theirs = _flat(json.loads(newest["params"]))
    ours = _flat(method.settings(ctx.config))
    differ = {k: (theirs[k], v) for k, v in ours.items() if k in theirs and theirs[k] != v}
    if not differ:
        return f" (the catalog's {method.name} {newest[key_column]} was made from other inputs)"
    shown = ", ".join(f"{k} {old} there, {new} now" for k, (old, new) in differ.items())
    keep = " ".join(f"--set {k}={json.dumps(old)}" for k, (old, _) in differ.items())
    return (f" (the catalog's {method.name} {newest[key_column]}, {_age(newest)} old, differs: {shown}; "
            f"`{keep}` uses it)")


def _subject(ctx: Context, method: Method, subject: str | None) -> Subject | None:
    if method.shared and subject is None:
        return None
    if subject is None:
        raise TuningError(f"{method.name} trains one adapter per subject: name a subject with --subject")
    return load_subject(ctx.catalog, subject)


def tune(ctx: Context, name: str, subject: str | None, stop_after: int | None = None) -> TuneOutcome:
    """Make `name`'s artefact (for a subject, or the shared one), first making what it needs."""
    method = get(name)
    found = _subject(ctx, method, subject)
    rows = ensure(ctx, name, found, stop_after)
    return TuneOutcome(found.name if found and not method.shared else "all subjects", name, rows[name],
                       ctx.made, ctx.reused)


def negatives(ctx: Context, name: str, subject: str) -> TuneOutcome:
    """The subject's CDNS negatives for `name`, making what their generator needs first."""
    method = get(name)
    if not method.makes_negatives:
        makers = ", ".join(n for n, m in METHODS.items() if m.makes_negatives)
        raise TuningError(f"method {name!r} trains on no negatives; negatives are made for {makers}")
    found = load_subject(ctx.catalog, subject)
    needs: Artefacts = {}
    for need in method.needs:
        needs.update(ensure(ctx, need, _for(get(need), found), needed_by="negatives"))
    made = method.negatives(ctx, found, needs)
    return TuneOutcome(found.name, f"negatives ({name})", needs[method.needs[-1]], ctx.made, ctx.reused, made)


def learner() -> Method:
    """The method that `subjectflow concepts` drives: the one that learns named sets."""
    found = [m for m in METHODS.values() if m.named_sets]
    if not found:
        raise TuningError("no registered method learns named concept sets")
    return found[0]


def learn(ctx: Context, set_name: str, sources: list[str], stop_after: int | None = None) -> TuneOutcome:
    """Learn the named set from `sources` (or reuse it, when these photos and settings made it)."""
    method = learner()
    refuse_family(ctx, method.name)
    row = method.learn(ctx, set_name, sources, stop_after)
    return TuneOutcome(set_name, method.name, row, ctx.made, ctx.reused)


def learning_blocker(ctx: Context, set_name: str, sources: list[str]) -> str | None:
    """Why `sources` name no concept set (a bad source, an unknown photo); None when fine."""
    return learner().learning_blocker(ctx, set_name, sources)


def set_report(ctx: Context, set_name: str) -> str:
    """The named set's tokens, and how its masks moved over the EM iterations."""
    return learner().report(ctx, named_set(ctx, set_name))


def score_set(ctx: Context, set_name: str, scorers, masker) -> list[dict]:
    """Sample and score the named set's compositions (`concept_scores`)."""
    return learner().score(ctx, named_set(ctx, set_name), scorers, masker)


def named_set(ctx: Context, set_name: str) -> Artefacts:
    rows, why = learner().named(ctx, set_name)
    if why:
        raise TuningError(why)
    return rows


def export_set(ctx: Context, set_name: str, out: Path) -> list[Path]:
    return learner().export(ctx, None, named_set(ctx, set_name), out)


def check_sampling(config: Config, name: str | None) -> None:
    """Refuse generate settings the method (None: the base model) would silently ignore."""
    if (config.generate.keep_pose or config.generate.keep_background) and not (name and get(name).keeps_attributes):
        keepers = [m.name for m in METHODS.values() if m.keeps_attributes]
        raise TuningError(f"--keep-pose/--keep-background: {name or 'the base model'} does not learn a photo's pose "
                          f"or background apart from the subject; methods that do: {', '.join(keepers) or 'none'}")


def sample(ctx: Context, name: str | None, subject: str | None, prompt: str, n: int,
           references: int | None = None) -> list[dict]:
    """n images of `prompt` with `name`'s current artefact (None: the base model alone)."""
    found = load_subject(ctx.catalog, subject) if subject else None
    check_sampling(ctx.config, name)
    if name is None:
        return generate_with_loras(ctx.catalog, ctx.config, ctx.parts, ctx.base,
                                   subject_prompt(prompt, found, identified(ctx.config, found)), n, found, [],
                                   "base", None)
    method = get(name)
    if found is None and not method.shared:
        raise TuningError(f"{name} samples with a subject's adapter: name a subject with --subject")
    rows, why = _sampling_rows(ctx, method, found, prompt)
    if why:
        raise TuningError(why)
    return method.sample(ctx, found, rows, prompt, n, references)


def _sampling_rows(ctx: Context, method: Method, found: Subject | None, prompt: str) -> tuple[Artefacts, str | None]:
    if method.named_sets:
        return method.for_prompt(ctx, prompt)
    rows, why = current(ctx, method.name, found)
    return rows, why and f"{found.name if found else 'catalog'}: {why}{_other_settings(ctx, method, found)}"


def sampling_blocker(ctx: Context, name: str, subject: str | None, prompt: str = "") -> str | None:
    """Why `name` cannot sample `prompt` for `subject` now, with what differs from the
    catalog's artefact and the `--set` that uses it; None when it can. Nothing is loaded or
    trained."""
    method = get(name)
    found = None if method.named_sets else _subject(ctx, method, subject)
    return _sampling_rows(ctx, method, found, prompt)[1]


def export(ctx: Context, name: str, subject: str | None, out: Path) -> list[Path]:
    """Copy `name`'s current weights (and what they stack on) with a manifest into `out`."""
    method = get(name)
    found = _subject(ctx, method, subject)
    rows, why = current(ctx, name, found)
    if why:
        raise TuningError(f"nothing to export: {why}")
    return method.export(ctx, found, rows, out)


def describe(verbose: bool = False, config: Config | None = None) -> str:
    """What `subjectflow methods` prints."""
    lines = []
    for name, method in METHODS.items():
        scope = (f"named sets of chosen photos (`subjectflow {SETS_COMMAND} learn`)" if method.named_sets
                 else "shared by every subject" if method.shared else "per subject")
        needs = f"; needs {', '.join(method.needs)}" if method.needs else ""
        needs += "; keeps a training photo's pose/background (--keep-pose/--keep-background)" if method.keeps_attributes else ""
        lines.append(f"{name:<10} {method.summary}\n{'':<10} {scope}{needs}; config: {', '.join(method.sections)}; "
                     f"--steps sets {method.steps_setting}\n{'':<10} base models: {runs_on(method)}")
        if verbose and config is not None:
            for section, values in method.settings(config).items():
                lines.append(f"{'':<12}{section}: {values}")
    return "\n".join(lines)


def _register_builtin() -> None:
    from . import concepts, detex, jedi, oneactor, sfo, sft

    for method in (sft.METHOD, sfo.METHOD, jedi.METHOD, jedi.SFO_METHOD, oneactor.METHOD, detex.METHOD,
                   concepts.METHOD):
        register(method)


_register_builtin()
