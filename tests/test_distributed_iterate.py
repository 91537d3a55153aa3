"""``iterate`` under ``accelerate launch``: 2 CPU processes (gloo) against one, and the sharded rollout.

The launched run is compared with one process on a one-round run of two arms (itpo, outcome) at toy sizes
on ``clarify``: rollouts of 8 conversations in chunks of 4, so each rank plays a chunk. π_0's round-0
logs, its evaluations and their log-probs must be the same bytes (the sampled rollout dealt over ranks is
one process's); the metrics, the round's tables, the policy and PRM weights, and the conversations the
updated policies collect must agree to 1e-5 (relative; the updates sum gradients over ranks in another
order, so the weights differ in the last bits, and so do the behaviour log-probs sampled from them);
rank 0 alone writes (one line per arm and round, one summary printed, no temporary left).
The fast tests check, in one process, what the launched run relies on: dealing a rollout's chunks over
ranks and gathering them gives the one-process table bit for bit, and a launched run spawns no arm workers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.data.runlock import LOCK_NAME
from itpo_batch.model import dist
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.run.workers import worker_count
from itpo_batch.sim.rollout import HFPolicy, RolloutConfig, collect, rollout
from tests.test_iterate import WALL_CLOCK
from tests.toy_task import GuessTask

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CONFIG = {
    "rounds": 1, "methods": ["itpo", "outcome"], "task": "clarify", "n": 8, "group_size": 4,
    "max_new_tokens": 8, "rollout_batch": 4, "eval": {"n": 8, "max_new_tokens": 8, "batch_size": 4},
    "q": {"epochs": 1},
}  # fmt: skip
SAME_BYTES = ("round0_logs.parquet", "round0_logs.logprobs.safetensors", "pi0_eval.parquet",
              "pi0_eval_greedy_.parquet")  # fmt: skip


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` on 2 CPU processes (gloo), one thread each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                        "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _weights(path: Path) -> torch.Tensor:
    state = load_file(path / "model.safetensors")
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def _same_frames(one: pl.DataFrame, two: pl.DataFrame, runs: tuple[Path, Path], what: str) -> None:
    """Equal columns (floats to 1e-5; strings with each run's own path, e.g. ``source_file``, as RUN)."""
    assert one.columns == two.columns and one.height == two.height > 0, what
    for col in one.columns:
        a, b = one[col], two[col]
        if a.dtype.is_float():
            np.testing.assert_allclose(b.fill_null(0).to_numpy(), a.fill_null(0).to_numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{what}: {col}")  # fmt: skip
        else:
            if a.dtype == pl.String:
                a = a.str.replace_all(str(runs[0]), "RUN", literal=True)
                b = b.str.replace_all(str(runs[1]), "RUN", literal=True)
            assert a.equals(b), f"{what}: {col}"


def _metrics(run: Path) -> dict[tuple[str, int], dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_key = {(r["method"], r["round"]): r for r in lines}
    assert len(by_key) == len(lines)  # one line per (method, round): nobody appended twice
    return by_key


@pytest.mark.slow
def test_two_processes_iterate_like_one(tmp_path: Path, tiny_dir: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    two, one = tmp_path / "two", tmp_path / "one"
    res = _launch(["-m", "itpo_batch", "iterate", "--config", str(config), "--run-dir", str(two)], tmp_path)
    assert res.stdout.count("arm(s) ×") == 1  # rank 0 alone reports
    single = runner.invoke(app, ["iterate", "--config", str(config), "--run-dir", str(one), "--workers", "1"])
    assert single.exit_code == 0, single.output

    for name in SAME_BYTES:  # π_0's sampled and greedy rollouts, dealt over two ranks, are one process's
        assert (one / "checkpoints" / name).read_bytes() == (two / "checkpoints" / name).read_bytes(), name
    m_one, m_two = _metrics(one), _metrics(two)
    assert sorted(m_one) == sorted(m_two) == [(m, r) for m in ("itpo", "outcome") for r in (0, 1)]
    for key, a in m_one.items():
        b = {k: v for k, v in m_two[key].items() if k not in WALL_CLOCK}
        a = {k: v for k, v in a.items() if k not in WALL_CLOCK}
        assert a.keys() == b.keys(), key
        for k, v in a.items():
            if isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (key, k)
            else:
                assert b[k] == v, (key, k)
    for method in ("itpo", "outcome"):
        for table in ("turns", "conversations", "messages"):
            part = Path(table) / f"method={method}" / "round=1" / "part-0.parquet"
            _same_frames(pl.read_parquet(one / part), pl.read_parquet(two / part), (one, two), str(part))
        ck = Path("checkpoints") / f"method={method}" / "round=1"
        for kind in ("policy", "prm") if method == "itpo" else ("policy",):
            assert _rel(_weights(one / ck / kind), _weights(two / ck / kind)) < 1e-5, (method, kind)
        logs = [pq.read_table(run / ck / "logs.parquet") for run in (one, two)]  # π_1's own conversations
        assert logs[0].drop_columns(["behavior_logprobs"]).equals(logs[1].drop_columns(["behavior_logprobs"]))
        lp = [np.concatenate([np.concatenate(c) for c in t["behavior_logprobs"].to_pylist()]) for t in logs]
        np.testing.assert_allclose(lp[1], lp[0], rtol=0, atol=1e-5)
    assert not [p for p in two.rglob(".*") if p.name not in (".itpo-batch.json", LOCK_NAME)]  # no temporary
    assert (two / LOCK_NAME).read_text().count("pid ") == 1  # rank 0 alone held the run's lock


# -------------------------------------------------------------------------------- one process, fast


@pytest.fixture(scope="module")
def tiny_chat(tiny_dir: Path):
    """The tiny model with a bias towards eos, so replies of every length occur (and rows leave early)."""
    tok = load_tokenizer("tiny", padding_side="left")
    model = load_model("tiny", "reference")
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 5.0
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    return model, tok


def _as_launched(monkeypatch: pytest.MonkeyPatch, world: int, rank: int, others: Sequence[list]) -> list:
    """Make :mod:`itpo_batch.model.dist` answer as rank ``rank`` of ``world``; its gather returns this
    rank's items after ``others`` (the other ranks' items); returns the list that receives this rank's."""
    sent: list = []

    def gather(items: list) -> list:
        sent.extend(items)
        return [x for part in others for x in part] + list(items)

    for name, value in (("is_distributed", True), ("num_processes", world), ("rank", rank),
                        ("is_main_process", rank == 0)):  # fmt: skip
        monkeypatch.setattr(dist, name, lambda v=value: v)
    monkeypatch.setattr(dist, "gather_objects", gather)
    return sent


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_rollout_dealt_over_ranks_is_one_process_table(
    tiny_chat, temperature: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = tiny_chat
    task, cfg = GuessTask(), RolloutConfig(n=11, group_size=3, seed=5, batch_size=3, max_new_tokens=6,
                                           temperature=temperature)  # fmt: skip
    whole = rollout(task, HFPolicy(model, tok, cfg), cfg, progress=False)  # 4 chunks: 3, 3, 3, 2
    parts: list[list] = []
    for rank in (2, 1):  # the ranks that do not gather last, each with a fresh policy (its own process)
        parts.append(_as_launched(monkeypatch, 3, rank, []))
        rollout(task, HFPolicy(model, tok, cfg), cfg, progress=False)
    assert [c for c, _ in parts[0]] == [2] and [c for c, _ in parts[1]] == [1]
    _as_launched(monkeypatch, 3, 0, parts)  # rank 0: chunks 0 and 3, one after the other on one engine
    dealt = rollout(task, HFPolicy(model, tok, cfg), cfg, progress=False)
    assert dealt.equals(whole)
    sink = [pa.BufferOutputStream(), pa.BufferOutputStream()]
    for table, out in zip((whole, dealt), sink, strict=True):
        pq.write_table(table, out)
    assert sink[0].getvalue() == sink[1].getvalue()  # the same file bytes (the log-prob cache keys hash them)


def test_chunks_play_like_in_the_whole_rollout(tiny_chat) -> None:
    model, tok = tiny_chat
    task, cfg = GuessTask(), RolloutConfig(n=9, group_size=3, seed=2, batch_size=3, max_new_tokens=6)
    whole = collect(task, HFPolicy(model, tok, cfg), cfg, progress=False)
    some = collect(task, HFPolicy(model, tok, cfg), cfg, progress=False, chunks=[2])
    assert [(r.conversation_id, r.token_ids, r.logprobs) for r in some] == [
        (r.conversation_id, r.token_ids, r.logprobs) for r in whole[6:]
    ]


def test_a_launched_run_spawns_no_arm_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_count(3, 4) == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert worker_count("auto", 4) == worker_count(3, 4) == 1
