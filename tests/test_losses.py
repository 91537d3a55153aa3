"""Policy loss (itpo_batch.rl.losses) against a per-token loop, and micro-batch × grad-accumulation equivalence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itpo_batch.rl import losses as Lo


def loop_loss(logp, old, adv, conv, ref, ent, cfg: Lo.PolicyLossConfig) -> tuple[float, dict]:
    """docs/method.md §5.1–5.2, one token at a time, then per-conversation means (or one token mean)."""
    per_tok: dict[str, list[float]] = {k: [] for k in ("loss", "pg", "clip", "dual", "akl", "kl", "ent")}
    for lp, o, a, r, h in zip(logp, old, adv, ref, ent, strict=True):
        rho = math.exp(max(-20.0, min(20.0, lp - o)))
        unclipped, clipped = -a * rho, -a * min(max(rho, 1 - cfg.clip_low), 1 + cfg.clip_high)
        pg = max(unclipped, clipped)
        dual = False
        if a < 0:
            dual = pg > -a * cfg.dual_clip
            pg = min(pg, -a * cfg.dual_clip)
        d = max(-20.0, min(20.0, r - lp))
        kl = max(-10.0, min(10.0, math.exp(d) - d - 1))
        per_tok["loss"].append(pg - cfg.entropy_coef * h + cfg.kl_coef * kl)
        for key, v in (("pg", pg), ("clip", float(clipped > unclipped)), ("dual", float(dual))):
            per_tok[key].append(v)
        per_tok["akl"].append(-max(-20.0, min(20.0, lp - o)))  # verl ppo_kl uses the clamped log-ratio
        per_tok["kl"].append(kl)
        per_tok["ent"].append(h)

    def agg(vals: list[float]) -> float:
        if cfg.aggregation == "token-mean":
            return sum(vals) / len(vals)
        by_conv: dict = {}
        for c, v in zip(conv, vals, strict=True):
            by_conv.setdefault(c, []).append(v)
        return sum(sum(v) / len(v) for v in by_conv.values()) / len(by_conv)

    return agg(per_tok["loss"]), {k: agg(v) for k, v in per_tok.items()}


def random_tokens(seed: int, n: int = 80, n_conv: int = 6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(n, generator=g, dtype=torch.float64) * 0.4  # many tokens outside [0.8, 1.2]
    logp[:3] = old[:3] + torch.tensor([3.0, -3.0, 30.0], dtype=torch.float64)  # dual clip and ±20 clamps
    adv = torch.randn(n, generator=g, dtype=torch.float64) * 2
    adv[:3] = -adv[:3].abs() - 0.1  # negative advantages at large ratios: the dual clip is taken
    conv = torch.randint(0, n_conv, (n,), generator=g) * 7 + 100  # arbitrary ids, tokens interleaved
    ref = logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    ent = torch.rand(n, generator=g, dtype=torch.float64) * 2
    return logp, old, adv, conv, ref, ent


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("seed", range(4))
def test_loss_matches_loop(seed: int, aggregation: str) -> None:
    cfg = Lo.PolicyLossConfig(aggregation=aggregation, entropy_coef=0.01, kl_coef=0.05)  # visible terms
    logp, old, adv, conv, ref, ent = random_tokens(seed)
    loss, metrics = Lo.policy_loss(logp, old, adv, conv, cfg, ref_logp=ref, entropy=ent)
    expected, m = loop_loss(*(t.tolist() for t in (logp, old, adv, conv, ref, ent)), cfg)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    pairs = {"pg_loss": "pg", "clip_frac": "clip", "clip_frac_lower": "dual", "approx_kl": "akl"}
    for name, key in {**pairs, "kl": "kl", "entropy": "ent"}.items():
        assert metrics[name].item() == pytest.approx(m[key], abs=1e-12), name
    assert metrics["clip_frac_lower"].item() > 0 and metrics["clip_frac"].item() > 0


def test_on_policy_gradient_is_minus_advantage() -> None:
    """At ρ = 1 nothing is clipped and ∂loss/∂logp_t = −A_t / (|conv| · n_conv)."""
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, metrics = Lo.policy_loss(logp, logp.detach(), adv, torch.tensor([0, 0, 1]))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.25, 0.5, -0.25]))
    assert metrics["clip_frac"].item() == 0 and set(metrics) == {
        "pg_loss",
        "clip_frac",
        "clip_frac_lower",
        "approx_kl",
    }


def test_empty_and_bad_inputs() -> None:
    e = torch.zeros(0)
    loss, metrics = Lo.policy_loss(e, e, e, e.long(), ref_logp=e, entropy=e)
    assert loss.item() == 0 and all(torch.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="flat"):
        Lo.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3).long())
    with pytest.raises(ValueError, match="aggregation"):
        Lo.aggregate(torch.ones(2), torch.zeros(2).long(), "seq-sum")  # type: ignore[arg-type]


class TinyPolicy(torch.nn.Module):
    """Features → logits over a 11-token vocabulary; per-token log-prob and entropy of given targets."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 11))

    def forward(self, feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = torch.log_softmax(self.net(feats), dim=-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        return logprobs.gather(1, targets[:, None])[:, 0], entropy


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_microbatch_accumulation_matches_full_batch(aggregation: str) -> None:
    """Two micro-batches of whole conversations, accumulated, give the full batch's gradient."""
    torch.manual_seed(0)
    model = TinyPolicy().double()
    lengths = [5, 9, 3, 12, 7, 4]  # six conversations, packed one after another
    conv = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    n = int(conv.numel())
    feats, targets = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 11, (n,))
    with torch.no_grad():
        old = model(feats, targets)[0] + 0.3 * torch.randn(
            n, dtype=torch.float64
        )  # off-policy: clipping active
        ref = old + 0.2 * torch.randn(n, dtype=torch.float64)
    adv = torch.randn(n, dtype=torch.float64) * 2
    cfg = Lo.PolicyLossConfig(aggregation=aggregation, entropy_coef=0.01, kl_coef=0.05)

    def grads(parts: list[torch.Tensor], weighting: str) -> list[torch.Tensor]:
        model.zero_grad()
        for idx in parts:
            logp, ent = model(feats[idx], targets[idx])
            args = (logp, old[idx], adv[idx], conv[idx], cfg, ref[idx], ent)
            if weighting == "denominator":
                total = float(len(lengths)) if aggregation == "seq-mean-token-mean" else float(n)
                loss = Lo.policy_loss(*args, denominator=total)[0]
            else:  # weight by the micro-batch's share of conversations (or tokens)
                share = (
                    conv[idx].unique().numel() / len(lengths) if aggregation != "token-mean" else len(idx) / n
                )
                loss = Lo.policy_loss(*args)[0] * share
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    full = grads([torch.arange(n)], "local")
    first = torch.isin(conv, torch.tensor([0, 2, 5]))  # conversations split 3 + 3, not contiguous
    halves = [first.nonzero()[:, 0], (~first).nonzero()[:, 0]]
    for weighting in ("local", "denominator"):
        for a, b in zip(full, grads(halves, weighting), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in full)
    np.testing.assert_(Lo.policy_loss(model(feats, targets)[0], old, adv, conv, cfg)[1]["clip_frac"] > 0)
