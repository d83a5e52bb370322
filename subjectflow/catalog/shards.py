"""`dvc commit` for a catalog version, in time that follows what changed, not the catalog's size.

DVC re-hashes every output it commits: at 10,000 subjects that is 250,000 blob files
walked for one new photo (bench/versioning.py). Blobs are content-addressed and
write-once in 256 shard folders per kind (`blobs/<kind>/<2 hex>/<sha256>`), so a shard
whose folder mtime has not moved since the last version holds the same files (adding
or removing a file moves it). Each stage is saved here as DVC's own `dvc commit --force`
saves it (deps, outputs, run cache, dvc.lock), except that a blob kind's directory
object is the last version's with only the moved shards re-listed, and only their new
files hashed and cached. tests/catalog/test_versioning.py checks that DVC's own whole
commit afterwards writes the same dvc.lock.

What the last version saw (per output: its DVC hash and each shard's mtime and size)
lives in the catalog's private work folder. Without it, or when dvc.lock no longer
holds that hash (someone ran `dvc commit` or checked out another version), the output
is saved whole, as DVC would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .layout import BLOBS_DIR, STAGES, WORK_DIR
from .atomic import atomic_write_bytes
from .store import Catalog

STATE_FILE = "versioned-shards.json"


def commit_stages(catalog: Catalog) -> None:
    """What `dvc commit --force` does for every stage, blob shards incrementally."""
    from dvc.repo import Repo

    state_path = catalog.root / WORK_DIR / STATE_FILE
    seen = _read_state(state_path)
    now: dict[str, Any] = {}
    blobs = catalog.root / BLOBS_DIR
    with _quiet_dvc(), Repo(str(catalog.stage_file.parent)) as repo, repo.lock:
        stages = [repo.stage.collect(f"{catalog.stage_file}:{name}")[0] for name in STAGES]
        for stage in stages:
            stage.save_deps()
            saved_whole = []
            for out in stage.outs:
                path = Path(out.fs_path)
                if path.parent != blobs:
                    out.save()
                    saved_whole.append(out)
                    continue
                entry = _save_shards(repo, out, path, seen.get(path.name))
                if entry is None:
                    stamps = _shard_stamps(path)  # before the walk: see _shard_stamps
                    out.save()
                    saved_whole.append(out)
                    entry = {"md5": out.hash_info.value, "size": out.meta.size, "shards": stamps}
                now[path.name] = entry
            stage.md5 = stage.compute_md5()
            repo.stage_cache.save(stage)
            for out in saved_whole:  # incremental ones cached their new files as they hashed them
                out.commit(relink=False)
        stages[0].dvcfile.dump_stages(stages, update_pipeline=False)
    atomic_write_bytes(state_path, json.dumps(now, sort_keys=True).encode())


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
    """What `dvc commit --quiet` prints: errors only (no "'blobs/x' is empty", no lock notes)."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _shard_stamps(kind_dir: Path) -> dict[str, list[int]]:
    """Each shard's [mtime_ns, total bytes]: the mtime is read before the listing, so a
    file landing meanwhile moves it past what is recorded and is seen next time."""
    stamps = {}
    for shard in _shards(kind_dir):
        mtime = shard.stat().st_mtime_ns
        stamps[shard.name] = [mtime, sum(entry.stat().st_size for entry in os.scandir(shard) if entry.is_file())]
    return stamps


def _shards(kind_dir: Path) -> list[Path]:
    return sorted(p for p in kind_dir.iterdir() if p.is_dir()) if kind_dir.is_dir() else []


def _save_shards(repo: Any, out: Any, kind_dir: Path, seen: dict | None) -> dict | None:
    """Set `out`'s hash and meta from the last version's directory object with the moved
    shards' entries replaced; None when that object is not what dvc.lock holds now (then
    the output is saved whole)."""
    from dvc_data.hashfile.hash import hash_file
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta

    if not seen or out.hash_info is None or out.hash_info.value != seen["md5"]:
        return None
    stamps, size = dict(seen["shards"]), seen["size"]
    shards = {shard.name: shard for shard in _shards(kind_dir)}
    moved = {name for name in shards if stamps.get(name, [None])[0] != shards[name].stat().st_mtime_ns}
    moved |= set(stamps) - set(shards)  # a shard folder that is gone
    if not moved:
        return seen  # the hash and meta dvc.lock holds stand; nothing to load
    try:
        old = json.loads(Path(out.cache.oid_to_path(out.hash_info.value)).read_text())
    except (FileNotFoundError, ValueError):
        return None
    # DVC's directory object (dvc_data's Tree.as_bytes): [{"md5", "relpath"}] sorted by
    # relpath, dumped with sorted keys. Built here as JSON: loading it as a Tree costs
    # ~1 s per 100,000 files, which is what this module exists to avoid.
    known = {entry["relpath"]: entry["md5"] for entry in old if entry["relpath"].split("/", 1)[0] in moved}
    entries = [entry for entry in old if entry["relpath"].split("/", 1)[0] not in moved]
    for name in sorted(moved):
        size -= stamps.pop(name, [0, 0])[1]
        if name not in shards:
            continue
        mtime, shard_size = shards[name].stat().st_mtime_ns, 0
        for entry in os.scandir(shards[name]):
            if not entry.is_file():
                continue
            relpath = f"{name}/{entry.name}"
            md5 = known.get(relpath)  # content-addressed: the same name is the same bytes
            if md5 is None:
                md5 = hash_file(entry.path, out.fs, out.hash_name, state=repo.state)[1].value
                out.cache.add(entry.path, out.fs, md5)
            entries.append({"md5": md5, "relpath": relpath})
            shard_size += entry.stat().st_size
        stamps[name] = [mtime, shard_size]
        size += shard_size
    entries.sort(key=lambda entry: entry["relpath"])
    manifest = json.dumps(entries, sort_keys=True).encode()
    out.hash_info = HashInfo(out.hash_name, hashlib.md5(manifest).hexdigest() + ".dir")
    if not out.cache.exists(out.hash_info.value):
        with tempfile.NamedTemporaryFile(dir=repo.tmp_dir) as tmp:  # cached as DVC caches: a read-only copy
            tmp.write(manifest)
            tmp.flush()
            out.cache.add(tmp.name, out.fs, out.hash_info.value)
    out.obj = None
    out.meta = Meta(size=size, nfiles=len(entries), isdir=True)
    out.files = None
    return {"md5": out.hash_info.value, "size": size, "shards": stamps}
