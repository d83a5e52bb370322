"""bench/versioning.py versions a real DVC catalog at two sizes and reports the growth."""

from bench import versioning


def test_the_versioning_bench_times_one_new_photo_at_each_size(tmp_path, capsys):
    assert versioning.main(["--sizes", "2", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] and all(w.isdigit() for w in line.split()[:2])]
    assert [int(r[0]) for r in rows] == [2, 20]
    assert [int(r[1]) for r in rows] == [2 * versioning.BLOBS_PER_SUBJECT + 4, 20 * versioning.BLOBS_PER_SUBJECT + 4]
    assert "2 -> 20 subjects: one photo x" in out
