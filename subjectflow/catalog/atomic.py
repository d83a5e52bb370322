"""Atomic file replacement: a reader or a crash sees the old file or the new one, never half."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(dest: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` to `dest` so that `dest` is either absent/old or complete. Without
    `sync_dir` the rename is durable only once the caller syncs the folder (`fsync_dir`),
    which one write of many files does once."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A leading dot keeps pyarrow.dataset (and DVC's users) from ever reading the temp file.
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        if sync_dir:
            fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)
