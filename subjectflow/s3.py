"""The one S3 client a process uses, for photo sources and the workers' blob store alike."""

from __future__ import annotations

import functools
import re


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix); ValueError naming the form otherwise."""
    match = re.match(r"^s3://([^/]+)/?(.*)$", uri)
    if not match:
        raise ValueError(f"{uri!r} is not an S3 URI; use s3://bucket/prefix")
    return match.group(1), match.group(2)


@functools.lru_cache(maxsize=1)
def s3_client():
    """One client per process; boto3 clients are not safe to share across fork/spawn.

    Honours the standard credential chain and AWS_ENDPOINT_URL (S3-compatible stores);
    'standard' retry mode retries throttling and transient network errors with backoff.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", config=BotoConfig(retries={"max_attempts": 8, "mode": "standard"}))
