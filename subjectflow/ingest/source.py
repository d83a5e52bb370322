"""Where photo sets come from: a local folder or an S3 prefix, one sub-folder per subject.

Layout: `SOURCE/<subject>/<photo>`; a subject's class noun comes from
`SOURCE/<subject>/subject.json` (`{"class": "teapot"}`), else `SOURCE/subjects.csv`
(`subject,class`), else the folder name's last word (`duck_toy` -> `toy`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .. import s3

# Names that are never photos: OS and editor droppings, not user data.
SYSTEM_FILES = {"Thumbs.db", "desktop.ini", "Icon\r"}
SUBJECT_META = "subject.json"
SUBJECTS_CSV = "subjects.csv"
DREAMBENCH_META = "prompts_and_classes.txt"  # DreamBench's own layout: its class table is read too
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


class SourceError(RuntimeError):
    """The source cannot be listed; the message says what to fix."""


@dataclass(frozen=True)
class SourceFile:
    uri: str  # absolute path, or s3://bucket/key
    subject: str
    size: int
    # Cheap change detector from the listing alone: size + mtime (local) or ETag (S3).
    fingerprint: str

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.uri).suffix.lower()


@dataclass
class Listing:
    source: str
    photos: list[SourceFile] = field(default_factory=list)  # every candidate, good or bad
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (uri, why)
    rejected: list[tuple[str, str | None, str]] = field(default_factory=list)  # (uri, subject, reason)
    classes: dict[str, str] = field(default_factory=dict)  # subject -> class noun

    @property
    def seen(self) -> int:
        return len(self.photos) + len(self.ignored) + len(self.rejected)


def class_from_folder(name: str) -> str:
    words = [w for w in re.split(r"[_\-\s]+", name) if w]
    last = re.sub(r"\d+$", "", words[-1]).lower() if words else ""
    return last or name


class _Entry:
    """One listed object, before it is sorted into photos / ignored / rejected."""

    def __init__(self, rel: str, uri: str, size: int, fingerprint: str):
        self.rel, self.uri, self.size, self.fingerprint = rel, uri, size, fingerprint


def dreambench_classes(text: str) -> dict[str, str]:
    """The `subject_name,class` table at the top of DreamBench's prompts_and_classes.txt."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "subject_name,class")
    except StopIteration:
        raise ValueError("no 'subject_name,class' table") from None
    classes = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        subject, _, noun = line.partition(",")
        classes[subject.strip()] = noun.strip()
    return classes


def _sort_entries(source: str, entries: list[_Entry], read_text) -> Listing:
    listing = Listing(source)
    csv_classes: dict[str, str] = {}
    json_classes: dict[str, str] = {}
    for entry in sorted(entries, key=lambda e: e.rel):
        parts = PurePosixPath(entry.rel).parts
        name = parts[-1]
        if name.startswith(".") or name in SYSTEM_FILES or any(p.startswith(".") for p in parts[:-1]):
            listing.ignored.append((entry.uri, "hidden or system file"))
            continue
        subject = parts[0] if len(parts) > 1 else None
        if name in (SUBJECTS_CSV, SUBJECT_META, DREAMBENCH_META) and len(parts) <= 2:
            try:
                if name == SUBJECTS_CSV and subject is None:
                    rows = csv.DictReader(io.StringIO(read_text(entry)))
                    csv_classes.update({r["subject"].strip(): r["class"].strip() for r in rows})
                elif name == DREAMBENCH_META and subject is None:
                    csv_classes.update(dreambench_classes(read_text(entry)))
                elif name == SUBJECT_META and subject is not None:
                    json_classes[subject] = str(json.loads(read_text(entry))["class"]).strip()
                else:
                    raise ValueError(f"{name} belongs {'inside a subject folder' if name == SUBJECT_META else 'at the source root'}")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
                listing.rejected.append((entry.uri, subject, f"unreadable subject metadata: {exc!r}"))
            else:
                listing.ignored.append((entry.uri, "subject metadata (read)"))
            continue
        if subject is None:
            if PurePosixPath(name).suffix.lower() in PHOTO_SUFFIXES:
                listing.rejected.append((entry.uri, None, "photo is not inside a subject folder"))
            else:
                listing.ignored.append((entry.uri, "not a photo, outside any subject folder"))
            continue
        listing.photos.append(SourceFile(entry.uri, subject, entry.size, entry.fingerprint))
    for subject in sorted({p.subject for p in listing.photos}):
        listing.classes[subject] = json_classes.get(subject) or csv_classes.get(subject) or class_from_folder(subject)
    return listing


def list_local(root: Path) -> Listing:
    root = Path(root).expanduser()
    if not root.exists():
        raise SourceError(f"source folder {root} does not exist; pass a folder with one sub-folder per subject")
    if not root.is_dir():
        raise SourceError(f"source {root} is a file; pass the folder that holds the subject folders")
    root = root.resolve()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError as exc:  # a dangling link or a file removed mid-listing
                entries.append(_Entry(path.relative_to(root).as_posix(), str(path), -1, f"unstatable:{exc.errno}"))
                continue
            entries.append(_Entry(path.relative_to(root).as_posix(), str(path), st.st_size, f"{st.st_size}:{st.st_mtime_ns}"))
    return _sort_entries(str(root), entries, lambda e: Path(e.uri).read_text())


def split_s3_uri(uri: str) -> tuple[str, str]:
    try:
        return s3.split_s3_uri(uri)
    except ValueError as exc:
        raise SourceError(str(exc)) from None


def _s3_failure(uri: str, exc: Exception) -> SourceError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return SourceError(f"no AWS credentials for {uri}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, EndpointConnectionError):
        return SourceError(f"cannot reach the S3 endpoint for {uri} ({exc}); check AWS_ENDPOINT_URL and the network")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return SourceError(f"bucket in {uri} does not exist; check the bucket name (and AWS_ENDPOINT_URL)")
        return SourceError(f"S3 refused to list {uri}: {code or exc}; check the credentials' permissions")
    return SourceError(f"cannot list {uri}: {exc}")


def list_s3(uri: str) -> Listing:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    entries = []
    try:
        for page in s3.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # console-made "folder" placeholders
                    continue
                rel = obj["Key"][len(prefix):]
                etag = obj.get("ETag", "").strip('"')
                entries.append(_Entry(rel, f"s3://{bucket}/{obj['Key']}", obj["Size"], f"{obj['Size']}:{etag}"))
    except (BotoCoreError, ClientError) as exc:
        raise _s3_failure(uri, exc) from exc
    return _sort_entries(uri, entries, lambda e: read_bytes(e.uri).decode())


def list_source(source: str) -> Listing:
    return list_s3(source) if source.startswith("s3://") else list_local(Path(source))


def read_bytes(uri: str) -> bytes:
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        return s3.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()
