"""The repository's dvc.yaml, the catalog layout and the import layers agree."""

import ast
from pathlib import Path

import yaml

from subjectflow.catalog.layout import STAGES, render_dvc_stages
from subjectflow.catalog.schemas import TABLES
from subjectflow.config import Config

REPO = Path(__file__).resolve().parents[2]


def test_dvc_yaml_outputs_and_params_agree_with_the_catalog_layout():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    expected = render_dvc_stages("catalog")
    assert set(declared) == set(expected) == set(STAGES)
    for name, stage in expected.items():
        assert declared[name]["outs"] == stage["outs"]
        assert declared[name]["params"] == stage["params"]
        assert declared[name]["cmd"] == stage["cmd"]


def test_every_table_is_owned_by_exactly_one_stage():
    owned = [t for s in STAGES.values() for t in s.tables]
    assert sorted(owned) == sorted(TABLES)


def test_params_yaml_is_a_valid_complete_config():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert Config.model_validate(params) == Config()
    assert set(params) == set(Config.model_fields)


def _imports(package: str) -> dict[str, set[str]]:
    """Top-level modules each file of `package` imports, by path relative to the repository."""
    found = {}
    for path in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_layers_import_only_downwards():
    core = _imports("subjectflow")
    assert not set().union(*core.values()) & {"prefect", "flows", "tasks"}
    assert not set().union(*_imports("tasks").values()) & {"flows"}
    # DVC runs through its command line, except where a version's lock is written (shards.py)
    assert {path for path, names in core.items() if names & {"dvc", "dvc_data"}} == {"subjectflow/catalog/shards.py"}


def test_negatives_that_would_never_denoise_are_refused_with_the_fix():
    import pytest

    from subjectflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="raise negatives.steps to at least 2"):
        load_config(overrides={"negatives": {"steps": 1, "strength": 0.6}})
