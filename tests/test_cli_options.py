"""The CLI speaks one dialect: this walks every command of the click tree and checks the shared options.

``-o/--output`` is what a command writes, ``--run`` a run it reads, ``--run-dir`` one it writes, ``-r`` is
``--rounds`` only, ``-m/--model`` and ``-f/--format`` (one enum) mean the same everywhere; a short alias
means one long option in every command, and option defaults come from the config dataclasses
(:func:`itpo_batch.cli.common.from_config`), not from copied literals.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from itpo_batch.cli.common import Format, FromConfig
from itpo_batch.cli.main import app

runner = CliRunner(env={"COLUMNS": "200"})  # wide: rich does not wrap the messages checked
COMMANDS = get_command(app).commands  # name -> click command
# The shared options: long name -> its one short alias (None: it has none).
SHARED = {
    "--output": "-o",
    "--rounds": "-r",
    "--model": "-m",
    "--format": "-f",
    "--run": None,
    "--run-dir": None,
    "--overwrite": None,
}
OLD_SPELLINGS = {"--out", "--out-dir", "--output-dir", "--outdir", "--run-directory"}
PATHS = ("--output", "--run", "--run-dir")  # each a pathlib.Path in every command
# Literal defaults that are no config's business: where the CLI writes or what it prints.
CLI_ONLY = {("simulate", "policy"), ("simulate", "user"), ("sql", "max_rows"), ("sql", "max_width")}


def options() -> list[tuple[str, Any]]:
    """(command, option) for every option of every command (arguments and --help left out)."""
    return [
        (name, p)
        for name, cmd in sorted(COMMANDS.items())
        for p in cmd.params
        if p.param_type_name == "option" and p.name != "help"
    ]


def longs(p: Any) -> list[str]:
    return [o for o in [*p.opts, *p.secondary_opts] if o.startswith("--")]


def shorts(p: Any) -> list[str]:
    return [o for o in [*p.opts, *p.secondary_opts] if not o.startswith("--")]


def annotation(command: str, param: str) -> Any:
    """The Python type of a command's parameter (from its function's annotations, extras stripped)."""
    fn = next(c.callback for c in app.registered_commands if c.name == command)
    return typing.get_type_hints(fn)[param]


def test_the_walk_sees_every_command_and_the_shared_options() -> None:
    assert set(COMMANDS) == {"quickstart", "simulate", "validate", "sft", "score", "sql", "iterate", "report"}
    seen = {o for _, p in options() for o in longs(p)}
    assert set(SHARED) <= seen


def test_shared_options_are_spelled_one_way() -> None:
    wrong = []
    for cmd, p in options():
        for long in longs(p):
            if long in SHARED and shorts(p) != ([SHARED[long]] if SHARED[long] else []):
                wrong.append(f"{cmd} {long} has short aliases {shorts(p)}")
        for short in shorts(p):
            meant = [k for k, v in SHARED.items() if v == short]
            if meant and longs(p) != meant:
                wrong.append(f"{cmd} {short} means {longs(p)}, not {meant}")
        if len(longs(p)) != 1:
            wrong.append(f"{cmd} {p.name} has {len(longs(p))} long names (no aliases): {longs(p)}")
        if set(longs(p)) & OLD_SPELLINGS:
            wrong.append(f"{cmd} still spells {longs(p)}")
    assert not wrong, "\n".join(wrong)


def test_every_writer_replaces_with_overwrite_or_continues_with_resume() -> None:
    """What a command does with an existing output is one of two flags (rules: itpo_batch/data/io.py)."""
    takes = lambda flag: {cmd for cmd, p in options() if flag in longs(p)}  # noqa: E731
    assert takes("--overwrite") == {"score", "sft", "simulate", "sql", "report"}  # replaced whole
    assert takes("--resume") == {"iterate", "quickstart"}  # written in place
    same = {(p.help, p.is_flag, p.default) for _, p in options() if "--overwrite" in longs(p)}
    assert len(same) == 1 and next(iter(same))[1:] == (True, False), same


def test_a_short_alias_means_one_long_option_everywhere() -> None:
    meanings: dict[str, set[str]] = defaultdict(set)
    aliases: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for _, p in options():
        for short in shorts(p):
            meanings[short] |= set(longs(p))
        aliases[longs(p)[0]].add(tuple(shorts(p)))
    ambiguous = {s: m for s, m in meanings.items() if len(m) > 1}
    assert not ambiguous, f"short aliases with several meanings: {ambiguous}"
    uneven = {o: a for o, a in aliases.items() if len(a) > 1}  # e.g. --task is -t in every command
    assert not uneven, f"options with different short aliases in different commands: {uneven}"


def test_paths_are_paths_and_the_model_option_is_shared() -> None:
    for cmd, p in options():
        (long,) = longs(p)
        if long in PATHS:
            assert Path in (typing.get_args(annotation(cmd, p.name)) or (annotation(cmd, p.name),)), (
                cmd,
                long,
            )
    models = {(p.help, p.name) for _, p in options() if "--model" in longs(p)}
    assert len(models) == 1, f"--model differs between commands: {models}"
    takes_model = {cmd for cmd, p in options() if "--model" in longs(p)}
    assert takes_model == {"validate", "sft", "score", "iterate"}  # simulate's --policy also takes 'scripted'


@pytest.mark.parametrize("command", sorted(c for c, p in options() if "--format" in longs(p)))
def test_format_is_the_shared_enum_and_each_command_refuses_the_rest(command: str) -> None:
    (p,) = [p for c, p in options() if c == command and "--format" in longs(p)]
    assert annotation(command, p.name) in (Format, Format | None)
    bad = runner.invoke(app, [command, "--format", "xml"])
    assert bad.exit_code == 2 and all(f.value in bad.output for f in Format), bad.output
    accepted = []
    for fmt in Format:
        res = runner.invoke(app, [command, "--format", fmt.value])  # parsed first: the argument is missing
        assert res.exit_code == 2
        if "Invalid value for '--format'" not in res.output:
            accepted.append(fmt.value)
        else:
            assert f"{command} writes only" in res.output and f"not {fmt.value}" in res.output
    assert accepted  # sql accepts every format; the others refuse some (checked per format above)
    listed = p.help.split("Accepted here: ")[1].rstrip(".").replace(" or ", ", ").split(", ")
    assert listed == accepted, "--format's help lists what the command accepts"


def test_defaults_come_from_the_configs_not_copied_literals() -> None:
    copied = [
        f"{cmd} --{p.name}={p.default!r}"
        for cmd, p in options()
        if isinstance(p.default, int | float | str)
        and not isinstance(p.default, bool | Format)
        and (cmd, p.name) not in CLI_ONLY
    ]
    assert not copied, f"defaults copied as literals (use from_config): {copied}"


def test_config_defaults_resolve_and_help_shows_their_values() -> None:
    from itpo_batch.model.loading import DEFAULT_MODEL
    from itpo_batch.model.sft import SFTConfig
    from itpo_batch.run.config import IterateConfig

    for _, p in options():
        if isinstance(p.default, FromConfig):
            p.default()  # importable and constructible
    for name in COMMANDS:
        res = runner.invoke(app, [name, "--help"])
        assert res.exit_code == 0 and "(dynamic)" not in res.stdout, name
    sft = runner.invoke(app, ["sft", "--help"]).stdout
    assert f"[default: {SFTConfig().lr}]" in sft and f"[default: {DEFAULT_MODEL}]" in sft
    iterate = runner.invoke(app, ["iterate", "--help"]).stdout
    assert f"[default: {','.join(IterateConfig().methods)}]" in iterate


def test_starting_the_cli_does_not_import_torch() -> None:
    """Config defaults are read lazily, so `itpo-batch --help`, `sql` and `report` start in well under a second."""
    code = "import sys, itpo_batch.cli.main; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
