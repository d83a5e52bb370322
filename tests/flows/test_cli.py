"""The `subjectflow` command as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import build_parser, main
from tests.photos import photo_set

REPO = Path(__file__).resolve().parents[2]


def subcommands(parser, prefix=()):
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for name, sub in action.choices.items():
            yield (*prefix, name)
            yield from subcommands(sub, (*prefix, name))


def test_every_subcommand_has_help(capfd):
    commands = list(subcommands(build_parser()))
    assert {("init",), ("ingest",), ("refresh",), ("catalog", "versions"), ("catalog", "show"), ("demo",),
            ("jointsets",), ("methods",), ("tune",), ("negatives",), ("generate",), ("export",), ("evaluate",), ("dashboard",), ("benchmark",)} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0
        assert "usage: subjectflow" in capfd.readouterr().out


def test_the_console_script_is_installed():
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([bin_dir / "subjectflow", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "ingest" in out.stdout


def test_init_ingest_versions_show(tmp_path, capfd):
    source = photo_set(tmp_path / "src")
    catalog = tmp_path / "cat"
    assert main(["init", str(catalog)]) == 0
    assert main(["ingest", str(source), "--catalog", str(catalog), "--workers", "1", "--resolution", "64"]) == 0
    out = capfd.readouterr().out
    assert "6 files seen = 6 ingested" in out and "v1" in out
    assert main(["catalog", "versions", "--catalog", str(catalog)]) == 0
    assert capfd.readouterr().out.startswith("v1 ")
    assert main(["catalog", "show", "--catalog", str(catalog)]) == 0
    shown = capfd.readouterr().out
    assert "images" in shown and "red_mug" in shown and "blue_box" in shown


def test_input_errors_exit_2_with_a_message(tmp_path, capfd):
    assert main(["catalog", "show", "--catalog", str(tmp_path / "none")]) == 2
    assert "subjectflow init" in capfd.readouterr().err
    main(["init", str(tmp_path / "cat")])
    assert main(["ingest", str(tmp_path / "missing"), "--catalog", str(tmp_path / "cat")]) == 2
    assert "does not exist" in capfd.readouterr().err


def test_a_method_not_written_for_the_base_models_family_is_refused_before_any_work(tmp_path, capfd):
    main(["init", str(tmp_path / "cat")])
    args = ["tune", "--method", "sfo", "--method", "oneactor", "--subject", "mug", "--catalog", str(tmp_path / "cat"),
            "--model", "tiny-flux"]
    assert main(args) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "oneactor does not run on FLUX.1 base models (tiny-flux); it runs on " \
                                     "Stable Diffusion 1.x/2.x, SDXL: pick such a base model" in err


def test_a_typo_in_params_yaml_fails_before_any_work(tmp_path, capfd):
    main(["init", str(tmp_path / "cat")])
    params = tmp_path / "cat" / "params.yaml"
    params.write_text(params.read_text().replace("resolution:", "resolutoin:"))
    assert main(["ingest", str(photo_set(tmp_path / "src")), "--catalog", str(tmp_path / "cat")]) == 2
    assert "ingest.resolutoin" in capfd.readouterr().err


@pytest.mark.parametrize("api_url, heartbeat", [(None, None), ("http://127.0.0.1:4200/api", 180)])
def test_flows_skip_heartbeats_only_on_a_temporary_server(monkeypatch, api_url, heartbeat):
    from prefect.settings import (
        PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings,
    )

    seen = []
    parser = build_parser()
    methods = parser._subparsers._group_actions[0].choices["methods"]
    methods.set_defaults(fn=lambda args: seen.append(get_current_settings().flows.heartbeat_frequency) or 0)
    monkeypatch.setattr("flows.cli.build_parser", lambda: parser)
    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}):
        assert main(["methods"]) == 0
    assert seen == [heartbeat]


def test_the_demo_keeps_its_own_repository_and_balances(tmp_path, capfd):
    assert main(["demo", "--dir", str(tmp_path / "demo")]) == 0
    out = capfd.readouterr().out
    # One refresh builds everything as one version; the unchanged second one makes nothing;
    # the concept set is the second version, its masks scored against the drawn truth.
    assert "red_mug" in out and "latest version: v2" in out and "catalog-refresh completed" in out
    assert "nothing changed" in out and ", 0 things made" in out
    report = out[out.index("concept set scene"):]
    assert "<studio> from image:blue_bottle/00.jpg:background=studio" in report
    assert " - " not in report.split("\n")[2]  # iteration 0 of <red_mug>: an exact IoU, not "-"
    assert (tmp_path / "demo" / "dashboard" / "concepts.html").exists()
    assert (tmp_path / "demo" / "catalog" / ".git").is_dir()
    assert (tmp_path / "demo" / "dashboard" / "index.html").exists()
    assert "images              16 rows" in out


def test_prefect_yaml_deploys_the_refresh_and_ingest_flows():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"catalog-refresh", "ingest"}
    assert deployments["catalog-refresh"]["schedules"][0]["cron"] == "0 2 * * *"
    for deployment in deployments.values():
        assert deployment["work_pool"]["name"] == "subjectflow-process"
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        assert flow.name == deployment["name"]
