"""A real HTTP S3 endpoint on this machine, for the suite and the benchmarks alike."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """moto's ThreadedMotoServer on 127.0.0.1; yields its URL. While it runs, AWS_ENDPOINT_URL
    and dummy credentials point boto3 and DVC's s3fs at it, in this process and every one it
    starts (cluster workers included); afterwards the environment is as it was."""
    from moto.server import ThreadedMotoServer

    from subjectflow.s3 import s3_client

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {key: os.environ.get(key) for key in AWS_ENV}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    s3_client.cache_clear()
    try:
        yield f"http://{host}:{port}"
    finally:
        s3_client.cache_clear()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
