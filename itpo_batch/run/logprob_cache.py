"""π_0's and the collecting policy's log-probs of a logs file, computed once and kept beside it.

Round ``k`` of an arm collects logs with π_k and measures KL(π_k‖π_0) on them; round ``k+1`` consumes
the same logs and needs π_0's log-probs of them again (the PRM's π_ref and the update's KL reference)
and π_k's (the update's old log-probs where the behaviour log-probs do not cover a conversation).
:func:`logs_logprobs` computes both once, when the logs are collected, and :meth:`LogsLogprobs.save`
keeps them beside the logs (``logs.logprobs.safetensors``), so a round runs π_0 once (issue 14).

Design decisions:

- **The PRM's rendering and packing.** π_0 runs through
  :func:`itpo_batch.credit.prm_data.prepare_dataset` with the PRM's render and buffer settings, exactly
  as the next round's PRM (or the outcome arm's reference) would: the cached values are the ones that
  round would compute, bit for bit.
- **The collecting policy's log-probs** are the logged behaviour log-probs where they cover a
  conversation (every assistant turn has one value per rendered token and none was re-tokenised
  differently, :func:`itpo_batch.rl.update.logged_logprobs`) and the policy's forward elsewhere (:func:`itpo_batch.rl.update.behaviour_logprobs`):
  the same rule as the update's old log-probs, so these *are* the next round's old log-probs. For π_0
  itself the forward is π_0's, already computed. The KL estimate of :meth:`LogsLogprobs.kl` therefore
  scores the sampling policy's own log-probs (recorded while sampling) instead of a re-forward of the
  same weights: equal up to float rounding.
- **A cache, keyed by what it depends on.** The file's metadata holds the SHA-256 of the logs file, the
  reference model and the render/buffer settings; :meth:`LogsLogprobs.load` returns None when any
  differs or the file is absent or unreadable, and the round computes the values itself. Written
  atomically, before the round's commit; a redone round rewrites it with the same values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from itpo_batch.credit.prm import PRMConfig
from itpo_batch.credit.prm_data import PRMDataset, prepare_dataset
from itpo_batch.data.io import atomic_path
from itpo_batch.data.validate import Logs
from itpo_batch.model.render import RenderConfig
from itpo_batch.rl.update import UpdateConfig, behaviour_logprobs, logged_logprobs, retokenized

SUFFIX = ".logprobs.safetensors"
META = "itpo_batch.logprobs"


def cache_path(logs_path: Path) -> Path:
    """Where the log-probs of ``logs_path`` are kept (``logs.parquet`` → ``logs.logprobs.safetensors``)."""
    return logs_path.with_name(logs_path.stem + SUFFIX)


def cache_key(
    logs_path: Path, reference: str, prm_cfg: PRMConfig, update_cfg: UpdateConfig
) -> dict[str, str]:
    """What the cached values depend on: the logs' bytes, π_0 and the render and buffer settings."""
    settings = {"max_length": prm_cfg.max_length, "overflow": prm_cfg.overflow,
                "batch_tokens": prm_cfg.batch_tokens, "chunk_size": prm_cfg.chunk_size,
                "update_batch_tokens": update_cfg.batch_tokens, "update_chunk_size": update_cfg.chunk_size}  # fmt: skip
    digest = hashlib.sha256(Path(logs_path).read_bytes()).hexdigest()
    return {
        "logs_sha256": digest,
        "reference": str(reference),
        "settings": json.dumps(settings, sort_keys=True),
    }


@dataclass
class LogsLogprobs:
    """Log-probs of every assistant token of a logs file (flat ``[A]``, the PRM dataset's layout)."""

    conversation_ids: list[str]  # [N] the rendered conversations, in order
    offsets: torch.Tensor  # int64 [N+1]
    ref_logp: torch.Tensor  # float32 [A]: π_0
    policy_logp: torch.Tensor  # float32 [A]: the collecting policy (behaviour where logged, else its forward)
    logged: int  # conversations whose behaviour log-probs were taken

    def kl(self, prefix: str = "policy/kl_pi0") -> dict[str, float]:
        """Per-token KL(π‖π_0) estimates k1 and k3 (:func:`itpo_batch.run.evaluate.kl_to_reference`)."""
        if self.ref_logp.numel() == 0:
            return {prefix: float("nan"), f"{prefix}_k3": float("nan")}
        d = self.ref_logp.double() - self.policy_logp.double()
        return {prefix: float(-d.mean()), f"{prefix}_k3": float((torch.expm1(d) - d).mean())}

    def fits(self, data: PRMDataset) -> bool:
        """Whether these values describe ``data``'s conversations (same ones, same token counts)."""
        return self.conversation_ids == list(data.conversation_ids) and torch.equal(
            self.offsets, data.offsets.cpu()
        )

    def save(self, path: Path, key: dict[str, str]) -> None:
        """Write to ``path`` atomically, with ``key`` (:func:`cache_key`) in the metadata."""
        tensors = {"offsets": self.offsets, "ref_logp": self.ref_logp, "policy_logp": self.policy_logp}
        meta = {**key, "conversation_ids": self.conversation_ids, "logged": self.logged}
        with atomic_path(path) as tmp:  # one metadata entry: the header's bytes do not depend on key order
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={META: json.dumps(meta, sort_keys=True)})  # fmt: skip

    @classmethod
    def load(cls, path: Path, key: dict[str, str]) -> LogsLogprobs | None:
        """The values kept at ``path`` when their key equals ``key``; None when absent, stale or unreadable."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[META])
                if any(meta.get(k) != v for k, v in key.items()):
                    return None
                tensors = {k: f.get_tensor(k) for k in ("offsets", "ref_logp", "policy_logp")}
        except (OSError, SafetensorError, ValueError, KeyError, TypeError):
            return None
        return cls(meta["conversation_ids"], tensors["offsets"], tensors["ref_logp"],
                   tensors["policy_logp"], int(meta["logged"]))  # fmt: skip


def reference_dataset(reference: nn.Module, tokenizer: Any, logs: Logs, prm_cfg: PRMConfig,
                      ref_logp: torch.Tensor | None = None) -> PRMDataset:  # fmt: skip
    """The logs rendered and packed as the PRM does, with π_0's assistant log-probs (run unless given)."""
    conv = logs.conversations
    return prepare_dataset(
        reference, tokenizer, logs.chats(), conv["outcome"].to_numpy(),
        RenderConfig(max_length=prm_cfg.max_length, overflow=prm_cfg.overflow), prm_cfg.batch_tokens,
        groups=conv["group_id"].to_numpy(), conversation_ids=conv["conversation_id"].to_list(),
        chunk_size=prm_cfg.chunk_size, ref_logp=ref_logp,
    )  # fmt: skip


def logs_logprobs(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    logs: Logs,
    prm_cfg: PRMConfig,
    update_cfg: UpdateConfig,
) -> LogsLogprobs:
    """π_0's log-probs of ``logs`` (one forward) and the collecting ``policy``'s (module docstring).

    ``policy is reference`` (round 0): the policy's values are π_0's own where the logs do not cover them.
    Both models run under ``no_grad`` in eval mode and get their training flag back.
    """
    data = _eval(reference_dataset, reference, tokenizer, logs, prm_cfg)
    ids, messages, untrusted = data.conversation_ids, logs.messages, retokenized(logs.conversations)
    if policy is reference:
        logged, covered = logged_logprobs(data.rendered, ids, messages, untrusted)
        own = torch.where(torch.isnan(logged), data.ref_logp.cpu(), logged)
        n_logged = int(covered.sum())
    else:
        at_t1 = dataclasses.replace(update_cfg, temperature=1.0)
        was = policy.training
        policy.eval()
        try:
            own, n_logged = behaviour_logprobs(policy, data.rendered, ids, messages, at_t1, untrusted)
        finally:
            policy.train(was)
    return LogsLogprobs(list(ids), data.offsets.cpu(), data.ref_logp.float().cpu(), own.float(), n_logged)


def _eval(fn: Any, model: nn.Module, *args: Any) -> Any:
    was = model.training
    model.eval()
    try:
        return fn(model, *args)
    finally:
        model.train(was)


__all__ = ["SUFFIX", "LogsLogprobs", "cache_key", "cache_path", "logs_logprobs", "reference_dataset"]
