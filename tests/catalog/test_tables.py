"""Partitioned tables: an upsert rewrites only its subjects' partitions, and a crash mid-write
leaves the previous table."""

import pyarrow as pa
import pytest

import subjectflow.catalog.tables as tables
from subjectflow.catalog import CatalogError
from subjectflow.catalog.schemas import METRICS, SAMPLES
from subjectflow.catalog.store import utcnow
from subjectflow.catalog.tables import PART_MANIFEST, TableFiles


def rows(spec, subjects, value=0.0, **fixed):
    """One filler row per subject, keyed by it."""
    def filler(f):
        if pa.types.is_string(f.type):
            return f"{f.name}-x"
        if pa.types.is_list(f.type):
            return []
        if pa.types.is_timestamp(f.type):
            return utcnow()
        return 0
    made = [{f.name: filler(f) for f in spec.schema} | {"subject_id": s, spec.key[0]: f"id-{s}", "value": value}
            | fixed for s in subjects]
    return pa.Table.from_pylist(made, schema=spec.schema)


def part_files(catalog, name):
    return {p.name for p in catalog.table_dir(name).glob("part-*.parquet")}


def test_an_upsert_rewrites_only_the_partitions_of_its_subjects(catalog, monkeypatch):
    subjects = [f"subject-{i}" for i in range(300)]
    catalog.upsert("metrics", rows(METRICS, subjects))
    before = part_files(catalog, "metrics")
    assert 150 < len(before) <= tables.PARTITIONS  # 300 subjects over 256 buckets

    encoded = []
    monkeypatch.setattr(tables, "_parquet_bytes", lambda t, encode=tables._parquet_bytes: encoded.append(t) or encode(t))
    catalog.upsert("metrics", rows(METRICS, ["subject-7"], value=1.0))  # replaces that subject's row
    neighbours = sum(tables.bucket_of(s) == tables.bucket_of("subject-7") for s in subjects)
    assert [t.num_rows for t in encoded] == [neighbours]  # only its partition was read, merged and encoded
    after = part_files(catalog, "metrics")
    assert len(after - before) == 1 and len(before - after) == 1  # one part rewritten, the old one removed
    values = {r["subject_id"]: r["value"] for r in catalog.read("metrics").to_pylist()}
    assert len(values) == 300 and values["subject-7"] == 1.0 and values["subject-8"] == 0.0

    catalog.write("metrics", catalog.read("metrics"))  # the same rows: every part file stays
    assert part_files(catalog, "metrics") == after


def test_rows_without_a_subject_have_a_partition_of_their_own(catalog):
    catalog.upsert("samples", rows(SAMPLES, ["a", "b"]))
    base = rows(SAMPLES, ["base"]).to_pylist()[0] | {"subject_id": None}
    catalog.upsert("samples", pa.Table.from_pylist([base], schema=SAMPLES.schema))
    assert sorted(map(str, catalog.read("samples").column("subject_id").to_pylist())) == ["None", "a", "b"]
    assert any(name.startswith(f"part-{tables.NULL_BUCKET}-") for name in part_files(catalog, "samples"))


def test_a_crash_before_the_manifest_is_replaced_leaves_the_previous_table(catalog, monkeypatch):
    catalog.upsert("metrics", rows(METRICS, ["a", "b", "c"]))
    before = catalog.read("metrics").to_pylist()
    write = tables.atomic_write_bytes

    def crash_at_the_manifest(dest, data, **kw):
        if dest.name == PART_MANIFEST:
            raise OSError("killed")
        write(dest, data, **kw)

    monkeypatch.setattr(tables, "atomic_write_bytes", crash_at_the_manifest)
    with pytest.raises(OSError, match="killed"):
        catalog.upsert("metrics", rows(METRICS, ["a", "d"], value=2.0))
    monkeypatch.undo()
    assert catalog.read("metrics").to_pylist() == before  # the new parts are there, but no manifest names them
    listed = set(TableFiles(catalog.table_dir("metrics"), METRICS).paths())
    assert len(part_files(catalog, "metrics")) > len(listed)

    catalog.upsert("metrics", rows(METRICS, ["e"]))  # the next write removes what no manifest lists
    assert {p.name for p in TableFiles(catalog.table_dir("metrics"), METRICS).paths()} == part_files(catalog, "metrics")
    assert sorted(r["subject_id"] for r in catalog.read("metrics").to_pylist()) == ["a", "b", "c", "e"]


def test_a_part_file_that_cannot_be_read_is_one_line_naming_it_and_the_fix(catalog, monkeypatch):
    catalog.upsert("metrics", rows(METRICS, ["a"]))
    monkeypatch.setattr(tables, "_PARTS", tables._PartCache())  # as a fresh process finds it
    part = next(p for p in TableFiles(catalog.table_dir("metrics"), METRICS).paths())
    part.write_bytes(part.read_bytes()[:20])  # truncated
    with pytest.raises(CatalogError, match=r"table 'metrics': cannot read .*dvc checkout") as failed:
        catalog.read("metrics")
    assert part.name in str(failed.value) and "\n" not in str(failed.value)
