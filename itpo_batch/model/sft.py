"""Supervised warm start on the assistant turns of logs (how the quickstart's π_0 is made).

Design decisions:

* **Loss on assistant tokens only.** Next-token cross-entropy where the *predicted* token is an
  assistant token (the assistant mask from :mod:`itpo_batch.model.render`, which includes each turn's end
  token, so the model learns to stop). User, system and template tokens are context only.
* **Token-mean** over all assistant tokens of a step (the usual SFT aggregation; long turns weigh more).
* **Padding-free.** Conversations are shuffled (seeded) each epoch and packed into buffers of
  ``batch_tokens`` tokens; one buffer is one optimiser step, scored by
  :func:`~itpo_batch.model.logprobs.token_logprobs` (varlen attention without the dense ``[T, T]`` mask,
  lm_head on the assistant rows only). Conversations longer than the context are truncated to whole turns
  by default (``overflow``).
* **Filtered imitation** is one flag away: ``min_outcome`` keeps only conversations whose outcome is at
  least that value (filtered behaviour cloning); the default imitates every conversation.
* The package's AdamW default (:mod:`itpo_batch.model.train`) with linear warm-up then cosine decay to 10 %
  of the peak, gradient clipping. bf16 autocast on CUDA.
  The output is an HF ``save_pretrained`` directory (model + tokenizer with its chat template), written
  atomically, with ``sft_config.json`` and ``metrics.jsonl`` beside the weights. It is claimed before the
  model is loaded (:func:`itpo_batch.data.io.claim_output`): a non-empty folder is refused unless it is
  an itpo-batch output and ``overwrite`` is set.
* **Several processes** (``accelerate launch``, :mod:`itpo_batch.model.dist`): every rank plans the same
  shuffled buffers; each step's buffer is split over ranks (:func:`~itpo_batch.model.train.shard_step`),
  each rank's loss is its tokens' sum over the *whole* buffer's token count, DDP (or FSDP) sums the
  gradients, so N processes take exactly one process's steps (``batch_tokens`` is the global step).
  Only rank 0 saves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.io import Claim, claim_output
from itpo_batch.data.validate import Logs
from itpo_batch.model import dist
from itpo_batch.model.loading import DEFAULT_MODEL, default_device, load_model, load_tokenizer
from itpo_batch.model.logprobs import token_logprobs
from itpo_batch.model.packing import PackedBatch, count_buffers, pack
from itpo_batch.model.render import RenderConfig, render
from itpo_batch.model.train import OptimConfig, prepare, release, shard_step, train_step


@dataclass
class SFTConfig:
    """Supervised fine-tuning on assistant turns."""

    model: str = DEFAULT_MODEL
    "Starting checkpoint: 'tiny' or a local HF directory."
    epochs: int = 8
    "Passes over the logs."
    lr: float = 2e-3
    "Peak learning rate (the tiny model starts from random weights, hence high; use ~1e-5 for real LMs)."
    batch_tokens: int = 4096
    "Tokens per packed buffer = per optimiser step."
    weight_decay: float = 0.0
    "AdamW weight decay."
    grad_clip: float = 1.0
    "Max gradient norm."
    warmup_ratio: float = 0.05
    "Fraction of steps with linear warm-up."
    max_length: int | None = None
    "Context per conversation (default: the model's)."
    overflow: str = "truncate"
    "Conversations over the context: 'truncate' (whole turns) or 'drop'."
    min_outcome: float | None = None
    "Keep only conversations with outcome >= this (filtered imitation); None keeps all."
    seed: int = 0
    "Shuffling and initialisation seed."


def select_conversations(logs: Logs, min_outcome: float | None) -> tuple[list[list[dict]], list[str]]:
    """Chats (and ids) to imitate, after the optional outcome filter."""
    conv = logs.conversations
    keep = conv if min_outcome is None else conv.filter(pl.col("outcome") >= min_outcome)
    if keep.height == 0:
        raise ItpoError(f"no conversation has outcome >= {min_outcome}; nothing to imitate")
    chats = logs.chats()
    index = {cid: i for i, cid in enumerate(conv["conversation_id"].to_list())}
    ids = keep["conversation_id"].to_list()
    return [chats[index[c]] for c in ids], ids


def sft_targets(batch: PackedBatch) -> torch.Tensor:
    """Positions whose token is trained: assistant tokens that have a prediction (not a sequence's first)."""
    return batch.assistant_mask & (batch.position_ids > 0)


def sft_loss(
    model: torch.nn.Module, batch: PackedBatch, device: torch.device, denominator: int | None = None
) -> tuple[torch.Tensor, int]:
    """Token-mean cross-entropy of the assistant tokens of one packed buffer, and their count.

    ``denominator`` (default: this buffer's count) divides the summed loss instead: a rank's share of a
    step split over ranks divides by the whole step's count. Through
    :func:`~itpo_batch.model.logprobs.token_logprobs` (varlen attention, lm_head on the assistant rows
    only, in chunks), not the model's full ``[T, vocab]`` logits: the same loss, up to float rounding.
    """
    logp = token_logprobs(model, batch, targets="assistant")  # [T], 0 off the targets
    target = sft_targets(batch).to(logp.device)
    n = int(target.sum())
    if n == 0 or denominator == 0:
        return logp.sum() * 0.0, 0
    return -logp[target].sum() / (n if denominator is None else denominator), n


def train_sft(
    logs: Logs,
    cfg: SFTConfig,
    out_dir: Path,
    on_step: Callable[[int, int, float], None] | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Fine-tune ``cfg.model`` on the assistant turns of ``logs``; save to ``out_dir``; return metrics.

    ``on_step(step, total_steps, loss)`` is called after every optimiser step (progress display).
    ``overwrite``: replace an earlier itpo-batch output at ``out_dir`` (never a folder it did not write).
    """
    claim = claim_output(out_dir, "dir", "sft", overwrite=overwrite)
    dist.init()  # under a launcher: this rank's device before the model is loaded
    torch.manual_seed(cfg.seed)
    device = default_device()
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, role="policy", device=device, dtype=torch.float32)
    chats, ids = select_conversations(logs, cfg.min_outcome)
    result = render(
        chats, tokenizer, RenderConfig(max_length=cfg.max_length, overflow=cfg.overflow), names=ids
    )
    if not result.conversations:
        raise ItpoError("every conversation is longer than the context; raise --max-length or use truncate")
    rng = np.random.default_rng(cfg.seed)
    convs = result.conversations
    orders = [rng.permutation(len(convs)) for _ in range(cfg.epochs)]
    total = sum(count_buffers([len(convs[i]) for i in order], cfg.batch_tokens) for order in orders)
    optim = OptimConfig(
        lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        schedule="warmup_cosine", warmup_ratio=cfg.warmup_ratio,
    )  # fmt: skip
    trained, opt = prepare(model, optim)
    metrics, step = [], 0
    for epoch, order in enumerate(orders):
        t0, loss_sum, tok_sum = time.perf_counter(), 0.0, 0
        order_t = torch.from_numpy(order)
        for full in pack([convs[i] for i in order], cfg.batch_tokens):
            n = int(sft_targets(full).sum())  # the whole step's tokens (every rank knows them)
            batch, _, weight = shard_step(full, order_t[full.seq_index], convs)
            loss, _ = sft_loss(trained, batch, device, n)
            value = train_step(opt, optim, [loss if weight == 1.0 else loss * weight], step, total).loss
            step += 1
            loss_sum, tok_sum = loss_sum + value * n, tok_sum + n
            if on_step is not None:
                on_step(step, total, value)
        seconds = time.perf_counter() - t0
        metrics.append(
            {
                "epoch": epoch + 1,
                "sft/loss": loss_sum / max(tok_sum, 1),
                "sft/assistant_tokens": tok_sum,
                "sft/tokens_per_s": sum(len(r) for r in result.conversations) / seconds,
                "sft/conversations": len(result.conversations),
                "sft/dropped_overlength": result.n_dropped_overlength,
                "sft/truncated": result.n_truncated,
            }
        )
    state = dist.full_state_dict(trained)  # FSDP/DeepSpeed: gathered from the shards (every rank)
    release(trained, opt)
    if dist.is_main_process():
        _save(model, tokenizer, cfg, metrics, claim, state)
    dist.wait()
    return metrics


def _save(model, tokenizer, cfg: SFTConfig, metrics: list[dict], claim: Claim, state: dict | None) -> None:
    with claim.atomic() as tmp:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        (tmp / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
