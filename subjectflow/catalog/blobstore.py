"""Where engine workers put what they make when they share no writable folder with the
flow: an S3 prefix (`execution.blob_store: s3://bucket/prefix`).

Keys mirror the catalog's own relative paths (`blobs/<kind>/<xx>/<sha256>`, `work/...`).
A worker reads tables and the flow's blobs from the catalog folder (a read-only mount is
enough), and puts its blobs and training checkpoints here. The flow copies a task's blobs
into the catalog folder before it commits the task's rows (`Catalog.commit`), so DVC
versions the folder as ever and no row names a blob the folder lacks. A task retried on
another machine after its worker died resumes from the checkpoints kept here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from ..s3 import s3_client, split_s3_uri
from .store import CatalogError


class BlobStore:
    def __init__(self, uri: str) -> None:
        try:
            self.bucket, prefix = split_s3_uri(uri)
        except ValueError as exc:
            raise CatalogError(f"execution.blob_store: {exc}") from None
        self.uri, self.prefix = uri.rstrip("/"), prefix.strip("/")

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def put(self, rel: str, data: bytes) -> None:
        """One object per call: S3 makes it visible whole or not at all."""
        with self._failing("put", rel):
            s3_client().put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def put_file(self, rel: str, path: Path) -> None:
        """A file of any size (multipart, streamed): a joint model's checkpoint holds a whole UNet."""
        with self._failing("put", rel):
            s3_client().upload_file(str(path), self.bucket, self._key(rel))

    def fetch(self, rel: str, dest: Path) -> bool:
        """Copy `rel` to `dest` whole (temp file + rename); False when the store has no such object."""
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            with self._failing("read", rel):
                try:
                    s3_client().download_file(self.bucket, self._key(rel), str(tmp))
                except ClientError as exc:
                    if exc.response["Error"].get("Code") in ("404", "NoSuchKey"):
                        return False
                    raise
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def names(self, rel: str) -> list[str]:
        """Every object under the folder `rel`, as paths relative to it."""
        prefix = self._key(rel).rstrip("/") + "/"
        with self._failing("list", rel):
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return sorted(obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", []))

    def delete(self, rels: list[str]) -> None:
        for start in range(0, len(rels), 1000):  # S3's limit per request
            objects = [{"Key": self._key(rel)} for rel in rels[start:start + 1000]]
            with self._failing("delete", rels[start]):
                s3_client().delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    @contextlib.contextmanager
    def _failing(self, verb: str, rel: str) -> Iterator[None]:
        """boto's errors as one line naming the object and what to check."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            code = exc.response["Error"].get("Code", "") if isinstance(exc, ClientError) else type(exc).__name__
            raise CatalogError(f"cannot {verb} {self.uri}/{rel}: {code or exc}; check execution.blob_store, "
                               "the AWS credentials and AWS_ENDPOINT_URL") from exc


CACHE_PREFIX = "subjectflow-store-"  # then the owning process's id


@functools.lru_cache(maxsize=None)
def process_cache(uri: str) -> Path:
    """This process's copies of what it put to or read from the store at `uri`: private, so
    a retry in another process reads the store, never a dead worker's leftovers."""
    import atexit

    _remove_dead_caches()
    folder = Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _remove_dead_caches() -> None:
    """The caches of processes that died without running atexit: a SIGKILLed worker's."""
    for folder in Path(tempfile.gettempdir()).glob(f"{CACHE_PREFIX}*-*"):
        pid = folder.name.removeprefix(CACHE_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
