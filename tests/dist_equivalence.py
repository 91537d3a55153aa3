"""Driver of tests/test_distributed.py: one PRM fit + score, one policy update and one critic fit on fixed logs.

Run as ``python tests/dist_equivalence.py LOGS OUT`` (one process) or under ``accelerate launch`` (N
processes); every rank writes ``OUT.rank<r>.pt`` with what it computed and rank 0 the SFT model to
``OUT.sft``, so the test compares one process with each rank of N. Small buffers (``batch_tokens``) and
mini-batches of 5 make several micro-batches per step, uneven between ranks, and (11 conversations) a
tail mini-batch of one, so a rank runs a weight-0 filler.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

BATCH_TOKENS = 160


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


def run(logs_path: str, model: str, sft_dir: Path) -> dict:
    """Everything the equivalence test compares, as tensors / floats / lists."""
    from itpo_batch.credit.prm import ImplicitPRM, PRMConfig
    from itpo_batch.data.validate import read_logs
    from itpo_batch.model.loading import load_model
    from itpo_batch.model.packing import pad
    from itpo_batch.model.sft import SFTConfig, train_sft
    from itpo_batch.rl.critic import CriticConfig, fit_critic
    from itpo_batch.rl.estimators import group_index_from_ids
    from itpo_batch.rl.methods import METHODS, CreditBatch, MethodConfig, advantages
    from itpo_batch.rl.update import UpdateConfig, UpdateData, recompute_logprobs, update_policy

    torch.manual_seed(0)
    logs = read_logs([Path(logs_path)])
    cfg = PRMConfig(epochs=1, mini_batch=5, shuffle=True, batch_tokens=BATCH_TOKENS, lr=1e-3)
    prm = ImplicitPRM.load(model, cfg, device="cpu")
    data = prm.prepare_logs(logs)
    fit = prm.fit(data, seed=1)
    scores = prm.score(data)
    out: dict = {
        "ref_logp": data.ref_logp.cpu(),
        "prm_params": _params(prm.model),
        "prm_metrics": fit["metrics"] | fit["history"][-1],
        "normalizer": scores.normalizer,
        "token_rewards": scores.token_rewards.cpu(),
        "turns": scores.turns.sort("conv_index", "turn").to_dict(as_series=False),
        "score_metrics": scores.metrics,
        "n_bar": data.mean_turn_length(),
    }
    prm.cfg = dataclasses.replace(cfg, normalize="local")  # the official per-shard max, for contrast
    out["local_token_rewards"] = prm.score(data).token_rewards.cpu()
    prm.cfg = cfg
    _, _, mask, _ = pad(data.rendered, 0)
    padded = torch.zeros(mask.shape)
    padded[mask] = scores.token_rewards.float().cpu()
    batch = CreditBatch(
        mask, data.outcomes.float(), group_index_from_ids([str(g) for g in data.groups]),
        token_rewards=padded, mean_length=out["n_bar"],
    )  # fmt: skip
    adv, ret, _ = advantages(METHODS["itpo_norm"], batch, MethodConfig())
    policy = load_model(model, role="policy", device="cpu", dtype=torch.float32)
    old = recompute_logprobs(policy, data.rendered, BATCH_TOKENS)
    update = UpdateData(data.rendered, adv[mask], old, data.offsets.cpu(), data.ref_logp.cpu())
    ucfg = UpdateConfig(mini_batch=5, batch_tokens=BATCH_TOKENS, shuffle=True, lr=1e-3)
    metrics = update_policy(policy, update, ucfg, seed=2)
    out |= {"advantages": adv[mask], "old_logp": old, "policy_params": _params(policy)}
    out["update_metrics"] = {k: v for k, v in metrics.items() if k != "update/seconds"}
    critic = load_model(model, role="value", device="cpu", dtype=torch.float32)
    out["critic_metrics"] = fit_critic(
        critic, data.rendered, ret[mask], CriticConfig(epochs=1, batch_tokens=BATCH_TOKENS)
    )
    out["critic_params"] = _params(critic)
    sft = SFTConfig(model=model, epochs=1, batch_tokens=400, lr=1e-3)
    out["sft_metrics"] = [
        {k: v for k, v in m.items() if k != "sft/tokens_per_s"} for m in train_sft(logs, sft, sft_dir)
    ]
    return out


def main() -> None:
    logs_path, out_path = sys.argv[1], sys.argv[2]
    result = run(logs_path, os.environ.get("ITPO_EQUIV_MODEL", "tiny"), Path(f"{out_path}.sft"))
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result, f"{out_path}.rank{rank}.pt")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
