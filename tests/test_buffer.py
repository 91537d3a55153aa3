"""The credit models' log buffer (itpo_batch.run.buffer): what is fitted on what, cap, hold-out, π_0 values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from itpo_batch.core.config import from_mapping
from itpo_batch.core.errors import ItpoError
from itpo_batch.credit.prm import PRMConfig
from itpo_batch.data.store import RunDir
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.run.buffer import BufferConfig, fit_logs, held_out
from itpo_batch.run.config import IterateConfig
from itpo_batch.run.logprob_cache import LogsLogprobs, cache_key, cache_path, reference_dataset
from itpo_batch.run.rounds import iterate

SMALL = {
    "rounds": 3, "n": 8, "group_size": 4, "max_new_tokens": 8, "rollout_batch": 8, "task": "clarify",
    "eval": {"n": 4, "max_new_tokens": 8}, "workers": 1,
    "ippo": {"max_states": 4, "samples_per_state": 2, "max_new_tokens": 8}, "q": {"epochs": 1},
}  # fmt: skip


def test_held_out_is_a_stable_hash_of_the_id_alone() -> None:
    ids = [f"conv-{i}" for i in range(4000)]
    mask = held_out(ids, 0.1)
    assert abs(mask.mean() - 0.1) < 0.02
    # the same id is held out whatever list it comes in (a later round's buffer keeps it out)
    assert np.array_equal(held_out(ids[::-1], 0.1), mask[::-1])
    assert not held_out(ids, 0.0).any()


def test_config_is_checked() -> None:
    with pytest.raises(ItpoError, match="scope"):
        BufferConfig(scope="all")  # type: ignore[arg-type]
    with pytest.raises(ItpoError, match="holdout"):
        BufferConfig(holdout=1.0)


@pytest.fixture(scope="module")
def buffered_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("buffer") / "run"
    cfg = from_mapping(IterateConfig, {**SMALL, "methods": ["itpo", "iterative_ppo", "outcome"]})
    iterate(cfg, run)
    return run


def _metrics(run: Path) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["method"], r["round"]): r for r in rows}


def test_credit_models_fit_on_the_growing_buffer(buffered_run: Path) -> None:
    m = _metrics(buffered_run)
    for method in ("itpo", "iterative_ppo"):
        # round k fits on the round-0 logs and the arm's own logs of rounds 1..k-1: 8 conversations each
        assert [m[method, k]["buffer/conversations"] for k in (1, 2, 3)] == [8, 16, 24]
        assert [m[method, k]["buffer/files"] for k in (1, 2, 3)] == [1, 2, 3]
    assert "buffer/conversations" not in m["outcome", 1]  # no credit model, no buffer
    held = [m["itpo", k]["buffer/holdout"] for k in (1, 2, 3)]
    assert held == sorted(held) and all(m["itpo", k]["prm/holdout/n_conversations"] == m["itpo", k][
        "buffer/holdout"] for k in (1, 2, 3) if m["itpo", k]["buffer/holdout"])  # fmt: skip
    # the x-axis of the learning curves: conversations consumed
    assert [m["itpo", k]["budget/conversations"] for k in (0, 1, 2, 3)] == [0, 8, 16, 24]


def _paths(run: Path, method: str, last: int) -> list[Path]:
    rd = RunDir(run)
    return [rd.checkpoint_dir(method, r, "policy").parent / "logs.parquet" for r in range(last, 0, -1)] + [
        run / "checkpoints" / "round0_logs.parquet"
    ]


def test_cap_newest_first_and_pi0_values_match_a_fresh_forward(buffered_run: Path, tiny_dir: Path) -> None:
    paths = _paths(buffered_run, "itpo", 2)
    prm_cfg, update_cfg = PRMConfig(), IterateConfig().update

    def cache(p: Path) -> LogsLogprobs | None:
        return LogsLogprobs.load(cache_path(p), cache_key(p, "tiny", prm_cfg, update_cfg))

    fit = fit_logs(paths, BufferConfig(max_conversations=10, holdout=0.3), cache)
    assert fit.files == 2  # 8 from the newest file, then whole files until the cap is reached
    ids = set(fit.all.conversations["conversation_id"].to_list())
    assert len(ids) == 16
    assert fit.holdout is not None and fit.train_ref is not None and fit.holdout_ref is not None
    # slow reference: π_0 run again on each part, conversation by conversation through the PRM's layout
    pi0 = load_model("tiny", role="reference", device=torch.device("cpu"), dtype=torch.float32)
    tok = load_tokenizer("tiny")
    for logs, ref in ((fit.train, fit.train_ref), (fit.holdout, fit.holdout_ref)):
        fresh = reference_dataset(pi0, tok, logs, prm_cfg).ref_logp
        torch.testing.assert_close(ref, fresh, rtol=1e-5, atol=1e-5)
    # a file without its cache: no values, the PRM runs π_0 itself
    nocache = fit_logs(paths, BufferConfig(), lambda p: None if p == paths[0] else cache(p))
    assert nocache.train_ref is None


def test_round_scope_is_the_old_behaviour(tmp_path: Path, tiny_dir: Path) -> None:
    cfg = from_mapping(
        IterateConfig, {**SMALL, "rounds": 2, "methods": ["itpo"], "buffer": {"scope": "round"}}
    )
    iterate(cfg, tmp_path / "run")
    m = _metrics(tmp_path / "run")
    assert "buffer/conversations" not in m["itpo", 2] and m["itpo", 2]["prm/n_conversations"] == 8
