"""Property-based fuzzing of the log reader: every generated file is accepted or rejected by a named rule.

Hypothesis writes random nested and long log tables, as Parquet and as JSON Lines: unknown roles,
null/NaN/inf/huge/wrong-typed outcomes, empty, whitespace, huge and non-UTF-8-encodable strings, unicode,
duplicate ids, wrong column types, extra columns (including the reader's own internal column names),
missing columns, list columns (``behavior_logprobs``, ``oracle_turn_utility``) of the wrong length or
shape, turn indices that repeat, skip, go negative or overflow, and nulls in every column. Properties:

* :func:`~itpo_batch.data.validate.validate_logs` never raises; every rule it reports is in
  ``schemas/validation.json``; its verdict does not depend on the batch size;
  :func:`~itpo_batch.data.validate.read_logs` agrees with it (raises
  :class:`~itpo_batch.core.errors.LogValidationError` iff the report is not ok) and, when it accepts,
  gives finite outcomes and at least one assistant turn per conversation;
* ``itpo-batch validate`` on the same files exits 0, or 2 with ``[rule]`` on stderr, never a traceback;
  ``itpo-batch score`` refuses rejected files the same way and writes nothing;
* accepted files are scored (``run_score`` with a 512-token context and ``overflow=drop``, and the
  ``score`` command; tiny model, 0 PRM and 1 Q epoch; some conversations are too long for either):
  finite credit on every turn, or a clear refusal (an ``ItpoError``, exit 2), never a traceback.

How many examples run: in CI (``ITPO_FUZZ_EXAMPLES`` unset), 100 generated inputs through
``validate_logs``/``read_logs`` (about one in four also through ``validate``, and rejected ones about one
in six through ``score``, which must refuse them before loading a model), and 10 inputs through ``score``
(one in three through the command): about 15 s on 2 cores. CI runs are derandomized (the same inputs
every run), so a red CI names a change, not a lucky draw. ``ITPO_FUZZ_EXAMPLES=N`` runs N reader inputs
and N/10 score inputs, freshly random each time (e.g. ``ITPO_FUZZ_EXAMPLES=5000`` for a long local hunt;
the run that found the bugs listed in ``tests/test_validate.py::READER_CRASHES`` used 3000).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.errors import ItpoError, LogValidationError
from itpo_batch.data.schemas import validation_rules
from itpo_batch.data.validate import ValidateConfig, read_logs, validate_logs

runner = CliRunner()
RULES = frozenset(r["id"] for r in validation_rules()["rules"])
MAX_CHARS = validation_rules()["max_content_chars"]
EXPLORE = os.environ.get("ITPO_FUZZ_EXAMPLES")
SCALE = int(EXPLORE) / 100 if EXPLORE else 1.0


def _settings(n: int) -> settings:
    """``n`` examples in CI (derandomized), scaled by ``ITPO_FUZZ_EXAMPLES / 100`` (random) when exploring."""
    return settings(
        max_examples=max(1, round(n * SCALE)),
        derandomize=not EXPLORE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ------------------------------------------------------------------------------------------ value pools

ROLES = ("system", "user", "assistant", "tool")
#: Columns the reader and validator create for themselves: an input column of that name must not confuse them.
INTERNAL = (
    "source_row", "source_file", "n_messages", "n_assistant_turns", "n_behavior", "assistant_turn",
    "msg_hash", "n_chars", "has_behavior", "detail", "lo", "hi", "n_unique", "k_outcome", "side_outcome",
    "auto_group", "opening", "chat", "n", "turn_index", "messages", "role", "content", "split", "turn",
)  # fmt: skip
ODD_FLOATS = (math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 5.0, 2.0**63)
NO_SURROGATE = st.characters(exclude_categories=("Cs",))


@dataclass(frozen=True)
class Mess:
    """How a generated file may be broken: ``messy`` files break rules at random; clean ones only vary in
    ways the contract accepts (text, types it casts, extra or optional columns, row order, long content).
    ``surrogates``: JSON Lines text may hold ``\\ud800``-style escapes of lone surrogates."""

    messy: bool
    surrogates: bool = False


def rare(draw: Any, mess: Mess, one_in: int = 6, benign: bool = False) -> bool:
    """True about once in ``one_in`` draws (each breakage stays rare, so that many files are accepted);
    never for a rule-breaking (not ``benign``) change to a clean file."""
    return (mess.messy or benign) and draw(st.integers(0, one_in - 1)) == 0


def texts(surrogates: bool) -> st.SearchStrategy[str]:
    chars = st.characters() if surrogates else NO_SURROGATE
    return st.one_of(
        st.sampled_from(["hello", "Do you have a fever?", "é 日本語 🙂", "a\x00b", "<|im_end|>", "{{ x }}"]),
        st.text(chars, min_size=1, max_size=30),
    )


def scalar_of(kind: str, surrogates: bool) -> st.SearchStrategy[Any]:
    """A value of one wrong-or-right type: what a producer might put in any column."""
    return {
        "str": texts(surrogates),
        "int": st.integers(-(2**63), 2**63 - 1),
        "bigint": st.integers(2**63, 2**70),
        "float": st.one_of(st.floats(), st.sampled_from(ODD_FLOATS)),
        "bool": st.booleans(),
        "list": st.lists(st.floats(allow_nan=True), max_size=3),
        "list_str": st.lists(st.text(NO_SURROGATE, max_size=4), max_size=3),
        "dict": st.dictionaries(st.sampled_from("abc"), st.integers(0, 9), min_size=1, max_size=2),
    }[kind]


SCALAR_KINDS = ("str", "int", "float", "bool", "list", "list_str", "dict")
LogFile = tuple[str, str, list[dict[str, Any]], list[dict[str, Any]] | None]


# ------------------------------------------------------------------------------------------ generators


@st.composite
def chat(draw: Any, mess: Mess) -> list[dict[str, Any]]:
    """A chat (optional system message, user opening, 1-3 assistant turns), sometimes broken in one message."""
    text = texts(mess.surrogates) if mess.messy else texts(False).filter(lambda t: t.strip())
    msgs: list[dict[str, Any]] = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(text)})
    msgs.append({"role": "user", "content": draw(text)})
    for t in range(draw(st.integers(1, 3))):
        if t:
            msgs.append({"role": draw(st.sampled_from(("user", "tool"))), "content": draw(text)})
        msgs.append({"role": "assistant", "content": draw(text)})
    m = msgs[draw(st.integers(0, len(msgs) - 1))]
    if rare(draw, mess, 10, benign=True):
        what = draw(st.sampled_from(["long", "extra-key"]))
        if what == "long":  # valid, but longer than the tiny model's context: dropped or truncated
            m["content"] = "word " * 2500
        else:
            m["name"] = "x"
    if rare(draw, mess, 5):
        what = draw(st.sampled_from(
            ["role", "null-role", "null-content", "empty", "blank", "huge", "no-role", "no-content",
             "no-assistant"]
        ))  # fmt: skip
        if what == "role":
            m["role"] = draw(st.sampled_from(["bot", "", "Assistant", " assistant", "ASSISTANT"]))
        elif what in ("null-role", "null-content"):
            m[what.split("-")[1]] = None
        elif what in ("empty", "blank"):
            m["content"] = "" if what == "empty" else draw(st.sampled_from([" ", "\n\t ", "\u3000"]))
        elif what == "huge":
            m["content"] = "x" * (MAX_CHARS + 1)
        elif what in ("no-role", "no-content"):
            del m[what.split("-")[1]]
        else:
            msgs = [x for x in msgs if x["role"] != "assistant"]
    return msgs


@st.composite
def nested_rows(draw: Any, mess: Mess) -> list[dict[str, Any]]:
    """1-6 conversations with every optional column, in groups of two."""
    rows, prefix = [], draw(st.sampled_from(["c", "conv-", "x", "🙂"]))  # ids decide the hold-out split
    for i in range(draw(st.integers(1, 6))):
        msgs = draw(chat(mess))
        k = sum(m.get("role") == "assistant" for m in msgs)
        rows.append(
            {
                "conversation_id": f"{prefix}{i}",
                "messages": msgs,
                "outcome": draw(st.sampled_from([0.0, 1.0, 0.5, -1.0, 1, 0, True])),
                "group_id": f"g{i // 2}",
                "task": "medical",
                "behavior_logprobs": [[-0.5, -1.0]] * k,
                "metadata": json.dumps({"i": i}),
                "oracle_turn_utility": [0.1 * t for t in range(k)],
            }
        )
    return rows


def _rows_apply(draw: Any, rows: list[dict[str, Any]], column: str, values: st.SearchStrategy[Any]) -> None:
    """Set ``column`` of one row (or of every row) to drawn values."""
    targets = range(len(rows)) if draw(st.booleans()) else [draw(st.integers(0, len(rows) - 1))]
    for i in targets:
        rows[i][column] = draw(values)


def perturb_conversation_columns(draw: Any, rows: list[dict[str, Any]], mess: Mess) -> None:
    """Conversation-level columns: nulls, odd numbers, wrong types, wrong list lengths, duplicate ids."""
    n, sur = len(rows), mess.surrogates
    if rare(draw, mess, 8, benign=True):  # types the contract casts: integer ids, integer/boolean outcomes
        _rows_apply(draw, rows, "conversation_id", st.just(None))
        for i, r in enumerate(rows):
            r["conversation_id"] = 1000 + i
    if rare(draw, mess, 8, benign=True):
        _rows_apply(draw, rows, "metadata", st.one_of(st.none(), scalar_of("dict", False)))
    if rare(draw, mess):
        _rows_apply(draw, rows, "outcome", st.one_of(st.none(), st.sampled_from(ODD_FLOATS), st.floats()))
    if rare(draw, mess, 10):
        kind = draw(st.sampled_from(("str", "int", "bigint", "bool", "list", "dict")))
        _rows_apply(draw, rows, "outcome", scalar_of(kind, sur))
    if rare(draw, mess):
        rows[draw(st.integers(0, n - 1))]["conversation_id"] = rows[draw(st.integers(0, n - 1))][
            "conversation_id"
        ]
    if rare(draw, mess, 10):
        kind = draw(st.sampled_from(("int", "bigint", "float", "bool", "list", "dict", "str")))
        _rows_apply(draw, rows, "conversation_id", st.one_of(st.none(), scalar_of(kind, sur)))
    for col in ("group_id", "task", "metadata"):
        if rare(draw, mess, 8):
            kind = draw(st.sampled_from(SCALAR_KINDS))
            _rows_apply(draw, rows, col, st.one_of(st.none(), scalar_of(kind, sur)))
    if rare(draw, mess):
        item = st.lists(st.one_of(st.floats(), st.none()), max_size=3)
        bad = st.one_of(
            st.none(), st.lists(item, max_size=4), st.lists(st.floats(), max_size=3), st.just([None]),
            st.just([]), st.text(max_size=3),
        )  # fmt: skip
        _rows_apply(draw, rows, "behavior_logprobs", bad)
    if rare(draw, mess):
        bad = st.one_of(
            st.none(), st.lists(st.one_of(st.floats(), st.none()), max_size=4),
            st.lists(st.integers(-5, 5), max_size=4), st.lists(st.text(max_size=2), max_size=2),
            st.just([]), st.floats(),
        )  # fmt: skip
        _rows_apply(draw, rows, "oracle_turn_utility", bad)
    if rare(draw, mess, 10):
        bad = st.one_of(
            st.none(), st.just([]), st.text(max_size=5), st.lists(st.text(max_size=3), max_size=2)
        )
        _rows_apply(draw, rows, "messages", bad)


def to_long(draw: Any, rows: list[dict[str, Any]], mess: Mess) -> list[dict[str, Any]]:
    """The same conversations, one row per message, with long-shape breakages (turn indices, mixing)."""
    out = []
    for r in rows:
        msgs = r["messages"] if isinstance(r["messages"], list) else []
        for j, m in enumerate(msgs):
            m = m if isinstance(m, dict) else {"role": "user", "content": str(m)}
            row = {k: v for k, v in r.items() if k not in ("messages", "behavior_logprobs")}
            row |= {"turn_index": j, "role": m.get("role"), "content": m.get("content")}
            row["behavior_logprobs"] = [-0.5, -1.0] if m.get("role") == "assistant" else None
            out.append(row)
    if not out:
        reject()
    if rare(draw, mess):
        bad = st.one_of(
            st.none(),
            st.integers(-3, 12),
            st.just(2**62),
            st.just(-(2**63)),
            st.floats(),
            st.text(max_size=2),
        )
        _rows_apply(draw, out, "turn_index", bad)
    if rare(draw, mess):
        _rows_apply(draw, out, "behavior_logprobs", st.one_of(st.none(), st.lists(st.floats(), max_size=3)))
    if rare(draw, mess):
        col = draw(st.sampled_from(("outcome", "task", "group_id", "oracle_turn_utility")))
        out[draw(st.integers(0, len(out) - 1))][col] = draw(
            st.sampled_from({"outcome": [0.25, None], "task": ["math"], "group_id": ["other"],
                             "oracle_turn_utility": [[9.0]]}[col])
        )  # fmt: skip
    if rare(draw, mess, benign=True):
        out = draw(st.permutations(out))
    return out


def side_table(draw: Any, nested: list[dict[str, Any]], long: list[dict[str, Any]], mess: Mess) -> list[dict]:
    """Outcomes of long logs in a side table (``--outcomes``), taken off the rows; rows may go missing,
    repeat, or carry null, odd or wrong-typed outcomes."""
    for r in long:
        r.pop("outcome", None)
    side = [{"conversation_id": r["conversation_id"], "outcome": r["outcome"]} for r in nested]
    if rare(draw, mess, 4):
        side.pop(draw(st.integers(0, len(side) - 1)))
    if side and rare(draw, mess, 4):
        side.append(dict(side[draw(st.integers(0, len(side) - 1))]))
    if side and rare(draw, mess, 4):
        values = st.one_of(st.none(), st.sampled_from(ODD_FLOATS), scalar_of("str", False))
        _rows_apply(draw, side, "outcome", values)
    if side and rare(draw, mess, 6, benign=True):
        _rows_apply(draw, side, draw(st.sampled_from(["task", "group_id", "role"])), st.just("x"))
    return side


@st.composite
def log_file(draw: Any, messy: st.SearchStrategy[bool] | None = None, side_tables: bool = True) -> LogFile:
    """``(shape, extension, rows, side table or None)``: one file's worth of logs, clean or messy."""
    ext = draw(st.sampled_from((".parquet", ".jsonl")))
    mess = Mess(draw(st.booleans() if messy is None else messy))
    mess = Mess(mess.messy, surrogates=ext == ".jsonl" and rare(draw, mess, 10))
    shape = draw(st.sampled_from(("nested", "long")))
    rows = draw(nested_rows(mess))
    perturb_conversation_columns(draw, rows, mess)
    side = None
    if shape == "long":
        nested, rows = rows, to_long(draw, rows, mess)
        if side_tables and draw(st.integers(0, 3)) == 0:
            side = side_table(draw, nested, rows, mess)
    if rare(draw, mess, 5, benign=True):  # ignored, whatever its name (the reader's own ones included)
        name = draw(st.one_of(st.sampled_from(INTERNAL), st.text(NO_SURROGATE, min_size=1, max_size=8)))
        kind = draw(st.sampled_from(SCALAR_KINDS))
        for r in rows:
            r.setdefault(name, draw(st.one_of(st.none(), scalar_of(kind, mess.surrogates))))
    optional = ("group_id", "task", "metadata", "behavior_logprobs", "oracle_turn_utility")
    if rare(draw, mess, 8, benign=True):
        names = sorted(
            {k for r in rows for k in r} if mess.messy else {k for r in rows for k in r} & set(optional)
        )
        gone = draw(st.sampled_from(names))
        every = draw(st.booleans()) or ext == ".parquet"
        for r in rows if every else rows[: draw(st.integers(1, len(rows)))]:
            r.pop(gone, None)
    return shape, ext, rows, side


RETYPES = {  # Arrow types other producers write for the same columns
    "narrow": {pa.int64(): pa.int8(), pa.float64(): pa.float32()},
    "unsigned": {pa.int64(): pa.uint64(), pa.bool_(): pa.uint8()},
    "large": {pa.string(): pa.large_string()},
    "view": {pa.string(): pa.string_view()},
    "dictionary": {pa.string(): pa.dictionary(pa.int32(), pa.string())},
    "half": {pa.float64(): pa.float16()},
}
NOISE = ("blank-lines", "bom", "crlf", "not-an-object", "bad-utf8", "cut")


def _retype(table: pa.Table, how: str) -> pa.Table:
    """Top-level columns cast to another Arrow type of the same kind (as other writers produce)."""
    swap = RETYPES[how]
    cols = [c.cast(swap[c.type], safe=False) if c.type in swap else c for c in table.columns]
    return pa.Table.from_arrays(cols, names=table.column_names)


def _fixed_lists(table: pa.Table) -> pa.Table:
    """List columns whose lists all have one length as Arrow ``fixed_size_list`` (Parquet keeps the type)."""
    cols = []
    for c in table.columns:
        lengths = set(pc.list_value_length(c).drop_null().to_pylist()) if pa.types.is_list(c.type) else ()
        cols.append(c.cast(pa.list_(c.type.value_type, lengths.pop())) if len(lengths) == 1 else c)
    return pa.Table.from_arrays(cols, names=table.column_names)


def _noisy(lines: list[str], noise: str) -> bytes:
    """JSON Lines as other tools (or accidents) write them."""
    if noise == "blank-lines":
        return "\n\n".join(lines).encode() + b"\n\n"
    if noise == "crlf":
        return "".join(x + "\r\n" for x in lines).encode()
    body = "".join(x + "\n" for x in lines).encode()
    if noise == "bom":
        return b"\xef\xbb\xbf" + body
    if noise == "not-an-object":
        return body + b"[1, 2]\n"
    if noise == "bad-utf8":
        return body + b'{"conversation_id": "\xff"}\n'
    return body[: len(body) // 2]


def write(rows: list[dict[str, Any]], path: Path, row_group: int, variant: str | None = None) -> Path:
    """Write rows; a table Arrow itself cannot build or write is not a file anyone could hand us."""
    if path.suffix == ".parquet":
        try:
            table = pa.Table.from_pylist(rows)
            if variant in RETYPES:
                table = _retype(table, variant)
            elif variant == "dup-column":  # Parquet allows two columns of one name
                table = table.append_column(table.field(0), table.column(0))
            elif variant == "fixed-lists":
                table = _fixed_lists(table)
            pq.write_table(table, path, row_group_size=row_group)
        except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeEncodeError):
            reject()
    else:
        lines = [json.dumps(r) for r in rows]
        path.write_bytes(
            _noisy(lines, variant) if variant in NOISE else "".join(x + "\n" for x in lines).encode()
        )
    return path


# ------------------------------------------------------------------------------------------ properties


def check_report(paths: list[Path], cfg: ValidateConfig) -> bool:
    """The library calls the CLI makes: validate_logs, then read_logs; True iff the files are accepted."""
    report = validate_logs(paths, cfg)
    assert set(report.hits) <= RULES, report.hits.keys()
    for hits in report.hits.values():
        assert hits.count >= 1 and hits.examples, hits
    json.dumps(report.to_dict())
    if not report.ok:
        assert report.format_errors()
        with pytest.raises(LogValidationError) as e:
            read_logs(paths, cfg)
        assert set(e.value.report.hits) == set(report.hits)
        return False
    logs = read_logs(paths, cfg)
    conv = logs.conversations
    assert conv.height == report.summary["conversations"] > 0
    assert conv["outcome"].is_finite().all() and conv["conversation_id"].is_unique().all()
    assert (conv["n_assistant_turns"] > 0).all() and conv["group_id"].null_count() == 0
    assert logs.messages["content"].null_count() == 0 and logs.messages["role"].is_in(list(ROLES)).all()
    assert len(logs.chats()) == conv.height
    return True


def check_cli(command: list[str], accepted: bool | None) -> str:
    """Exit 0, or 2 with a message; never an exception escaping the command (that prints a traceback)."""
    res = runner.invoke(app, command)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code in (0, 2), (res.exit_code, res.output)
    if res.exit_code == 2:
        assert "error:" in res.stderr or "[" in res.stderr, res.stderr
    if accepted is not None:
        assert (res.exit_code == 0) == accepted, res.output
    return res.stderr


VARIANTS = st.one_of(
    st.none(), st.none(), st.sampled_from([*sorted(RETYPES), "dup-column", "fixed-lists", *NOISE])
)


@pytest.mark.slow
@given(
    data=log_file(),
    batch_size=st.sampled_from([1, 2, 3, 8192]),
    row_group=st.integers(1, 4),
    variant=VARIANTS,
    split=st.integers(0, 5),
)
@_settings(100)
def test_reader_accepts_or_names_a_rule(data, batch_size: int, row_group: int, variant, split: int) -> None:
    _, ext, rows, side = data
    with tempfile.TemporaryDirectory() as d:
        if split == 0 and len(rows) > 1:  # one file in six is two files (ids may repeat across them)
            paths = [write(rows[:1], Path(d) / f"a{ext}", row_group), write(rows[1:], Path(d) / "b.jsonl", 2)]
        else:
            paths = [write(rows, Path(d) / f"logs{ext}", row_group, variant)]
        outcomes = None if side is None else write(side, Path(d) / f"outcomes{ext}", row_group)
        cfg = ValidateConfig(batch_size=batch_size, outcomes=outcomes)
        accepted = check_report(paths, cfg)
        event("accepted" if accepted else "rejected")
        if batch_size != 8192:  # the verdict is the file's, not the batch size's
            assert validate_logs(paths, ValidateConfig(outcomes=outcomes)).ok == accepted
        if batch_size == 8192 and row_group <= 1:  # about one file in four also goes through the command
            extra = [] if outcomes is None else ["--outcomes", str(outcomes)]
            stderr = check_cli(["validate", *map(str, paths), *extra], accepted)
            assert accepted or any(f"[{r}]" in stderr for r in RULES), stderr
        if not accepted and outcomes is None and split == 1:  # score refuses it before loading a model
            stderr = check_cli(["score", *map(str, paths), "-o", f"{d}/run"], False)
            assert any(f"[{r}]" in stderr for r in RULES) and not Path(f"{d}/run").exists(), stderr


CREDIT = ("implicit_reward", "implicit_reward_mean", "itpo_norm_weight", "itpo_norm_reward", "length_share",
          "q_value", "mc_return", "outcome")  # fmt: skip


@pytest.fixture(scope="module")
def score_cfg(tiny_dir: Path):
    """The cheapest score that still renders, scores and fits: no PRM step, one Q pass, short context."""
    from itpo_batch.credit.prm import PRMConfig
    from itpo_batch.credit.qvalue import QConfig
    from itpo_batch.credit.score import ScoreConfig

    return ScoreConfig(
        model=str(tiny_dir),
        prm=PRMConfig(epochs=0, max_length=512, overflow="drop"),
        q=QConfig(model=str(tiny_dir), epochs=1, max_length=512),
    )


@pytest.mark.slow
@given(
    data=log_file(messy=st.integers(0, 3).map(lambda i: i == 0), side_tables=False), via_cli=st.integers(0, 2)
)
@_settings(10)
def test_accepted_logs_are_scored_with_finite_credit(score_cfg, data, via_cli: int) -> None:
    from itpo_batch.credit.score import run_score

    _, ext, rows, _ = data
    with tempfile.TemporaryDirectory() as d:
        path = write(rows, Path(d) / f"logs{ext}", 2)
        if not validate_logs([path]).ok:
            reject()
        if via_cli == 0:  # one in three through the command (the tiny model's own 2048-token context)
            stderr = check_cli(["score", str(path), "--model", score_cfg.model, "-o", f"{d}/run",
                                "--prm-epochs", "0", "--q-epochs", "1"], None)  # fmt: skip
            event("score command: " + (stderr.split("error:")[-1][:60] if "error:" in stderr else "scored"))
            return
        try:
            result = run_score(read_logs([path]), score_cfg, Path(d) / "run")
        except ItpoError as e:  # a clear refusal (e.g. nothing fits the context) is allowed; a crash is not
            assert str(e), e
            event(f"run_score refused: {str(e)[:60]}")
            return
        event(f"run_score: scored, {result.metrics['score/prm_dropped_overlength']} dropped")
        turns = result.turns
        assert turns.height == result.metrics["score/turns"]
        for col in CREDIT:
            assert turns[col].is_finite().all(), (col, turns[col].to_list())
