"""The install is what the README says: one console script, schemas in the wheel, help with examples."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.data.schemas import load_schema, schemas_dir, validation_rules

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_every_command_has_help_with_an_example() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    commands = [c.name for c in app.registered_commands]
    assert "validate" in commands
    for name in commands:
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0 and "Example" in sub.stdout, name
        assert name in ROOT.joinpath("README.md").read_text(), f"{name} is not documented in README.md"


def test_ci_runs_the_readme_test_command() -> None:
    readme = ROOT.joinpath("README.md").read_text()
    block = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```", readme, re.S)
    assert block is not None, "README.md lost its marked test command"
    assert "pytest" in block.group(1) and "HF_HUB_OFFLINE=1" in block.group(1)
    ci = ROOT.joinpath(".ci/run").read_text()
    assert "<!-- test-command -->" in ci  # .ci/run extracts the command from the README, so they cannot drift


def test_every_rule_in_the_catalogue_is_exercised_by_a_test() -> None:
    tests = "".join(p.read_text() for p in ROOT.joinpath("tests").glob("test_validate*.py"))
    missing = [r["id"] for r in validation_rules()["rules"] if r["id"] not in tests]
    assert not missing, f"rules without a test: {missing}"


def test_schema_files_parse() -> None:
    for name in ("logs.nested", "logs.long", "outcomes", "conversations", "messages"):
        assert load_schema(name).arrow_schema().names == load_schema(name).names
    assert schemas_dir().name == "schemas"


@pytest.mark.slow
def test_wheel_ships_schemas_and_cli(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("itpo_batch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # Only our own namespace in site-packages: no top-level `cli` (a name any project may own).
    assert {n.split("/")[0] for n in names} == {"itpo_batch", wheel.name.split("-py3")[0] + ".dist-info"}
    for f in ROOT.joinpath("schemas").glob("*.json"):
        assert f"itpo_batch/schemas/{f.name}" in names
    for f in ROOT.joinpath("cli").glob("*.py"):  # the top-level cli/ folder, shipped inside the package
        assert f"itpo_batch/cli/{f.name}" in names
    assert "itpo_batch/__main__.py" in names and "itpo_batch/data/validate.py" in names
    assert "itpo_batch/sim/envs/medical_kb.json" in names  # task data ships with the code
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "itpo-batch = itpo_batch.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_python_m_itpo_batch_runs_the_cli(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "itpo_batch", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "Usage: itpo-batch" in res.stdout and "iterate" in res.stdout
