"""Engine workers on an S3 blob store (moto's real HTTP endpoint): what they make goes to the
store, the catalog folder gets it from the flow's commit, and checkpoints outlive the worker."""

import pyarrow as pa
import pytest

from subjectflow.catalog import CatalogError
from subjectflow.catalog.blobstore import BlobStore
from subjectflow.catalog.store import utcnow
from subjectflow.s3 import s3_client


@pytest.fixture
def store(s3_endpoint, request):
    bucket = f"blobs-{abs(hash(request.node.name)) % 10**8}"
    s3_client().create_bucket(Bucket=bucket)
    return BlobStore(f"s3://{bucket}/team/catalog")


def _sample_row(file: str) -> pa.Table:
    return pa.Table.from_pylist([{
        "sample_id": "s1", "subject_id": "mug", "adapter_id": "a", "method": "sft", "model_id": "m", "params": None,
        "prompt": "p", "seed": 0,
        "steps": 1, "guidance": 1.0, "resolution": 32, "base_model": "tiny", "file": file, "created_at": utcnow()}])


def test_a_workers_blobs_go_to_the_store_and_reach_the_catalog_folder_before_their_rows(catalog, store):
    worker = catalog.staging(store)
    rel = worker.put_blob("samples", b"png bytes", ".png")
    worker.upsert("samples", _sample_row(rel))
    assert not (catalog.root / rel).exists()  # the worker never wrote the catalog folder
    assert store.names("blobs/samples") == [rel.removeprefix("blobs/samples/")]
    assert worker.blob_path(rel).read_bytes() == b"png bytes"  # read back within the task
    elsewhere = catalog.staging(store, cache=catalog.root.parent / "other-worker")
    assert elsewhere.blob_path(rel).read_bytes() == b"png bytes"  # another process reads the store

    # a later task in the same process making the same bytes lists them too: the first
    # task's rows may never be committed, and then only the second one's copy brings them in
    again = catalog.staging(store)
    assert again.put_blob("samples", b"png bytes", ".png") == rel and again.made == [rel]

    catalog.commit([worker.staged], worker.made, store)
    assert (catalog.root / rel).read_bytes() == b"png bytes"
    assert catalog.read("samples").column("file").to_pylist() == [rel]


def test_rows_whose_blob_the_store_lost_are_not_committed(catalog, store):
    worker = catalog.staging(store)
    rel = worker.put_blob("samples", b"gone", ".png")
    worker.upsert("samples", _sample_row(rel))
    store.delete([rel])
    with pytest.raises(CatalogError, match="is not in the blob store"):
        catalog.commit([worker.staged], worker.made, store)
    assert catalog.read("samples").num_rows == 0


def test_checkpoints_are_mirrored_to_the_store_and_a_fresh_process_resumes_from_them(catalog, store):
    worker = catalog.staging(store)
    work = worker.work_dir("tune", "adapter-1")
    assert not work.is_relative_to(catalog.root)
    for step in (10, 20):
        (work / f"checkpoint-{step}").mkdir(parents=True)
        (work / f"checkpoint-{step}" / "state.pt").write_bytes(f"step {step}".encode())
        worker.keep_work(work / f"checkpoint-{step}")
    (work / "checkpoint-10" / "state.pt").unlink()  # the loop prunes old checkpoints...
    (work / "checkpoint-10").rmdir()
    (work / "checkpoint-30").mkdir()
    (work / "checkpoint-30" / "state.pt").write_bytes(b"step 30")
    worker.keep_work(work / "checkpoint-30")  # ...and the store follows
    assert store.names("work/tune/adapter-1") == ["checkpoint-20/state.pt", "checkpoint-30/state.pt"]

    retry = catalog.staging(store, cache=catalog.root.parent / "retry-worker").work_dir("tune", "adapter-1")
    assert (retry / "checkpoint-30" / "state.pt").read_bytes() == b"step 30"
    assert not (catalog.root / "work" / "tune").exists()


def test_an_unreachable_store_is_one_line_naming_it_and_what_to_check(catalog, s3_endpoint):
    worker = catalog.staging(BlobStore("s3://no-such-bucket/x"))
    with pytest.raises(CatalogError, match=r"cannot put s3://no-such-bucket/x/blobs/samples/.*NoSuchBucket.*"
                                           r"check execution.blob_store"):
        worker.put_blob("samples", b"x", ".png")


def test_photo_blobs_made_on_the_store_are_copied_in_not_remade_before_ingest_records_them(catalog, store, tmp_path,
                                                                                          monkeypatch):
    from subjectflow.config import IngestConfig
    from subjectflow.ingest import list_source, pipeline, plan_ingest
    from tests.photos import photo_set

    config = IngestConfig(workers=1, resolution=64, thumbnail_size=32, mask={"size": 32})
    plan = plan_ingest(list_source(str(photo_set(tmp_path / "src", per_subject=1))), catalog, config.settings_hash())
    results = list(pipeline.process_photos(plan.todo, catalog.root, config, store.uri))
    blobs = [path for result in results for path in result.blob_paths()]
    assert len(blobs) == 4 * len(results) and not any((catalog.root / path).exists() for path in blobs)

    monkeypatch.setattr(pipeline, "process_photos", lambda *a, **k: pytest.fail("a photo was processed again"))
    assert pipeline.with_blobs_present(results, catalog.root, config, store.uri) == results
    assert all((catalog.root / path).is_file() for path in blobs)


def test_a_killed_workers_private_cache_is_removed_by_the_next_process_to_make_one(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from subjectflow.catalog.blobstore import CACHE_PREFIX, process_cache

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (killed.pid, running.pid):
            (tmp_path / f"{CACHE_PREFIX}{pid}-abc" / "blobs").mkdir(parents=True)
        killed.kill()  # SIGKILL: its atexit never ran
        killed.wait()
        mine = process_cache(f"s3://bucket/{tmp_path.name}")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{CACHE_PREFIX}{running.pid}-abc", mine.name])
    finally:
        running.kill()
        running.wait()
