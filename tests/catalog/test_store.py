import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from subjectflow.catalog import TABLES, Catalog, CatalogBusy, CatalogError, CatalogNotFound
from subjectflow.catalog.schemas import SAMPLES, SOURCE_FILES, VERSION_KEY
from subjectflow.catalog.tables import TableFiles
from subjectflow.catalog.store import utcnow


def ledger_rows(n: int, start: int = 0, outcome: str = "ingested") -> pa.Table:
    now = utcnow()
    return pa.Table.from_pylist(
        [{"source_uri": f"/src/{i}.jpg", "fingerprint": "1:1", "settings": "s", "outcome": outcome,
          "detail": None, "sha256": None, "image_id": None, "seen_at": now} for i in range(start, start + n)],
        schema=SOURCE_FILES.schema)


def test_every_table_has_an_explicit_versioned_schema_readable_with_pyarrow_dataset(catalog):
    for name, spec in TABLES.items():
        table = ds.dataset(catalog.root / "tables" / name).to_table()
        assert table.schema.equals(spec.schema, check_metadata=False)
        paths = TableFiles(catalog.table_dir(name), spec).paths()
        assert paths and all(pq.read_schema(p).metadata[VERSION_KEY] == str(spec.version).encode() for p in paths)


def test_write_rejects_rows_that_do_not_fit_the_schema(catalog):
    with pytest.raises(CatalogError, match="do not match its schema"):
        catalog.write("subjects", pa.table({"subject_id": ["a"]}))


def test_a_newer_schema_version_is_refused_with_advice(catalog):
    path = catalog.table_dir("subjects") / "data.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: b"99"}), path)
    with pytest.raises(CatalogError, match="schema version 99"):
        catalog.read("subjects")


def test_opening_a_missing_catalog_says_how_to_create_one(tmp_path):
    with pytest.raises(CatalogNotFound, match="subjectflow init"):
        Catalog.open(tmp_path / "nowhere")


def test_upsert_replaces_rows_with_the_same_key(catalog):
    catalog.upsert("source_files", ledger_rows(3))
    catalog.upsert("source_files", ledger_rows(2, start=2, outcome="duplicate"))
    rows = {r["source_uri"]: r["outcome"] for r in catalog.read("source_files").to_pylist()}
    assert rows == {"/src/0.jpg": "ingested", "/src/1.jpg": "ingested", "/src/2.jpg": "duplicate", "/src/3.jpg": "duplicate"}


def test_a_failed_write_leaves_the_previous_table_and_no_visible_temp_file(catalog, monkeypatch):
    catalog.write("source_files", ledger_rows(5))

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)  # after the temp file's bytes, before its rename
    with pytest.raises(OSError, match="disk full"):
        catalog.write("source_files", ledger_rows(50))
    monkeypatch.undo()
    assert ds.dataset(catalog.table_dir("source_files")).to_table().num_rows == 5
    assert os.listdir(catalog.table_dir("source_files")) == ["data.parquet"]


KILL_WRITER = """
import sys
from pathlib import Path
from subjectflow.catalog import Catalog
from tests.catalog.test_store import ledger_rows
catalog = Catalog.open(Path(sys.argv[1]))
big = ledger_rows(200_000)
print("ready", flush=True)
while True:
    catalog.write("source_files", big)
"""


def test_a_writer_killed_mid_write_never_leaves_a_half_written_table(catalog):
    catalog.write("source_files", ledger_rows(7))
    repo = Path(__file__).resolve().parents[2]
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(catalog.root)], cwd=repo,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = ds.dataset(catalog.table_dir("source_files")).to_table().num_rows
        assert rows in (7, 200_000)  # the old table or a whole new one, never a torn file


def _append_rows(root: str, start: int, n: int) -> None:
    catalog = Catalog.open(Path(root))
    for i in range(start, start + n):
        with catalog.writer():
            catalog.upsert("source_files", ledger_rows(1, start=i))


def test_concurrent_writers_are_serialised_and_lose_no_update(catalog):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_rows, args=(str(catalog.root), k * 100, 15)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert catalog.read("source_files").num_rows == 45


def _hold_lock(root: str, ready, release) -> None:
    with Catalog.open(Path(root)).writer():
        ready.set()
        release.wait(60)


def test_a_second_writer_gives_up_with_a_clear_message_after_the_timeout(catalog):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(catalog.root), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        impatient = Catalog.open(catalog.root, lock_timeout_s=0.3)
        with pytest.raises(CatalogBusy, match="locked by another writer.*SUBJECTFLOW_LOCK_TIMEOUT_S"):
            with impatient.writer():
                pass
    finally:
        release.set()
        holder.join(60)


def test_blobs_are_content_addressed_and_stored_once(catalog):
    a = catalog.put_blob("masks", b"same", ".png")
    b = catalog.put_blob("masks", b"same", ".png")
    assert a == b and catalog.blob_path(a).read_bytes() == b"same"
    with pytest.raises(KeyError, match="unknown blob kind"):
        catalog.put_blob("nonsense", b"x", ".bin")


def test_upsert_on_a_composite_key_with_a_numeric_part(catalog):
    from subjectflow.catalog.schemas import TRAIN_LOG

    def log(rows):
        return pa.Table.from_pylist([{"adapter_id": "a", "step": s, "metric": "loss", "value": v} for s, v in rows],
                                    schema=TRAIN_LOG.schema)

    catalog.upsert("train_log", log([(1, 0.5), (2, 0.4)]))
    catalog.upsert("train_log", log([(2, 0.3), (3, 0.2)]))
    assert sorted((r["step"], r["value"]) for r in catalog.read("train_log").to_pylist()) == [(1, 0.5), (2, 0.3), (3, 0.2)]


def test_the_lock_timeout_comes_from_the_environment(catalog, monkeypatch):
    monkeypatch.setenv("SUBJECTFLOW_LOCK_TIMEOUT_S", "42")
    assert Catalog.open(catalog.root).lock_timeout_s == 42.0


def test_a_table_from_an_older_schema_version_reads_with_its_new_columns_as_nulls(catalog):
    old_fields = [f for f in SAMPLES.schema if f.name not in dict(SAMPLES.added)]
    old_schema = pa.schema(old_fields, metadata={**SAMPLES.schema.metadata, VERSION_KEY: b"1"})
    row = {f.name: None for f in old_fields} | {
        "sample_id": "s1", "method": "sft", "prompt": "p", "seed": 0, "steps": 1, "guidance": 1.0, "resolution": 32,
        "base_model": "tiny", "file": "blobs/samples/x.png", "created_at": utcnow()}
    folder = catalog.table_dir("samples")
    for path in folder.iterdir():  # as an older release left it: one file, no partitions
        path.unlink()
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), folder / "data.parquet")

    table = catalog.read("samples")
    assert table.schema.equals(SAMPLES.schema) and table.to_pylist()[0]["model_id"] is None
    assert table.to_pylist()[0]["sample_id"] == "s1"
    # its next write partitions it, at the current version, with the old row kept
    catalog.upsert("samples", pa.Table.from_pylist([{**table.to_pylist()[0], "sample_id": "s2"}]))
    assert not (folder / "data.parquet").exists() and (folder / "_manifest.json").exists()
    assert sorted(catalog.read("samples").column("sample_id").to_pylist()) == ["s1", "s2"]


def test_a_staging_catalog_reads_back_its_rows_writes_no_table_and_the_flow_commits_them_once(catalog, monkeypatch):
    catalog.upsert("source_files", ledger_rows(2))
    before = (catalog.table_dir("source_files") / "data.parquet").read_bytes()
    worker, other = catalog.staging(), catalog.staging()
    monkeypatch.setattr(Catalog, "_lock", lambda self: pytest.fail("a staging catalog took the write lock"))
    with worker.writer():
        worker.upsert("source_files", ledger_rows(2, start=1, outcome="quarantined"))  # one replaces a row
    other.upsert("source_files", ledger_rows(1, start=2, outcome="quarantined"))  # the same row, twice staged
    assert sorted(worker.read("source_files").column("outcome").to_pylist()) == ["ingested", "quarantined",
                                                                                  "quarantined"]
    assert (catalog.table_dir("source_files") / "data.parquet").read_bytes() == before
    with pytest.raises(CatalogError, match="never replaces a table"):
        worker.write("source_files", ledger_rows(1))

    monkeypatch.undo()
    catalog.commit([worker.staged, other.staged])
    rows = catalog.read("source_files").to_pylist()
    assert sorted((r["source_uri"], r["outcome"]) for r in rows) == [
        ("/src/0.jpg", "ingested"), ("/src/1.jpg", "quarantined"), ("/src/2.jpg", "quarantined")]
