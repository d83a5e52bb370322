"""bench/tables.py commits a batch into a partitioned table and into one file, and compares."""

import json

from bench import tables


def test_the_tables_bench_commits_a_batch_both_ways_and_the_partitions_write_less(tmp_path, capsys):
    assert tables.main(["--sizes", "2000", "--out", str(tmp_path)]) == 0
    one_file, partitioned = json.loads((tmp_path / "results.json").read_text())
    assert not one_file["partitioned"] and partitioned["partitioned"]
    assert one_file["rows"] == partitioned["rows"] == (2000 + tables.BATCH) * tables.ROWS_PER_SUBJECT
    assert one_file["files"] == 1 and partitioned["files"] > 200
    assert partitioned["written_bytes"] < one_file["written_bytes"] / 2  # 32 subjects touch about 30 of 256 parts
    assert "2000" in capsys.readouterr().out
