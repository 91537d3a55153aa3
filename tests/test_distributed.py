"""Two CPU processes (gloo, ``accelerate launch``) against one, on fixed simulated logs with the tiny model.

The launch is the documented one: ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2``
(on a machine without GPUs ``--cpu --num_processes 2`` still starts one process, docs/platform research),
each process with one thread. Compared with one process: the reference log-probs and the scored turns
(to 1e-5), the PRM, the policy after one update and the critic (parameters to 1e-5 relative, L2), the
SFT checkpoint written by rank 0, and every metric. The data make every lock-step path run (a tail
mini-batch of one conversation, uneven micro-batch counts), and the test checks that the per-shard
normaliser of the official code would have changed the rewards here, so a normaliser that is not
all-reduced (MAX) fails it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.model import dist
from tests import dist_equivalence

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` on 2 CPU processes (gloo), one thread each."""
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _same_metrics(one: dict, many: dict) -> None:
    assert one.keys() == many.keys()
    for k, v in one.items():
        if k.endswith("_seconds"):
            continue
        if isinstance(v, float) and not math.isnan(v):
            assert many[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        else:
            assert many[k] == v or (v != v and many[k] != many[k]), k


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("dist") / "medical.parquet"
    args = ["simulate", "--task", "medical", "--n", "11", "--group-size", "3", "-o", str(path)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return path


@pytest.mark.slow
def test_two_processes_fit_score_and_update_like_one(logs: Path, tmp_path: Path) -> None:
    _launch([str(ROOT / "tests" / "dist_equivalence.py"), str(logs), str(tmp_path / "two")], tmp_path)
    one = dist_equivalence.run(str(logs), "tiny", tmp_path / "one.sft")
    ranks = [torch.load(tmp_path / f"two.rank{r}.pt", weights_only=False) for r in (0, 1)]
    for many in ranks:
        assert torch.allclose(many["ref_logp"], one["ref_logp"], rtol=0, atol=1e-6)
        turns_one, turns_many = pl.DataFrame(one["turns"]), pl.DataFrame(many["turns"])
        assert turns_one.select("conversation_id", "turn").equals(
            turns_many.select("conversation_id", "turn")
        )
        for col in ("implicit_reward", "implicit_reward_normalized", "itpo_norm_weight", "itpo_norm_reward"):
            np.testing.assert_allclose(
                turns_many[col].to_numpy(), turns_one[col].to_numpy(), rtol=0, atol=1e-5
            )
        assert many["normalizer"] == pytest.approx(one["normalizer"], rel=1e-5)
        assert many["n_bar"] == one["n_bar"]
        assert torch.allclose(many["advantages"], one["advantages"], rtol=0, atol=1e-5)
        for key in ("prm_params", "policy_params", "critic_params"):
            assert _rel(one[key], many[key]) < 1e-5, key
        for key in ("prm_metrics", "score_metrics", "update_metrics", "critic_metrics"):
            _same_metrics(one[key], many[key])
        for a, b in zip(one["sft_metrics"], many["sft_metrics"], strict=True):
            _same_metrics(a, b)
        # the official per-shard normaliser gives other rewards on these logs: a local max would fail above
        assert (many["local_token_rewards"] - many["token_rewards"]).abs().max() > 1e-3
    assert one["update_metrics"]["update/steps"] == 3  # 11 conversations in mini-batches of 5: 5, 5, 1
    sft_one, sft_two = (
        load_file(tmp_path / "one.sft" / "model.safetensors"),
        load_file(tmp_path / "two.sft" / "model.safetensors"),
    )
    flat = [torch.cat([d[k].flatten() for k in sorted(d)]) for d in (sft_one, sft_two)]
    assert _rel(*flat) < 1e-5


@pytest.mark.slow
def test_accelerate_launch_score_writes_one_run_equal_to_one_process(logs: Path, tmp_path: Path) -> None:
    opts = ["--prm-epochs", "1", "--q-epochs", "1"]
    res = _launch(["-m", "itpo_batch", "score", str(logs), "-o", str(tmp_path / "two"), *opts], tmp_path)
    assert res.stdout.count("scored ") == 1  # rank 0 alone prints (and writes)
    one = runner.invoke(app, ["score", str(logs), "-o", str(tmp_path / "one"), *opts])
    assert one.exit_code == 0, one.output
    turns = [pl.read_parquet(tmp_path / r / "turns" / "**" / "*.parquet").sort("conversation_id", "turn")
             for r in ("one", "two")]  # fmt: skip
    assert turns[0].height == turns[1].height > 11
    for col in turns[0].columns:
        if turns[0][col].dtype.is_float():
            a, b = turns[0][col].fill_null(0).to_numpy(), turns[1][col].fill_null(0).to_numpy()
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=col)
        else:
            assert turns[0][col].equals(turns[1][col]), col
    metrics = [json.loads((tmp_path / r / "metrics.jsonl").read_text()) for r in ("one", "two")]
    _same_metrics(*metrics)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_one_process_needs_no_accelerator() -> None:
    assert not dist.launched() and dist.num_processes() == 1 and dist.rank() == 0 and dist.is_main_process()
    assert dist.all_reduce(2.5, "max") == 2.5 and dist.split([1, 2, 3]) == [1, 2, 3]
    assert dist._ACCELERATOR is None  # nothing in one process creates it


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_groups_are_dealt_whole_and_the_union_is_everything(world: int, monkeypatch) -> None:
    groups = ["a", "b", "a", "c", "c", "d", "b", "e", "a"]
    monkeypatch.setattr(dist, "num_processes", lambda: world)
    shards, halves = [], []
    for r in range(world):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        shards.append(dist.shard_by_group(groups))
        halves.append(dist.split(list(range(7))))
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(groups)))
    for g in set(groups):  # every group on exactly one rank
        assert sum(any(groups[i] == g for i in s) for s in shards) == 1
    assert [i for h in halves for i in h] == list(range(7)) and max(map(len, halves)) - min(
        map(len, halves)
    ) <= 1
