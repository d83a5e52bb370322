"""bench/refine.py runs and measures both refiners against the drawn masks' truth."""

import re

from bench import refine


def test_the_refiner_bench_scores_both_refiners_against_the_exact_masks(capsys):
    assert refine.main(["--size", "64", "--per-subject", "1", "--noise", "0.1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 drawn demo photos at 64 px" in out
    row = out.strip().splitlines()[-1].split()
    values = [float(v.rstrip("x")) for v in row]  # noise, then IoU and s/image per refiner, then crf/otsu
    ious = [values[1]] + ([values[3]] if "IoU crf" in out else [])
    assert re.search(r"IoU otsu", out) and all(0.5 < v <= 1 for v in ious)  # little noise: both recover it
