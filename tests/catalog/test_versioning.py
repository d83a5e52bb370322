import subprocess
import sys

import yaml

from subjectflow.catalog import Catalog, init_catalog, list_versions, version_catalog
from subjectflow.config import Config


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_init_outside_any_repo_makes_a_git_and_dvc_repository(catalog):
    assert (catalog.root / ".git").is_dir() and (catalog.root / ".dvc").is_dir()
    assert catalog.stage_file == catalog.root / "dvc.yaml"
    assert "subjectflow catalog: init" in git(catalog.root, "log", "--format=%s")
    assert git(catalog.root, "status", "--porcelain") == ""


def test_init_is_idempotent(catalog):
    again = init_catalog(catalog.root, Config())
    assert again.manifest == catalog.manifest


def test_a_version_is_recorded_only_when_the_data_changed(catalog):
    first = version_catalog(catalog, "first")
    assert first.number == 1
    assert version_catalog(catalog, "nothing new") is None
    catalog.put_blob("photos", b"new photo", ".jpg")
    second = version_catalog(catalog, "one more photo")
    assert second.number == 2
    assert [v.number for v in list_versions(catalog)] == [2, 1]
    lock = yaml.safe_load((catalog.root / "dvc.lock").read_text())
    assert {o["path"] for o in lock["stages"]["ingest"]["outs"]} >= {"tables/images", "blobs/photos"}
    assert git(catalog.root, "status", "--porcelain") == ""


def test_inside_a_project_the_projects_dvc_yaml_is_used_and_user_changes_stay_uncommitted(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    from subjectflow.catalog.layout import render_dvc_stages

    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": render_dvc_stages("catalog")}))
    (project / "params.yaml").write_text(yaml.safe_dump(Config().model_dump()))
    (project / "work.py").write_text("print('unfinished')\n")
    git(project, "add", "work.py")

    catalog = init_catalog(project / "catalog", Config())
    assert catalog.stage_file == project / "dvc.yaml"
    assert version_catalog(Catalog.open(project / "catalog"), "first").number == 1
    committed = git(project, "show", "--name-only", "--format=", "HEAD").split()
    assert "dvc.lock" in committed and "work.py" not in committed
    assert "A  work.py" in git(project, "status", "--porcelain")


def _dvc_lock(catalog) -> str:
    return (catalog.stage_file.parent / "dvc.lock").read_text()


def test_a_version_rehashes_only_the_blob_shards_that_moved_and_writes_the_lock_dvc_would(catalog, monkeypatch):
    from dvc.output import Output

    from subjectflow.catalog.layout import BLOBS_DIR
    from subjectflow.catalog.store import BLOB_KINDS

    for i in range(40):
        catalog.put_blob("photos" if i % 2 else "samples", f"blob {i}".encode(), ".bin")
    version_catalog(catalog, "first")  # nothing recorded yet: every output saved whole
    saved_whole = []
    save = Output.save
    monkeypatch.setattr(Output, "save", lambda self: (saved_whole.append(self.fs_path), save(self))[1])

    catalog.put_blob("photos", b"one new photo", ".bin")
    gone = sorted((catalog.root / BLOBS_DIR / "samples").rglob("*.bin"))[0]
    gone.unlink()  # a shard losing a file moves too
    for leftover in gone.parent.iterdir():
        leftover.unlink()
    gone.parent.rmdir()  # and one that is gone altogether
    assert version_catalog(catalog, "one new photo, one shard less").number == 2
    blob_dirs = {str(catalog.root / BLOBS_DIR / kind) for kind in BLOB_KINDS}
    assert saved_whole and not blob_dirs & set(saved_whole)  # tables still saved, no blob kind walked

    incremental = _dvc_lock(catalog)
    subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], cwd=catalog.stage_file.parent,
                   check=True, capture_output=True)
    assert _dvc_lock(catalog) == incremental  # DVC's own whole commit agrees, hash for hash
    lock = yaml.safe_load(incremental)
    photos = next(o for o in lock["stages"]["ingest"]["outs"] if o["path"] == "blobs/photos")
    assert photos["nfiles"] == 21 and photos["size"] == sum(
        p.stat().st_size for p in (catalog.root / BLOBS_DIR / "photos").rglob("*.bin"))
