"""Catalog versions: DVC tracks the data, git records each version, the remote gets a push.

A version is a git commit of the catalog's `dvc.lock`, written as `dvc commit --force`
writes it (shards.py: through DVC's Python API, so that only blob shards that changed
are re-hashed). Everything else runs git's and DVC's command lines exactly as a user
would. All of it runs under the catalog's write lock: DVC operations never overlap.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config
from .layout import STAGES, WORK_DIR, render_dvc_stages
from .shards import commit_stages
from .store import Catalog, CatalogError

VERSION_SUBJECT = re.compile(r"^subjectflow catalog v(\d+): ")
_IDENTITY = ("-c", "user.name=subjectflow", "-c", "user.email=subjectflow@localhost")


class VersioningError(CatalogError):
    pass


@dataclass(frozen=True)
class CatalogVersion:
    number: int
    commit: str
    date: str
    summary: str


def _run(args: list[str], cwd: Path, what: str) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VersioningError(f"{what} failed in {cwd}: {' '.join(args[:4])} ...\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _git(args: list[str], cwd: Path, what: str = "git") -> str:
    if shutil.which("git") is None:
        raise VersioningError("git is not installed; install git to version the catalog")
    # Machines without a configured identity (CI, containers) still get a commit.
    has_identity = subprocess.run(["git", "config", "user.email"], cwd=cwd, capture_output=True).returncode == 0
    return _run(["git", *(() if has_identity else _IDENTITY), *args], cwd, what)


def _dvc(args: list[str], cwd: Path, what: str = "dvc") -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, what)


def _enclosing(path: Path, marker: str) -> Path | None:
    for candidate in (path, *path.parents):
        if (candidate / marker).exists():
            return candidate
    return None


def _declares_outputs(stage_file: Path, catalog_rel: str) -> bool:
    if not stage_file.exists():
        return False
    declared = (yaml.safe_load(stage_file.read_text()) or {}).get("stages", {})
    wanted = render_dvc_stages(catalog_rel)
    return all(
        name in declared and [next(iter(o)) if isinstance(o, dict) else o for o in declared[name].get("outs", [])]
        == [next(iter(o)) for o in wanted[name]["outs"]]
        for name in wanted
    )


def init_catalog(path: Path, config: Config, remote: str | None = None, standalone: bool = False) -> Catalog:
    """Create (or re-open) a catalog at `path`, versioned by git + DVC.

    Inside a DVC repository whose `dvc.yaml` already declares this catalog's outputs
    (the project's own `catalog/`), that file and its `params.yaml` are used. Anywhere
    else the catalog gets its own `dvc.yaml` and `params.yaml`, and, outside any DVC
    repository (or when `standalone`, e.g. the demo's), its own git + DVC repository.
    """
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    if standalone:
        dvc_root = path if (path / ".dvc").exists() else None
        needs_git = not (path / ".git").exists()
    else:
        dvc_root = _enclosing(path, ".dvc")
        needs_git = _enclosing(path, ".git") is None
    if dvc_root is None:
        if needs_git:
            _git(["init", "-q"], path, "git init")
        # A catalog below the git root (but in no DVC repo) gets a DVC sub-repository.
        subdir = ["--subdir"] if _enclosing(path, ".git") != path else []
        _dvc(["init", "-q", *subdir], path, "dvc init")
        dvc_root = path

    stage_file = dvc_root / "dvc.yaml"
    if not _declares_outputs(stage_file, os.path.relpath(path, dvc_root)):
        stage_file = path / "dvc.yaml"
        if not stage_file.exists():
            stage_file.write_text(yaml.safe_dump({"stages": render_dvc_stages(".")}, sort_keys=False))
            (path / "params.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    catalog = Catalog.create(path, stage_file, stage_file.parent / "params.yaml")
    for private in ("/.lock", f"/{WORK_DIR}"):
        _add_ignore_line(path / ".gitignore", private)
    # Pre-ignore the stage outputs exactly as `dvc commit` will, so git status is clean
    # from the first moment rather than after the first version.
    ignores = []
    for stage in STAGES.values():
        for out in stage.outputs(os.path.relpath(path, stage_file.parent)):
            out_path = stage_file.parent / out
            _add_ignore_line(out_path.parent / ".gitignore", "/" + out_path.name)
            ignores.append(out_path.parent / ".gitignore")

    if remote:
        _dvc(["remote", "add", "--default", "--force", "storage", remote], dvc_root, "dvc remote add")
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:  # S3-compatible stores (MinIO, moto, R2...) need the URL recorded
            _dvc(["remote", "modify", "storage", "endpointurl", endpoint], dvc_root, "dvc remote modify")

    tracked = [p for p in (path / "catalog.json", path / ".gitignore", stage_file, stage_file.parent / "params.yaml",
                           dvc_root / ".dvc" / "config", dvc_root / ".dvc" / ".gitignore", dvc_root / ".dvcignore",
                           *sorted(set(ignores))) if p.exists()]
    _commit(path, tracked, "subjectflow catalog: init" + (f" (remote {remote})" if remote else ""))
    return catalog


def _add_ignore_line(gitignore: Path, line: str) -> None:
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    if line not in lines:
        gitignore.write_text("\n".join([*lines, line]) + "\n")


def _commit(cwd: Path, paths: list[Path], message: str) -> str | None:
    """Commit exactly `paths` (never whatever else the user has staged); None if unchanged."""
    rel = [str(p) for p in paths]
    _git(["add", "--", *rel], cwd)
    if not _git(["diff", "--cached", "--name-only", "--", *rel], cwd).strip():
        return None
    _git(["commit", "-q", "-m", message, "--", *rel], cwd, "git commit")
    return _git(["rev-parse", "HEAD"], cwd).strip()


def has_remote(catalog: Catalog) -> bool:
    return bool(_dvc(["remote", "list"], catalog.stage_file.parent).strip())


def version_catalog(catalog: Catalog, summary: str) -> CatalogVersion | None:
    """Record the whole catalog as a new version after a run changed it.

    Every stage is committed, not just the one that ran, so each version is a complete
    catalog: a clone can `dvc pull` any version whole. Returns None when the data is
    byte-identical to the last version (an idempotent re-run).
    """
    stage_dir = catalog.stage_file.parent
    with catalog.writer():
        catalog.ensure_layout()
        commit_stages(catalog)
        number = max((v.number for v in list_versions(catalog)), default=0) + 1
        changed = [stage_dir / "dvc.lock", catalog.root / "catalog.json"]
        changed += [catalog.root / d / ".gitignore" for d in (".", "tables", "blobs")]
        commit = _commit(
            stage_dir,
            [p for p in changed if p.exists()],
            f"subjectflow catalog v{number}: {summary.splitlines()[0]}\n\n{summary}\n",
        )
    if commit is None:
        return None
    return next(v for v in list_versions(catalog) if v.commit == commit)


def _targets(catalog: Catalog) -> list[str]:
    return [f"{catalog.stage_file.name}:{stage}" for stage in STAGES]


def push_catalog(catalog: Catalog) -> bool:
    """Send the catalog's data to the DVC remote; False when no remote is configured."""
    with catalog.writer():
        if not has_remote(catalog):
            return False
        _dvc(["push", "--quiet", *_targets(catalog)], catalog.stage_file.parent, "dvc push")
    return True


def list_versions(catalog: Catalog) -> list[CatalogVersion]:
    """Versions newest first, read back from git history of the catalog's `dvc.lock`."""
    stage_dir = catalog.stage_file.parent
    lock = stage_dir / "dvc.lock"
    try:
        log = _git(["log", "--format=%H%x1f%aI%x1f%s", "--", str(lock)], stage_dir)
    except VersioningError:  # a repository with no commits yet has no versions
        return []
    versions = []
    for line in log.splitlines():
        commit, date, subject = line.split("\x1f", 2)
        match = VERSION_SUBJECT.match(subject)
        if match:
            versions.append(CatalogVersion(int(match.group(1)), commit, date, subject[match.end():]))
    return versions
