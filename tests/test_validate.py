"""`itpo-batch validate`: good files of both shapes pass; each rule of `schemas/validation.json` fails with exit 2."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.errors import LogValidationError
from itpo_batch.data.validate import ValidateConfig, read_logs, validate_logs
from tests.logs_factory import long_rows, nested_rows, side_table, write

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["validate", *args])


@pytest.mark.parametrize("name", ["logs.parquet", "logs.jsonl", "logs.pq", "logs.ndjson"])
def test_good_nested_file_passes(tmp_path: Path, name: str) -> None:
    path = write(nested_rows(), tmp_path / name)
    res = run(str(path), "--format", "json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)["summary"]
    assert summary["conversations"] == 6
    assert summary["assistant_turns"] == 1 + 2 + 3 + 1 + 2 + 3
    assert summary["groups"]["groups"] == 3
    assert summary["outcome_values"] == {"0.0": 3, "1.0": 3}
    assert summary["optional_columns"] == {
        "behavior_logprobs": True,
        "oracle_turn_utility": True,
        "metadata": True,
    }


@pytest.mark.parametrize("name", ["long.parquet", "long.jsonl"])
def test_good_long_file_passes(tmp_path: Path, name: str) -> None:
    path = write(long_rows(nested_rows()), tmp_path / name)
    res = run(str(path))
    assert res.exit_code == 0, res.output
    assert "conversations" in res.stdout and "6" in res.stdout


def test_long_with_side_table_passes(tmp_path: Path) -> None:
    rows = nested_rows()
    logs = write(long_rows(rows, outcome_on_rows=False), tmp_path / "long.parquet")
    side = write(side_table(rows), tmp_path / "outcomes.parquet")
    res = run(str(logs), "--outcomes", str(side), "--format", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["outcome"]["mean"] == 0.5


def test_missing_group_id_warns_and_groups_by_opening(tmp_path: Path) -> None:
    rows = nested_rows(6, group_size=2)
    for r in rows:
        del r["group_id"]
    path = write(rows, tmp_path / "logs.parquet")
    report = validate_logs([path])
    assert report.ok
    assert any("no group_id" in w and "3 groups" in w for w in report.warnings)
    logs = read_logs([path])
    groups = logs.conversations["group_id"].to_list()
    assert groups[0] == groups[1] != groups[2] == groups[3] != groups[4]
    assert all(g.startswith("auto-") for g in groups)


def _mutate(rows, fn):
    rows = copy.deepcopy(rows)
    fn(rows)
    return rows


def _set(i, key, value):
    def f(rows):
        rows[i][key] = value

    return f


def _msg(i, j, key, value):
    def f(rows):
        rows[i]["messages"][j][key] = value

    return f


NESTED_CASES = {
    "unknown-role": (_msg(2, 1, "role", "bot"), "c2"),
    "empty-content": (_msg(3, 2, "content", "   "), "c3"),
    "null-value": (_msg(1, 1, "content", None), "c1"),
    "no-assistant-turn": (_set(4, "messages", [{"role": "user", "content": "hello?"}]), "c4"),
    "outcome-not-finite": (_set(5, "outcome", math.nan), "c5"),
    "outcome-out-of-range": (_set(0, "outcome", 5.0), "c0"),
    "duplicate-conversation-id": (_set(3, "conversation_id", "c1"), "c1"),
    "behavior-logprobs-count": (_set(2, "behavior_logprobs", [[-1.0]]), "c2"),
    "oracle-utility-count": (_set(1, "oracle_turn_utility", [0.0, 1.0, 2.0, 3.0]), "c1"),
}


@pytest.mark.parametrize("ext", [".parquet", ".jsonl"])
@pytest.mark.parametrize("rule", sorted(NESTED_CASES))
def test_each_nested_rule_fails_with_exit_2(tmp_path: Path, rule: str, ext: str) -> None:
    fn, conv = NESTED_CASES[rule]
    path = write(_mutate(nested_rows(), fn), tmp_path / f"bad{ext}")
    res = run(str(path))
    assert res.exit_code == 2, res.output
    assert f"[{rule}]" in res.stderr and str(path) in res.stderr and f"'{conv}'" in res.stderr
    assert "Traceback" not in res.output


def test_infinite_outcome_and_oversized_content(tmp_path: Path) -> None:
    rows = _mutate(nested_rows(), _set(0, "outcome", math.inf))
    rows[1]["messages"][1]["content"] = "x" * 50
    report = validate_logs([write(rows, tmp_path / "bad.parquet")], ValidateConfig(max_content_chars=40))
    assert {"outcome-not-finite", "oversized-content"} <= set(report.hits)
    assert report.hits["oversized-content"].examples[0].conversation_id == "c1"


LONG_CASES = {
    "duplicate-turn-index": (lambda rows: rows.append(dict(rows[4])), "c1"),
    "turn-index-gap": (
        lambda rows: [r.update(turn_index=r["turn_index"] + 1) for r in rows if r["conversation_id"] == "c1"],
        "c1",
    ),
    "mixed-outcome": (
        lambda rows: next(r for r in rows if r["conversation_id"] == "c2").update(outcome=0.5),
        "c2",
    ),
    "mixed-conversation-field": (
        lambda rows: next(r for r in rows if r["conversation_id"] == "c3").update(task="math"),
        "c3",
    ),
    "behavior-logprobs-count": (lambda rows: rows[0].update(behavior_logprobs=[-1.0]), "c0"),
}


@pytest.mark.parametrize("rule", sorted(LONG_CASES))
def test_each_long_rule_fails_with_exit_2(tmp_path: Path, rule: str) -> None:
    fn, conv = LONG_CASES[rule]
    rows = long_rows(nested_rows())
    fn(rows)
    path = write(rows, tmp_path / "bad.parquet")
    res = run(str(path))
    assert res.exit_code == 2, res.output
    assert f"[{rule}]" in res.stderr and f"'{conv}'" in res.stderr


@pytest.mark.parametrize("ext", [".parquet", ".jsonl"])
def test_nested_null_outcome_speaks_of_the_nested_shape(tmp_path: Path, ext: str) -> None:
    rows = _mutate(nested_rows(), _set(1, "outcome", None))
    res = run(str(write(rows, tmp_path / f"bad{ext}")))
    assert res.exit_code == 2 and "[missing-outcome]" in res.stderr and "'c1'" in res.stderr
    rule_line = next(line for line in res.stderr.splitlines() if "[missing-outcome]" in line)
    assert "null (nested shape)" in rule_line and "outcome is null" in res.stderr
    assert "no row of the conversation" not in res.stderr


def test_long_missing_outcome(tmp_path: Path) -> None:
    rows = nested_rows()
    logs = write(long_rows(rows, outcome_on_rows=False), tmp_path / "long.parquet")
    side = write(side_table(rows)[1:], tmp_path / "outcomes.jsonl")
    res = run(str(logs), "--outcomes", str(side))
    assert res.exit_code == 2 and "[missing-outcome]" in res.stderr and "'c0'" in res.stderr
    assert "no row of the conversation has an outcome and the side table" in res.stderr


def test_cross_batch_rules_hold_when_streaming_one_row_at_a_time(tmp_path: Path) -> None:
    rows = long_rows(nested_rows())
    rows.append(dict(rows[4]))  # the same (conversation, turn) again, far from the first copy
    path = write(rows, tmp_path / "bad.parquet")
    for bs in (1, 3, 10_000):
        report = validate_logs([path], ValidateConfig(batch_size=bs))
        assert set(report.hits) == {"duplicate-turn-index"}, bs
        assert report.hits["duplicate-turn-index"].count == 1


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


FILE_CASES = {
    "wrong-extension": lambda d: write(nested_rows(), d / "logs.csv"),
    "unreadable-file": lambda d: _truncate(write(nested_rows(), d / "logs.parquet"), 0.6),
    "unknown-shape": lambda d: write([{"id": 1, "text": "hi"}], d / "logs.parquet"),
    "missing-column": lambda d: write(
        [{k: v for k, v in r.items() if k != "outcome"} for r in nested_rows()], d / "logs.parquet"
    ),
    "column-type": lambda d: write([{**r, "outcome": "good"} for r in nested_rows()], d / "logs.parquet"),
    "empty-file": lambda d: write([], d / "logs.jsonl"),
    "duplicate-column": lambda d: _twice(write(nested_rows(), d / "logs.parquet"), "outcome"),
}


def _twice(path: Path, column: str) -> Path:
    """Parquet allows two columns of one name (pyarrow writes them); which one is the outcome?"""
    table = pq.read_table(path)
    pq.write_table(table.append_column(column, table.column(column)), path)
    return path


@pytest.mark.parametrize("rule", sorted(FILE_CASES))
def test_each_file_rule_fails_with_exit_2(tmp_path: Path, rule: str) -> None:
    path = FILE_CASES[rule](tmp_path)
    res = run(str(path))
    assert res.exit_code == 2, res.output
    assert f"[{rule}]" in res.stderr and str(path) in res.stderr and "Traceback" not in res.output


def test_truncated_jsonl_names_the_line(tmp_path: Path) -> None:
    path = _truncate(write(nested_rows(), tmp_path / "logs.jsonl"), 0.9)
    res = run(str(path))
    assert res.exit_code == 2 and "[unreadable-file]" in res.stderr and "line 6" in res.stderr


@pytest.mark.parametrize("batch_size", [1, 2, 8192])
def test_jsonl_rows_are_named_by_their_line_past_blank_lines(tmp_path: Path, batch_size: int) -> None:
    lines = [json.dumps(r) for r in _mutate(nested_rows(4), _set(2, "outcome", 7.0))]
    path = _jsonl(tmp_path / "logs.jsonl", [*lines[:2], "", "  ", *lines[2:]])  # c2 is on line 5
    report = validate_logs([path], ValidateConfig(batch_size=batch_size))
    assert report.hits["outcome-out-of-range"].examples[0].where() == "line 5, conversation 'c2'"
    path.write_bytes(path.read_bytes() + b'{"conversation_id": "\xff"}\n')
    res = run(str(path))
    assert res.exit_code == 2 and "[unreadable-file]" in res.stderr and "line 7 is not UTF-8" in res.stderr


def test_jsonl_mixed_types_name_the_column(tmp_path: Path) -> None:
    rows = nested_rows()
    rows[2]["outcome"] = "great"
    res = run(str(write(rows, tmp_path / "logs.jsonl")))
    assert (
        res.exit_code == 2
        and "[column-type]" in res.stderr
        and "'outcome'" in res.stderr
        and "line 3" in res.stderr
    )


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# Inputs the fuzzer (tests/test_fuzz_logs.py) found crashing the reader with a traceback, and their rules.
READER_CRASHES = {
    "list-shapes": ('"behavior_logprobs": [0.5]', '"behavior_logprobs": [[0.5]]', "column-type", "line 2"),
    "int-over-64-bits": (
        '"task": "a"',
        '"oracle_turn_utility": [1180591620717411303424]',
        "column-type",
        "64 bits",
    ),
    "lone-surrogate": ('"task": "a"', '"task": "\\ud800"', "unreadable-file", "line 2"),
}


@pytest.mark.parametrize("case", sorted(READER_CRASHES))
def test_jsonl_values_arrow_cannot_hold_are_named(tmp_path: Path, case: str) -> None:
    good, bad, rule, where = READER_CRASHES[case]
    msgs = '"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]'
    lines = [
        f'{{"conversation_id": "c{i}", {msgs}, "outcome": 1, {good if i == 0 else bad}}}' for i in (0, 1)
    ]
    res = run(str(_jsonl(tmp_path / "logs.jsonl", lines)))
    assert res.exit_code == 2 and f"[{rule}]" in res.stderr and where in res.stderr, res.output


@pytest.mark.parametrize("batch_size", [1, 2, 8192])
def test_jsonl_verdict_does_not_depend_on_value_order(tmp_path: Path, batch_size: int) -> None:
    rows = nested_rows(4)
    for i, r in enumerate(rows):  # JSON has no column types: booleans before numbers, ints among strings
        r["outcome"], r["conversation_id"] = (True, 7) if i == 2 else (0.5, f"c{i}")
        r["metadata"] = {"seed": i} if i == 3 else r["metadata"]  # an object among JSON strings
    logs = read_logs([write(rows, tmp_path / "logs.jsonl")], ValidateConfig(batch_size=batch_size))
    assert logs.conversations["outcome"].to_list() == [0.5, 0.5, 1.0, 0.5]
    assert logs.conversations["conversation_id"].to_list() == ["c0", "c1", "7", "c3"]
    assert [json.loads(m) for m in logs.conversations["metadata"]] == [{"seed": i} for i in range(4)]
    rows = long_rows(nested_rows(2))  # c0's rows (object metadata) fall in two batches, one shared with c1
    for r in rows:
        r["metadata"] = {"seed": 0, "who": "é"} if r["conversation_id"] == "c0" else r["metadata"]
    path = write(rows, tmp_path / "long.jsonl")
    assert validate_logs([path], ValidateConfig(batch_size=batch_size)).ok


@pytest.mark.parametrize("name", ["role", "n_assistant_turns", "source_row"])
def test_extra_columns_named_like_internal_ones_are_ignored(tmp_path: Path, name: str) -> None:
    rows = [{**r, name: [] if i % 2 else None} for i, r in enumerate(nested_rows())]
    logs = read_logs([write(rows, tmp_path / "logs.parquet")])
    assert logs.conversations["n_assistant_turns"].to_list() == [1, 2, 3, 1, 2, 3]
    assert logs.messages["role"].null_count() == 0


def test_side_table_empty_or_with_extra_columns(tmp_path: Path) -> None:
    rows = nested_rows()
    logs = write(long_rows(rows, outcome_on_rows=False), tmp_path / "long.parquet")
    empty = write([], tmp_path / "outcomes.jsonl")
    res = run(str(logs), "--outcomes", str(empty))
    assert res.exit_code == 2 and "[empty-file]" in res.stderr and "outcomes.jsonl" in res.stderr
    side = write([{**r, "role": [1]} for r in side_table(rows)], tmp_path / "outcomes.parquet")
    assert run(str(logs), "--outcomes", str(side)).exit_code == 0  # a column it does not know is ignored


def test_fixed_size_lists_and_unsigned_turn_indices(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([{**r, "oracle_turn_utility": [0.5]} for r in nested_rows()[::3]])
    i, messages = table.schema.get_field_index("messages"), table.column("messages")
    fixed = pa.list_(
        messages.type.value_type, 3
    )  # both rows hold 3 messages: Arrow may store fixed_size_list
    pq.write_table(table.set_column(i, "messages", messages.cast(fixed)), tmp_path / "fixed.parquet")
    assert read_logs([tmp_path / "fixed.parquet"]).conversations["n_assistant_turns"].to_list() == [1, 1]
    table = pa.Table.from_pylist(long_rows(nested_rows()))
    i, index = table.schema.get_field_index("turn_index"), table.column("turn_index").to_pylist()
    index[0] = 2**64 - 1  # an unsigned index over the int64 range
    pq.write_table(table.set_column(i, "turn_index", pa.array(index, pa.uint64())), tmp_path / "u.parquet")
    res = run(str(tmp_path / "u.parquet"))
    assert res.exit_code == 2 and "[turn-index-gap]" in res.stderr and "'c0'" in res.stderr


def test_list_of_nulls_is_no_string(tmp_path: Path) -> None:
    rows = [{**r, "task": [] if i == 0 else None} for i, r in enumerate(nested_rows())]
    res = run(str(write(rows, tmp_path / "logs.parquet")))
    assert res.exit_code == 2 and "[column-type]" in res.stderr and "'task'" in res.stderr
    rows = [{**r, "oracle_turn_utility": [] if i == 0 else None} for i, r in enumerate(nested_rows())]
    res = run(
        str(write(rows, tmp_path / "logs.parquet"))
    )  # [] is a list of utilities, only of the wrong length
    assert res.exit_code == 2 and "[oracle-utility-count]" in res.stderr and "'c0'" in res.stderr


def test_missing_file_and_json_output_on_failure(tmp_path: Path) -> None:
    res = run(str(tmp_path / "nope.parquet"), "--format", "json")
    assert res.exit_code == 2
    payload = json.loads(res.stdout)
    assert payload["ok"] is False and payload["errors"][0]["rule"] == "unreadable-file"


def test_errors_list_at_most_max_errors_rows(tmp_path: Path) -> None:
    rows = nested_rows(20)
    for r in rows:
        r["outcome"] = 9.0
    res = run(str(write(rows, tmp_path / "logs.parquet")), "--max-errors", "3")
    assert res.exit_code == 2
    assert res.stderr.count("outside [") == 3 and "and 17 more" in res.stderr


def test_read_logs_raises_and_outcome_range_is_configurable(tmp_path: Path) -> None:
    rows = _mutate(nested_rows(), _set(0, "outcome", 5.0))
    path = write(rows, tmp_path / "logs.parquet")
    with pytest.raises(LogValidationError, match="c0"):
        read_logs([path])
    assert read_logs([path], ValidateConfig(outcome_range=(0.0, 10.0))).conversations.height == 6
    assert run(str(path), "--outcome-range", "0,10").exit_code == 0


def test_integer_ids_and_boolean_outcomes_are_accepted(tmp_path: Path) -> None:
    rows = [{**r, "conversation_id": i, "outcome": bool(i % 2)} for i, r in enumerate(nested_rows())]
    logs = read_logs([write(rows, tmp_path / "logs.parquet")])
    assert logs.conversations["conversation_id"].to_list()[:2] == ["0", "1"]
    assert logs.conversations["outcome"].to_list()[:2] == [0.0, 1.0]


def test_struct_metadata_becomes_json(tmp_path: Path) -> None:
    rows = [{**r, "metadata": {"seed": i, "user": "u"}} for i, r in enumerate(nested_rows())]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "logs.parquet")
    logs = read_logs([tmp_path / "logs.parquet"])
    assert json.loads(logs.conversations["metadata"][3]) == {"seed": 3, "user": "u"}


@pytest.mark.parametrize("name", ["min.parquet", "min.jsonl"])
def test_minimal_required_columns_only(tmp_path: Path, name: str) -> None:
    rows = [{k: r[k] for k in ("conversation_id", "messages", "outcome")} for r in nested_rows()]
    logs = read_logs([write(rows, tmp_path / name)])
    assert logs.conversations.height == 6
    assert logs.messages["behavior_logprobs"].null_count() == logs.messages.height


def test_jsonl_optional_column_null_in_first_batch_then_present(tmp_path: Path) -> None:
    rows = nested_rows()
    for r in rows[:3]:
        r["behavior_logprobs"] = None
    logs = read_logs([write(rows, tmp_path / "logs.jsonl")], ValidateConfig(batch_size=2))
    asst = logs.messages.filter(logs.messages["role"] == "assistant")
    assert asst["behavior_logprobs"].null_count() == 1 + 2 + 3
    assert asst.filter(asst["conversation_id"] == "c5")["behavior_logprobs"].to_list()[2] == [-2.5, -0.25]


ROOT = Path(__file__).resolve().parents[1]


def test_validate_counts_tokens_with_tiny() -> None:
    res = run(str(ROOT / "examples/chat_logs.jsonl"), "--model", "tiny", "--format", "json")
    assert res.exit_code == 0, res.output
    tokens = json.loads(res.stdout)["summary"]["tokens"]
    assert tokens["method"] == "generation" and tokens["dropped"] == 0 and tokens["truncated"] == 0
    per_conv = tokens["tokens_per_conversation"]
    assert (
        per_conv["count"] == 8 and 0 < tokens["assistant_tokens_per_conversation"]["mean"] < per_conv["mean"]
    )


def test_token_counts_report_overflow_policy(tmp_path: Path) -> None:
    path = write(nested_rows(6), tmp_path / "logs.parquet")
    counts = {}
    for policy in ("drop", "truncate"):
        res = run(str(path), "--model", "tiny", "--max-length", "45", "--overflow", policy, "-f", "json")
        assert res.exit_code == 0, res.output
        counts[policy] = json.loads(res.stdout)["summary"]["tokens"]
    assert counts["drop"]["dropped"] > 0 and counts["drop"]["truncated"] == 0
    assert counts["truncate"]["truncated"] > 0 and counts["truncate"]["dropped"] < counts["drop"]["dropped"]
    assert counts["truncate"]["tokens_per_conversation"]["max"] <= 45
    assert run(str(path), "--model", "tiny", "--overflow", "shorten").exit_code == 2


def test_context_comes_from_the_model_config_when_the_tokenizer_has_none(
    tmp_path: Path, tiny_dir: Path
) -> None:
    model = shutil.copytree(tiny_dir, tmp_path / "model")  # a tiny random HF model, saved again
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    del tok_cfg["model_max_length"]  # as in many checkpoints: transformers then reports ~1e30
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 45}))
    path = write(nested_rows(6), tmp_path / "logs.parquet")
    res = run(str(path), "--model", str(model), "-f", "json")
    assert res.exit_code == 0, res.output
    tokens = json.loads(res.stdout)["summary"]["tokens"]
    assert tokens["max_length"] == 45 and tokens["dropped"] > 0
    res = run(str(path), "--model", str(model))
    assert "context" in res.stdout and "45 tokens" in res.stdout and "None" not in res.stdout
    del cfg["max_position_embeddings"]  # a model that states no context at all: said so, not "None"
    (model / "config.json").write_text(json.dumps(cfg))
    res = run(str(path), "--model", str(model))
    assert res.exit_code == 0 and "no limit" in res.stdout and "None" not in res.stdout, res.output


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    path = write(nested_rows(2), tmp_path / "logs.parquet")
    res = run(str(path), "--model", str(tmp_path / "no-model"))
    assert res.exit_code == 2 and "no-model" in res.stderr and "Traceback" not in res.output
