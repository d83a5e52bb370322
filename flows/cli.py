"""The `subjectflow` command line: parse arguments, call a flow or the library, report.

Exit codes: 0 success, 1 a run that finished with problems the user must look at,
2 a usage or input error (missing source, no catalog, bad config) with a message.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from subjectflow.catalog import BLOB_KINDS, TABLES, Catalog, CatalogError, init_catalog, list_versions
from subjectflow.config import ConfigError, load_config
from subjectflow.ingest import SourceError


def default_catalog() -> str:
    """$SUBJECTFLOW_CATALOG, else `catalog/` at the top of the current git repository."""
    if os.environ.get("SUBJECTFLOW_CATALOG"):
        return os.environ["SUBJECTFLOW_CATALOG"]
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    return str(Path(top.stdout.strip()) / "catalog") if top.returncode == 0 else "catalog"


def _add_catalog(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", metavar="PATH", default=None,
                        help="catalog directory (default: $SUBJECTFLOW_CATALOG or the repository's catalog/)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    ingest = {k: v for k, v in (("workers", getattr(args, "workers", None)),
                                ("resolution", getattr(args, "resolution", None))) if v is not None}
    versioning = {"enabled": False} if getattr(args, "no_version", False) else {}
    return {k: v for k, v in (("ingest", ingest), ("versioning", versioning)) if v}


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
    run = ingest_flow(args.source, str(catalog.root), config)
    print(run.report.summary())
    print(f"catalog {catalog.root}: " + (f"v{run.version.number} ({run.version.commit[:10]})" if run.version else "no new version"))
    return 0 if run.report.balanced else 1


def cmd_refresh(args: argparse.Namespace) -> int:
    from flows.refresh import catalog_refresh

    catalog = _open(args)
    config = load_config(catalog.params_file, _overrides(args))
    run = catalog_refresh(str(catalog.root), args.source, config)
    print(run.report.summary())
    return 0 if run.report.balanced else 1


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
    from flows.demo import demo_flow

    started = time.perf_counter()
    run = demo_flow(args.dir)
    print()
    print(catalog_summary(Catalog.open(run.catalog)))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s")
    print(f"  photo sets: {run.photo_sets}")
    print(f"  catalog:    {run.catalog}  (its own git + DVC repository)")
    print(f"  try:        subjectflow catalog show --catalog {run.catalog}")
    return 0 if run.ingest.report.balanced else 1


# -- parser ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subjectflow",
        description="Versioned pipeline for subject-driven image generation: ingest product photo sets "
                    "into a DVC-tracked catalog of Parquet tables.",
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

    p = command("refresh", cmd_refresh, "bring the catalog up to date with its source (the nightly job)")
    _add_catalog(p)
    p.add_argument("--source", help="override ingest.source from params.yaml")
    p.add_argument("--no-version", action="store_true", help="do not record a catalog version")

    catalog = command("catalog", lambda a: 2, "inspect a catalog")
    csub = catalog.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    for name, fn, help in (("versions", cmd_versions, "list catalog versions, newest first"),
                           ("show", cmd_show, "summarise tables, blobs, subjects and quarantine")):
        p = csub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        _add_catalog(p)

    p = command("demo", cmd_demo, "make synthetic product photo sets and run the pipeline on them in .demo/")
    p.add_argument("--dir", default=".demo", help="working directory for the demo (default: .demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Offline machines are the norm here; the temporary server's telemetry ping would
    # only log a DNS failure. Users can still opt in by setting the variable.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return args.fn(args)
    except (SourceError, CatalogError, ConfigError) as exc:
        print(f"subjectflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
