"""Per-round evaluation: t quantiles and intervals, logs statistics vs a row loop, greedy eval, KL to π₀."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from itpo_batch.data.schemas import nested_logs_schema
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.model.render import RenderConfig, render
from itpo_batch.model.tiny_corpus import generate_corpus
from itpo_batch.run.evaluate import EvalConfig, greedy_eval, kl_to_reference, logs_stats
from itpo_batch.run.intervals import mean_ci, t_quantile_975
from itpo_batch.sim.envs.base import load_task

NAN = float("nan")


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for integer df, closed form of Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    total, coef = 0.0, 1.0
    if df % 2:
        for k in range((df - 1) // 2):  # c + (2/3)c^3 + (2·4)/(3·5)c^5 + …
            coef *= 2 * k / (2 * k + 1) if k else 1.0
            total += coef * c ** (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    for k in range(df // 2):  # 1 + (1/2)c^2 + (1·3)/(2·4)c^4 + …
        coef *= (2 * k - 1) / (2 * k) if k else 1.0
        total += coef * c ** (2 * k)
    return s * total


def loop_mean_ci(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# --- t quantiles and mean_ci (their only tests: run.intervals serves both evaluate and the report) ---


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (20, 2.086), (30, 2.042), (40, 2.021),
     (60, 2.000), (120, 1.980), (10**6, 1.960)],
)  # fmt: skip
def test_t_quantile_known_values(df: int, expected: float) -> None:
    assert t_quantile_975(df) == pytest.approx(expected, abs=6e-4)


def test_t_quantile_hits_the_exact_cdf_and_has_no_jump() -> None:
    for df in range(1, 301):
        assert t_two_sided_mass(t_quantile_975(df), df) == pytest.approx(0.95, abs=2e-6), df
    steps = [t_quantile_975(df) - t_quantile_975(df + 1) for df in range(1, 300)]
    assert all(s > 0 for s in steps)  # decreasing, including across the table/expansion switch at 30
    assert steps[29] < steps[28]
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_mean_ci_matches_loop_and_edge_cases() -> None:
    values = [0.3, 1.7, -0.4, 2.2, 0.9, 0.0, 1.1]
    assert mean_ci(values) == pytest.approx(loop_mean_ci(values), abs=1e-12)
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0])  # sd = sqrt(5/3), t(3) = 3.182446
    assert (mean, high - mean) == pytest.approx((2.5, 3.182446 * math.sqrt(5 / 3) / 2), abs=1e-9)
    assert low == pytest.approx(2 * mean - high)
    one = mean_ci([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in mean_ci([]))
    tie = mean_ci([0.1] * 5)
    assert tie[1] == tie[0] == tie[2]
    with pytest.raises(ValueError):
        mean_ci([1.0, NAN])
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], level=0.9)


# --- logs_stats --------------------------------------------------------------------------------------


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def hand_logs() -> pa.Table:
    """Three conversations: 2, 1 and 2 assistant turns; tabs/newlines/double spaces; one lacks success."""
    rows = [
        (
            [_msg("system", "be brief"), _msg("user", "hi there"), _msg("assistant", "Hello  there friend"),
             _msg("user", "and?"), _msg("assistant", "a\tb\nc ")],
            1.0, {"success": True, "score": 0.9, "cost": 0.1},
        ),
        (
            [_msg("user", "many many words in this user message"), _msg("assistant", "one")],
            0.0, {"success": False, "score": 0.1},
        ),
        (
            [_msg("user", "q"), _msg("assistant", " x y "), _msg("tool", "t u v"), _msg("assistant", "z")],
            0.5, {"score": 0.4, "n_turns": 2},
        ),
    ]  # fmt: skip
    return pa.Table.from_pydict(
        {
            "conversation_id": [f"c{i}" for i in range(len(rows))],
            "group_id": ["g0", "g0", "g1"],
            "task": ["toy"] * len(rows),
            "messages": [r[0] for r in rows],
            "outcome": [r[1] for r in rows],
            "behavior_logprobs": [None] * len(rows),
            "oracle_turn_utility": [[0.0]] * len(rows),
            "metadata": [json.dumps(r[2]) for r in rows],
        },
        schema=nested_logs_schema(),
    )


def loop_stats(table: pa.Table, prefix: str) -> dict[str, float]:
    """Plain per-row reference for :func:`logs_stats`."""
    rows = table.to_pylist()
    metas = [json.loads(r["metadata"]) if r.get("metadata") else {} for r in rows]
    success = [float(m["success"]) for m in metas if m.get("success") is not None]
    score = [float(m["score"]) for m in metas if m.get("score") is not None]
    turns, words = [], []
    for r in rows:
        asst = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        turns.append(len(asst))
        words.append(sum(len(text.split()) for text in asst))
    mean, low, high = loop_mean_ci([r["outcome"] for r in rows])
    stats = {
        "outcome_mean": mean,
        "outcome_ci_low": low,
        "outcome_ci_high": high,
        "success": sum(success) / len(success) if success else NAN,
        "score": sum(score) / len(score) if score else NAN,
        "turns": sum(turns) / len(rows),
        "words": sum(words) / len(rows),
        "n": float(len(rows)),
    }
    return {prefix + k: v for k, v in stats.items()}


def _assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert (math.isnan(got[key]) and math.isnan(value)) or got[key] == pytest.approx(value, abs=1e-12), (
            key
        )


def test_logs_stats_matches_row_loop() -> None:
    table = hand_logs()
    got = logs_stats(table, "x/")
    _assert_same(got, loop_stats(table, "x/"))
    # by hand: turns (2+1+2)/3, words (3+3 + 1 + 2+1)/3, success over the two rows that have it
    assert got["x/turns"] == pytest.approx(5 / 3) and got["x/words"] == pytest.approx(10 / 3)
    assert got["x/success"] == 0.5 and got["x/score"] == pytest.approx(1.4 / 3) and got["x/n"] == 3
    assert set(logs_stats(table)) == {k.replace("x/", "eval/") for k in got}


def test_logs_stats_without_metadata_and_empty() -> None:
    table = hand_logs()
    got = logs_stats(table.drop_columns(["metadata"]))
    assert math.isnan(got["eval/success"]) and math.isnan(got["eval/score"])
    assert got["eval/words"] == pytest.approx(10 / 3) and got["eval/outcome_mean"] == pytest.approx(0.5)
    nulls = table.set_column(
        table.schema.get_field_index("metadata"), "metadata", pa.array([None] * 3, pa.string())
    )
    assert math.isnan(logs_stats(nulls)["eval/success"])
    empty = logs_stats(table.slice(0, 0))
    assert empty["eval/n"] == 0 and math.isnan(empty["eval/outcome_mean"])


# --- greedy_eval and kl_to_reference on the tiny model ----------------------------------------------


@pytest.fixture(scope="module")
def policy(tiny_dir: Path) -> torch.nn.Module:
    return load_model(str(tiny_dir), role="policy")  # train mode, float32 on CPU


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="module")
def greedy_run(policy, tokenizer) -> tuple[pa.Table, dict[str, float]]:
    cfg = EvalConfig(n=4, max_new_tokens=16, batch_size=3)
    modes: list[bool] = []
    handle = policy.register_forward_pre_hook(lambda m, _args: modes.append(m.training))
    try:
        policy.train()
        out = greedy_eval(policy, tokenizer, load_task("medical"), cfg)
    finally:
        handle.remove()
    assert modes and not any(modes)  # every forward ran in eval mode
    assert policy.training  # training mode restored
    return out


def test_greedy_eval_rows_stats_and_determinism(policy, tokenizer, greedy_run) -> None:
    table, stats = greedy_run
    assert table.num_rows == 4 and table.schema.equals(nested_logs_schema())
    _assert_same(stats, loop_stats(table, "eval/greedy_"))
    assert all(json.loads(m)["temperature"] == 0.0 for m in table["metadata"].to_pylist())
    policy.eval()
    again, stats_again = greedy_eval(
        policy, tokenizer, load_task("medical"), EvalConfig(n=4, max_new_tokens=16, batch_size=3)
    )
    assert not policy.training  # eval mode restored to eval
    policy.train()
    assert again["outcome"].to_pylist() == table["outcome"].to_pylist()
    assert again["messages"].to_pylist() == table["messages"].to_pylist()
    _assert_same(stats_again, stats)


def loop_kl(policy, reference, tokenizer, chats) -> tuple[float, float]:
    """Per-conversation full-logits forwards, log_softmax, gather; token-weighted k1 and k3."""
    rendered = render(chats, tokenizer, RenderConfig(overflow="truncate")).conversations
    k1 = k3 = 0.0
    n = 0
    with torch.no_grad():
        for conv in rendered:
            ids = torch.as_tensor(conv.input_ids)[None]
            mask = torch.as_tensor(conv.assistant_mask)[1:]
            lp = [
                torch.log_softmax(m(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[
                    :, 0
                ]
                for m in (policy, reference)
            ]
            d = (lp[1] - lp[0])[mask]
            k1 += float((-d).sum())
            k3 += float((d.exp() - d - 1).sum())
            n += int(mask.sum())
    return k1 / n, k3 / n


def test_kl_zero_for_same_or_equal_model(policy, tokenizer, greedy_run) -> None:
    chats = greedy_run[0]["messages"].to_pylist()
    same = kl_to_reference(policy, policy, tokenizer, chats, batch_tokens=512)
    assert same == {"policy/kl_pi0": 0.0, "policy/kl_pi0_k3": 0.0}
    twin = kl_to_reference(policy, copy.deepcopy(policy), tokenizer, chats, prefix="kl")
    assert twin == {"kl": 0.0, "kl_k3": 0.0}
    assert policy.training
    empty = kl_to_reference(policy, policy, tokenizer, [])
    assert all(math.isnan(v) for v in empty.values())


def test_kl_perturbed_matches_padded_loop(policy, tokenizer, greedy_run) -> None:
    lines = generate_corpus(seed=5, n_lines=30)  # varied assistant text (the untrained model only says "...")
    chats = greedy_run[0]["messages"].to_pylist() + [
        [_msg("user", lines[2 * i]), _msg("assistant", lines[2 * i + 1]), _msg("user", "ok"),
         _msg("assistant", lines[20 + i])]
        for i in range(4)
    ]  # fmt: skip
    reference = copy.deepcopy(policy).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # tied embeddings: the input embedding moves too
        weight = reference.get_output_embeddings().weight
        weight.add_(0.01 * torch.randn(weight.shape, generator=gen))
    got = kl_to_reference(policy, reference, tokenizer, chats, batch_tokens=400, chunk_size=100)
    k1, k3 = loop_kl(policy, reference, tokenizer, chats)
    assert got["policy/kl_pi0_k3"] > 1e-3
    assert got["policy/kl_pi0"] == pytest.approx(k1, abs=1e-5)
    assert got["policy/kl_pi0_k3"] == pytest.approx(k3, abs=1e-5)
    assert policy.training and not reference.training
