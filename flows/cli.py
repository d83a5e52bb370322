"""The `subjectflow` command line: parse arguments, call a flow or the library, report.

Exit codes: 0 success, 1 a run that finished with problems the user must look at,
2 a usage or input error (missing source, no catalog, bad config) with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import yaml

from subjectflow.catalog import BLOB_KINDS, TABLES, Catalog, CatalogError, init_catalog, list_versions
from subjectflow.config import ConfigError, load_config
from subjectflow.ingest import SourceError
from subjectflow.methods import SETS_COMMAND
from subjectflow.models.loading import ModelNotAvailable


def default_catalog() -> str:
    """$SUBJECTFLOW_CATALOG, else `catalog/` at the top of the current git repository."""
    if os.environ.get("SUBJECTFLOW_CATALOG"):
        return os.environ["SUBJECTFLOW_CATALOG"]
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    return str(Path(top.stdout.strip()) / "catalog") if top.returncode == 0 else "catalog"


METHOD_HELP = "method (repeatable; default: evaluate.methods; `subjectflow methods` lists them)"


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override any params.yaml setting for this run, e.g. --set train.learning_rate=1e-4")


def _add_catalog(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", metavar="PATH", default=None,
                        help="catalog directory (default: $SUBJECTFLOW_CATALOG or the repository's catalog/)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags as config overrides (section -> key -> value); `--set` last."""
    flags = {("ingest", "workers"): "workers", ("ingest", "resolution"): "resolution",
             ("model", "base"): "model",
             ("generate", "steps"): "sample_steps", ("generate", "keep_pose"): "keep_pose",
             ("generate", "keep_background"): "keep_background", ("jointsets", "set_size"): "set_size"}
    overrides: dict[str, dict[str, Any]] = {}
    for (section, key), flag in flags.items():
        if getattr(args, flag, None) is not None:
            overrides.setdefault(section, {})[key] = getattr(args, flag)
    for item in getattr(args, "set", None) or []:
        path, sep, value = item.partition("=")
        keys = path.split(".")
        if not sep or len(keys) < 2 or not all(keys):
            raise ConfigError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set train.learning_rate=1e-4")
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(value) if value else value
    if getattr(args, "no_version", False):
        overrides["versioning"] = {"enabled": False}
    return overrides


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        merged.setdefault(section, {}).update(values)
    return merged


def _open(args: argparse.Namespace) -> Catalog:
    return Catalog.open(Path(args.catalog or default_catalog()))


# -- commands ----------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    catalog = init_catalog(Path(args.path), load_config(), remote=args.remote)
    print(f"catalog ready at {catalog.root}")
    print(f"  stages: {catalog.stage_file}\n  params: {catalog.params_file}")
    if args.remote:
        print(f"  DVC remote: {args.remote}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.ingest import ingest_flow

    catalog = _open(args)
    config = load_config(catalog.params_file, _overrides(args))
    run = _on_engine(ingest_flow, config, args.source, str(catalog.root))
    print(run.report.summary())
    print(f"catalog {catalog.root}: " + (f"v{run.version.number} ({run.version.commit[:10]})" if run.version else "no new version"))
    return 0 if run.report.balanced else 1


def cmd_refresh(args: argparse.Namespace) -> int:
    from flows.refresh import catalog_refresh

    catalog, config = _config(args)
    run = catalog_refresh(str(catalog.root), args.source, config, args.dashboard)
    print(run.summary())
    if run.dashboard:
        print(f"dashboard: {run.dashboard / 'index.html'}")
    return 1 if run.record.failures else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import evaluate_flow

    catalog, config = _config(args)
    run = _on_engine(evaluate_flow, config, str(catalog.root), args.subject or None, args.method or None)
    print(run.summary())
    for line in run.unavailable:
        print(f"  not evaluated {line}")
    return 1 if run.failures else 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from flows.dashboard import dashboard_flow

    catalog, config = _config(args)
    site = _on_engine(dashboard_flow, config, str(catalog.root), args.out, args.page_size)
    print(f"dashboard: {site.index} ({site.subjects} subjects, {site.thumbs_written} thumbnails made, "
          f"{site.thumbs_reused} reused)")
    for missing in site.missing[:10]:
        print(f"  missing {missing}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from flows.benchmark import dreambench_flow
    from subjectflow.evaluation.dreambench import QUICK, Protocol

    data = Path(args.data).resolve()
    if not data.is_dir():
        raise ConfigError(f"--data {data} is not a folder; pass a DreamBench-layout folder (one sub-folder per subject)")
    root = Path(args.catalog or ".benchmark/dreambench").resolve()
    catalog = Catalog.open(root) if (root / "catalog.json").exists() else init_catalog(root, load_config(), standalone=True)
    config = load_config(catalog.params_file, _overrides(args))
    protocol = QUICK if args.quick else Protocol()
    train_data = Path(args.train_data).resolve() if args.train_data else None
    if train_data is not None and not train_data.is_dir():
        raise ConfigError(f"--train-data {train_data} is not a folder; pass a photo folder of other subjects")
    run = dreambench_flow(str(data), str(catalog.root), args.method or list(config.evaluate.methods), config, protocol,
                          str(train_data) if train_data else None)
    print(run.table)
    print(f"\ncatalog {catalog.root}; dashboard {run.refresh.dashboard}")
    return 1 if run.refresh.record.failures else 0


def _config(args: argparse.Namespace) -> tuple[Catalog, Any]:
    catalog = _open(args)
    return catalog, load_config(catalog.params_file, _overrides(args))


def _on_engine(flow: Any, config: Any, *args: Any) -> Any:
    """Run `flow(*args, config)` with its tasks on `execution.engine`."""
    from flows.engine import engine, on_engine

    with engine(config) as placed:
        return on_engine(flow, placed)(*args, config=placed)


def _subjects(args: argparse.Namespace) -> list[str] | None:
    if getattr(args, "all", False):
        return None
    if not args.subject:
        raise ConfigError("name the subjects with --subject NAME (repeatable), or pass --all")
    return args.subject


def cmd_jointsets(args: argparse.Namespace) -> int:
    from flows.joint import jointsets_flow

    catalog, config = _config(args)
    run = _on_engine(jointsets_flow, config, str(catalog.root), args.subject or None)
    print(run.summary())
    return 1 if run.failures else 0


def _with_steps(catalog: Catalog, args: argparse.Namespace, settings: list[str]) -> Any:
    """The config with `--steps` written to each "section.key" of `settings`."""
    steps: dict[str, dict[str, Any]] = {}
    for setting in settings:
        section, key = setting.split(".")
        steps.setdefault(section, {})[key] = args.steps
    return load_config(catalog.params_file, _merge(_overrides(args), steps))


def cmd_tune(args: argparse.Namespace) -> int:
    from flows.tune import tune_methods_flow
    from subjectflow.methods import registry

    catalog, config = _config(args)
    methods = args.method or list(config.evaluate.methods)
    if not (args.subject or args.all or all(registry.get(m).shared for m in methods)):
        raise ConfigError("name the subjects with --subject NAME (repeatable), or pass --all")
    registry.check_base_model(catalog, config, methods)
    if args.steps is not None:  # each named method's own step count, not its parent's
        settings = sorted({registry.get(m).steps_setting for m in methods})
        config = _with_steps(catalog, args, settings)
        print(f"tune: --steps {args.steps} sets {', '.join(settings)}")
    run = _on_engine(tune_methods_flow, config, str(catalog.root), methods, args.subject or None)
    print(run.summary())
    return 1 if run.failures else 0


def cmd_negatives(args: argparse.Namespace) -> int:
    from flows.tune import negatives_flow
    from subjectflow.methods import registry

    catalog, config = _config(args)
    registry.check_base_model(catalog, config, [args.method])
    run = _on_engine(negatives_flow, config, str(catalog.root), args.method, args.subject or None)
    print(run.summary())
    return 1 if run.failures else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from flows.tune import generate_flow
    from subjectflow.methods import registry

    catalog, config = _config(args)
    method = None if args.method == "base" else args.method
    if method is not None and registry.get(method).named_sets:
        subjects = [None]  # the prompt's tokens pick what it samples with
    else:
        subjects = _subjects(args)
    if subjects is None:
        subjects = sorted(catalog.read("subjects").column("subject_id").to_pylist())
    registry.check_sampling(config, method)  # before a flow starts, so a usage error is one line
    if method is not None:
        from subjectflow.methods.base import Context

        ctx = Context.open(catalog, config)
        blockers = [why for s in subjects if (why := registry.sampling_blocker(ctx, method, s, args.prompt))]
        if blockers:
            raise CatalogError("; ".join(blockers))
    samples = generate_flow(str(catalog.root), args.prompt, subjects, method, args.n, config, args.references)
    for row in samples:
        print(f"{row['subject_id'] or '-':<20} {row['method']:<8} seed {row['seed']:<4} {catalog.blob_path(row['file'])}")
    return 0


def cmd_concepts_learn(args: argparse.Namespace) -> int:
    from flows.tune import learn_concepts_flow
    from subjectflow.methods import registry
    from subjectflow.methods.base import Context

    catalog, config = _config(args)
    if args.steps is not None:
        config = _with_steps(catalog, args, [registry.learner().steps_setting])
    ctx = Context.open(catalog, config)
    why = registry.learning_blocker(ctx, args.name, args.sources)
    if why:
        raise CatalogError(why)
    run = _on_engine(learn_concepts_flow, config, str(catalog.root), args.name, args.sources)
    print(run.summary())
    if not run.failures:
        print(registry.set_report(ctx, args.name))
    return 1 if run.failures else 0


def cmd_concepts_show(args: argparse.Namespace) -> int:
    from subjectflow.methods import registry
    from subjectflow.methods.base import Context

    catalog, config = _config(args)
    print(registry.set_report(Context.open(catalog, config), args.name))
    return 0


def cmd_concepts_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import evaluate_set_flow
    from subjectflow.methods import registry
    from subjectflow.methods.base import Context

    catalog, config = _config(args)
    ctx = Context.open(catalog, config)
    registry.named_set(ctx, args.name)  # an unknown set is one line, before any flow
    evaluate_set_flow(str(catalog.root), args.name, config)
    print(registry.set_report(ctx, args.name))
    return 0


def cmd_concepts_export(args: argparse.Namespace) -> int:
    from subjectflow.methods import registry
    from subjectflow.methods.base import Context

    catalog, config = _config(args)
    with Context.open(catalog, config) as ctx:
        for path in registry.export_set(ctx, args.name, Path(args.out)):
            print(path)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from subjectflow.methods import registry

    config = load_config(_open(args).params_file) if args.verbose else None
    print(registry.describe(args.verbose, config))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from subjectflow.methods import registry
    from subjectflow.methods.base import Context

    catalog, config = _config(args)
    out = Path(args.out)
    with Context.open(catalog, config) as ctx:
        for path in registry.export(ctx, args.method, args.subject, out):
            print(path)
    print(f"{out / 'manifest.json'}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    catalog = _open(args)
    versions = list_versions(catalog)
    if not versions:
        print(f"catalog {catalog.root} has no versions yet; run `subjectflow ingest SOURCE --catalog {catalog.root}`")
    for v in versions:
        print(f"v{v.number:<4} {v.commit[:10]}  {v.date}  {v.summary}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(catalog_summary(_open(args)))
    return 0


def catalog_summary(catalog: Catalog) -> str:
    lines = [f"catalog {catalog.root}"]
    versions = list_versions(catalog)
    lines.append(f"  latest version: v{versions[0].number} {versions[0].commit[:10]} {versions[0].date}" if versions
                 else "  latest version: none yet")
    lines.append("  tables:")
    for name in TABLES:
        lines.append(f"    {name:<14} {catalog.read(name).num_rows:>7} rows   {catalog.table_dir(name)}")
    lines.append("  blobs:")
    for kind in BLOB_KINDS:
        files = [p for p in (catalog.root / "blobs" / kind).rglob("*") if p.is_file()]
        lines.append(f"    {kind:<14} {len(files):>7} files  {sum(p.stat().st_size for p in files) / 1e6:8.1f} MB")
    subjects = catalog.read("subjects").sort_by("subject_id").to_pylist()
    if subjects:
        lines.append("  subjects:")
        lines += [f"    {s['name']:<24} {s['class_name']:<14} {s['n_images']:>3} photos" for s in subjects[:20]]
        if len(subjects) > 20:
            lines.append(f"    ... and {len(subjects) - 20} more")
    quarantine = catalog.read("quarantine").to_pylist()
    if quarantine:
        lines.append(f"  quarantine: {len(quarantine)} files (see {catalog.table_dir('quarantine')})")
        lines += [f"    {q['source_uri']}: {q['reason']}" for q in quarantine[:10]]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import DEMO_SET, demo_flow

    started = time.perf_counter()
    run = demo_flow(args.dir)
    print()
    print(catalog_summary(Catalog.open(run.catalog)))
    print()
    print(run.refresh.summary())
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s")
    print(f"  photo sets: {run.photo_sets}")
    print(f"  catalog:    {run.catalog}  (its own git + DVC repository)")
    print(f"  dashboard:  {run.refresh.dashboard / 'index.html'}  (open it in a browser; tiny-sd and "
          f"random-test scorers: a smoke test, not quality)")
    print(f"  refreshing again with nothing changed: {run.unchanged_seconds:.1f}s, "
          f"{len(run.unchanged.record.ran)} things made")
    print(f"  then: {run.concept_set.summary()}")
    if not run.concept_set.failures:
        from subjectflow.methods import registry
        from subjectflow.methods.base import Context

        catalog = Catalog.open(run.catalog)
        print(registry.set_report(Context.open(catalog, load_config(catalog.params_file)), DEMO_SET[0]))
    print(f"  try:        subjectflow catalog show --catalog {run.catalog}")
    return 0 if not (run.refresh.record.failures or run.concept_set.failures) else 1


# -- parser ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subjectflow",
        description="Versioned pipeline for subject-driven image generation: ingest product photo sets, "
                    "tune or personalise with the registered methods (`subjectflow methods`), evaluate, and keep it all in a "
                    "DVC-tracked catalog of Parquet tables with a static dashboard.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = command("init", cmd_init, "create a catalog (git + DVC repository, tables, blob store)")
    p.add_argument("path", help="directory for the catalog")
    p.add_argument("--remote", metavar="URL", help="DVC remote, e.g. s3://bucket/prefix (AWS_ENDPOINT_URL is honoured)")

    p = command("ingest", cmd_ingest, "ingest photo sets from a folder or s3://bucket/prefix (one sub-folder per subject)")
    p.add_argument("source", help="local folder or s3://bucket/prefix")
    _add_catalog(p)
    p.add_argument("--workers", type=int, help="worker processes (default: ingest.workers, 0 = one per core)")
    p.add_argument("--resolution", type=int, help="side of the square training copy (default: ingest.resolution)")
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version (for `dvc repro`)")

    p = command("refresh", cmd_refresh, "the nightly job: ingest -> joint sets -> tune each evaluated method "
                "-> evaluate -> version -> dashboard, each step only for what changed")
    _add_catalog(p)
    p.add_argument("--source", help="override ingest.source from params.yaml")
    p.add_argument("--dashboard", metavar="DIR", help="where to write the dashboard (default: dashboard/ beside the catalog)")
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version")
    _add_set(p)

    p = command("evaluate", cmd_evaluate, "score subjects' current models: DINO, CLIP-I, CLIP-T, masked and "
                "diversity metrics into the metrics table")
    p.add_argument("--subject", action="append", help="subject (repeatable; default: every subject)")
    p.add_argument("--method", action="append", help=METHOD_HELP)
    _add_set(p)
    _add_catalog(p)
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version")

    p = command("dashboard", cmd_dashboard, "write the static dashboard site (open index.html, no server needed)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: dashboard/ beside the catalog)")
    p.add_argument("--page-size", type=int, default=50, help="subjects per index page (default: %(default)s)")
    _add_catalog(p)
    _add_set(p)

    p = command("benchmark", cmd_benchmark, "run a published protocol and print the paper-style table")
    p.add_argument("protocol", choices=["dreambench"], help="the protocol")
    p.add_argument("--data", required=True, help="a DreamBench-layout folder (subject folders + prompts_and_classes.txt)")
    p.add_argument("--method", action="append", help=METHOD_HELP)
    p.add_argument("--catalog", metavar="PATH", default=None,
                   help="catalog for the run (default: .benchmark/dreambench, created if missing)")
    p.add_argument("--train-data", metavar="DIR",
                   help="photo folder of other subjects for the models shared across subjects to train on, so "
                        "their scores are zero-shot (without it they train on the benchmark's subjects and say "
                        "in-catalog)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 5 prompts x 1 image per subject, labelled DreamBench-subset (the protocol: "
                        "25 prompts x 4 images, 1 reference photo)")

    p = command("jointsets", cmd_jointsets,
                "build joint-image sets (augmented photos, optional synthetic collages) as sharded Parquet")
    p.add_argument("--subject", action="append", help="subject (repeatable; default: every subject)")
    p.add_argument("--set-size", type=int, help="images per set (default: jointsets.set_size)")
    _add_catalog(p)
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version")

    p = command("methods", cmd_methods, "list the registered methods, what each needs and its config sections")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each method's settings from params.yaml")
    _add_catalog(p)

    p = command("tune", cmd_tune, "make methods' artefacts (per-subject adapters, shared models), each after "
                "what it needs; resumes from checkpoints")
    p.add_argument("--method", action="append", help=METHOD_HELP)
    p.add_argument("--subject", action="append", help="subject to tune (repeatable)")
    p.add_argument("--all", action="store_true", help="every subject whose artefact is missing or stale")
    p.add_argument("--steps", type=int, help="training steps of each named method, set in its own section "
                   "(`subjectflow methods` shows which setting)")
    _add_set(p)
    p.add_argument("--model", help="base model: tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux, a local diffusers folder "
                   "(SD 1.x/2.x, SDXL, SD3, FLUX.1) or a cached hub id (default: model.base)")
    _add_catalog(p)
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version")

    p = command("negatives", cmd_negatives, "make CDNS negatives (blurred reference + generic prompt) per photo")
    p.add_argument("--method", required=True,
                   help="the method whose negatives to make, with its generator (`subjectflow methods` lists them)")
    p.add_argument("--subject", action="append", help="subject (repeatable; default: every subject)")
    _add_set(p)
    p.add_argument("--model", help="base model (default: model.base)")
    _add_catalog(p)
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version")

    p = command("generate", cmd_generate, "sample images with a method's current artefact and register them in `samples`")
    p.add_argument("--method", required=True, help="a registered method, or base for the base model alone")
    p.add_argument("--subject", action="append", help="subject (repeatable)")
    p.add_argument("--all", action="store_true", help="every subject")
    p.add_argument("--prompt", default="a photo of {subject}",
                   help="prompt; {subject} becomes the method's name for the subject (default: %(default)r)")
    p.add_argument("--references", type=int,
                   help="methods that complete a photo set: how many of the subject's photos are shown")
    p.add_argument("--n", type=int, default=1, help="images per subject (default: 1)")
    for attribute in ("pose", "background"):
        p.add_argument(f"--keep-{attribute}", metavar="PHOTO",
                       help=f"methods that learn a photo's {attribute} apart from the subject (`subjectflow methods` "
                            f"says which): keep this training photo's (file name, image id or number in the set)")
    p.add_argument("--sample-steps", type=int, help="sampling steps (default: generate.steps)")
    _add_set(p)
    p.add_argument("--model", help="base model (default: model.base)")
    _add_catalog(p)
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version")

    p = command("export", cmd_export, "copy a method's current weights (and what they stack on) with a manifest")
    p.add_argument("--method", required=True, help="the method (`subjectflow methods` lists them)")
    p.add_argument("--subject", help="the subject, for per-subject methods")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the weights and manifest.json into")
    _add_catalog(p)

    sets = command(SETS_COMMAND, lambda a: 2, "learn named concept sets (a subject, a region of a photo; up to "
                   "three) as tokens and masks by EM, then compose them in prompts")
    csub = sets.add_subparsers(dest="set_command", required=True, metavar="ACTION")
    p = csub.add_parser("learn", help="learn (or reuse) a concept set: its tokens, and masks refined every E-step",
                        description="learn (or reuse) a concept set: one token per concept, its mask in each photo "
                                    "re-estimated from the token's attention every few steps (the E-step); "
                                    "then name its tokens in a prompt: `subjectflow generate --method METHOD "
                                    "--prompt 'a photo of <a> on <b>'` with the method `subjectflow methods` lists "
                                    "for named sets")
    p.set_defaults(fn=cmd_concepts_learn)
    p.add_argument("name", help="the set's name")
    p.add_argument("--from", dest="sources", action="append", required=True, metavar="SOURCE",
                   help="a concept (repeatable, up to 3): subject:NAME[=TOKEN] (a subject's photo set) or "
                        "image:PHOTO[:subject|background][=TOKEN] (a region of one photo: id, file name or "
                        "SUBJECT/FILE); the token is <TOKEN>, by default <NAME> or <SUBJECT_REGION>")
    p.add_argument("--steps", type=int, metavar="N",
                   help="training steps (default: the method's steps setting, `subjectflow methods` shows it)")
    _add_set(p)
    p.add_argument("--model", help="base model (default: model.base)")
    _add_catalog(p)
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version")
    for name, fn, help in (("show", cmd_concepts_show, "a concept set's tokens, its masks' IoU per EM iteration and "
                            "its composition scores"),
                           ("evaluate", cmd_concepts_evaluate, "sample every composition of a set's concept tokens and "
                            "score CLIP-T and each concept's masked DINO against its source region"),
                           ("export", cmd_concepts_export, "write a concept set as files stock diffusers loads")):
        p = csub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        p.add_argument("name", help="the set's name")
        if name == "export":
            p.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
        _add_set(p)
        _add_catalog(p)
        if name == "evaluate":
            p.add_argument("--no-version", action="store_true", help="do not record a catalog version")

    catalog = command("catalog", lambda a: 2, "inspect a catalog")
    csub = catalog.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    for name, fn, help in (("versions", cmd_versions, "list catalog versions, newest first"),
                           ("show", cmd_show, "summarise tables, blobs, subjects and quarantine")):
        p = csub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        _add_catalog(p)

    p = command("demo", cmd_demo, "make synthetic product photo sets and run the nightly refresh on them in .demo/")
    p.add_argument("--dir", default=".demo", help="working directory for the demo (default: .demo)")
    return parser


# Prefect's temporary API server must answer within 20 s by default; while other jobs keep
# every core busy (a training run, CI) it often takes longer. A user's own setting wins.
SERVER_STARTUP_S = "300"
SERVER_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


@contextlib.contextmanager
def without_heartbeats() -> Iterator[None]:
    """For flows reporting to a temporary server, which dies with the process: no one can act
    on their heartbeats, and Prefect ends every flow run by joining its heartbeat thread, which
    sleeps in 1 s steps (up to a second per subflow: 9 of a no-change demo refresh's 12 s)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def heartbeats_where_watched() -> contextlib.AbstractContextManager:
    """`without_heartbeats` on a temporary server; a real one (PREFECT_API_URL) keeps them."""
    from prefect.settings import PREFECT_API_URL

    return contextlib.nullcontext() if PREFECT_API_URL.value() else without_heartbeats()


def _server_did_not_start(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, RuntimeError) and SERVER_TIMEOUT in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Offline machines are the norm here; the temporary server's telemetry ping would
    # only log a DNS failure. Users can still opt in by setting the variable.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", SERVER_STARTUP_S)
    try:
        with heartbeats_where_watched():
            return args.fn(args)
    except (SourceError, CatalogError, ConfigError, ModelNotAvailable) as exc:
        print(f"subjectflow: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not _server_did_not_start(exc):
            raise
        waited = os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
        print(f"subjectflow: error: Prefect's temporary API server did not answer within {waited} s (a busy "
              f"machine?); set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or start one with "
              f"`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
