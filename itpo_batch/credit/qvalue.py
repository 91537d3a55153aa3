"""Turn Q-values for Iterative PPO: Monte-Carlo regression of a value-headed LM on logged conversations.

Iterative PPO (Jiang et al. 2025, arXiv 2511.21638; docs/method.md §6, §7) fits the multi-turn
action value ``Q^π(s_t, a_t)`` of the logging policy by ordinary reward-model regression on Monte-Carlo
returns, then uses it as the reward of single-turn PPO. This module is that critic.

Design decisions (the paper specifies none of them; they follow docs/method.md §6 unless marked *deviation*):

- **Targets.** The reward is the outcome ``R``, received after the last assistant turn; intermediate
  rewards are 0. With ``T`` assistant turns indexed **0-based** ``t = 0 … T-1``, ``G_t = γ^(T-1-t) · R``:
  the paper's ``G_t = γ^(T-t) R`` with 1-based turns (the last turn gets ``R`` undiscounted). ``γ = 1``
  (default) makes ``Q(s_t, a_t) = E[R | s_t, a_t]``, right for ≤ 6-turn tasks. ``T`` counts the turns of
  the *logged* conversation, so turns kept by ``overflow="truncate"`` keep their original discount.
  :func:`mc_returns` is vectorised; a conversation without assistant turns contributes no row.
- **Where Q is read.** At the **last token of assistant turn t**: its end-of-turn token (``<|end|>``,
  ``<|im_end|>``), which the assistant mask includes (:mod:`itpo_batch.model.render`), so ``Q(s_t, a_t)`` sees
  the whole history and the whole response, like a reward model read at EOS. Positions come from the
  packed ``turn_id`` in one comparison with the next token (:func:`turn_end_positions`), checked against
  ``n_turns``.
- **Forward.** Packed, padding-free buffers (:func:`itpo_batch.model.packing.model_inputs`), one per optimiser
  step. The model is called as a whole (DDP-style wrappers stay in the loop); a hook captures the
  backbone's hidden states and the head runs in **float32 outside autocast** on the turn-end rows only
  (under CUDA autocast the model's own head would run in bf16).
- **Loss.** ``mse`` (default, "standard regression"): ``mean_turns (Q − G)²``, every training turn weighs
  the same. ``bce`` (returns in ``[0, 1]``): BCE-with-logits against the soft target, ``σ(head)`` is the
  prediction (docs/method.md §6.2). A fresh head's bias starts at the training-return mean (its logit for
  ``bce``), so step 0 predicts the trivial baseline (``init_bias``); a warm-started head keeps its own.
- **Optimiser.** The package's AdamW default (:mod:`itpo_batch.model.train`), linear warm-up then cosine
  decay to 10 % (as :mod:`itpo_batch.model.sft`), gradient clipping, full fine-tuning. A non-finite loss
  raises :class:`~itpo_batch.core.errors.NonFiniteError` instead of writing NaN Q-values.
- **Hold-out split by conversation** (never by turn: a conversation's turns share the outcome): ``c`` is
  held out iff ``blake2b(seed, c) / 2^64 < holdout``. It depends only on the id and the seed, so a
  conversation lands in the same split in every run, file order and subset; the held-out fraction is
  binomial around ``holdout``. *Deviation* (docs/method.md §6.3): 20 %, not 10 %, leaves small logs enough turns for a
  rank correlation.
- **Metrics** (``q/``): train and hold-out MSE against ``G``, hold-out Spearman(Q, G) (average ranks for
  ties), and both for the trivial baseline predicting the training-return mean. A constant ranks nothing,
  so the baseline's Spearman is 0 (scipy: NaN, which JSON lacks). Hold-out metrics are ``None`` below 2
  held-out turns.
- **Several processes** (:mod:`itpo_batch.model.dist`): each step's buffer is split over ranks with the
  whole buffer's turn count as denominator (:func:`~itpo_batch.model.train.shard_step`), the model
  prepared by accelerate; prediction forwards are sharded by buffer and gathered.
- **Warm start** from a previous Q directory (backbone, tokenizer, ``value_head.safetensors``,
  ``qvalue_config.json``) between rounds (docs/method.md §6.3); it must have been fitted with the same loss.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.core.errors import ItpoError, NonFiniteError
from itpo_batch.credit.stats import spearman
from itpo_batch.data.validate import Logs
from itpo_batch.model import dist
from itpo_batch.model.attention import packed_attention
from itpo_batch.model.loading import ValueModel
from itpo_batch.model.logprobs import unwrap
from itpo_batch.model.packing import PackedBatch, count_buffers, model_inputs, pack
from itpo_batch.model.render import RenderConfig, RenderedConversation, render
from itpo_batch.model.train import OptimConfig, prepare, release, shard_step, train_step

CONFIG_FILE = "qvalue_config.json"


@dataclass
class QConfig:
    """Monte-Carlo regression of the turn Q-function (Iterative PPO's critic)."""

    model: str | None = None
    "Backbone to start from (docs/method.md §6.2: the logging policy or the SFT model); None: the policy being scored (``score --model``) or π_0 (``iterate``)."
    warm_start: str | None = None
    "A previous Q directory (saved by this module) to continue from; overrides `model`."
    gamma: float = 1.0
    "Discount over assistant turns: G_t = gamma^(T-1-t) * outcome (0-based t)."
    loss: Literal["mse", "bce"] = "mse"
    "'mse' regression, or 'bce' for returns in [0, 1] with sigmoid(head) as the prediction."
    lr: float = 1e-3
    "Peak learning rate: 1e-3 fits the tiny model (random init) in seconds on CPU; 1e-6-5e-6 for real LMs."
    epochs: int = 4
    "Passes over the training split (docs/method.md §6.3: 1-2 for pretrained LMs on large logs)."
    batch_tokens: int = 1024
    "Tokens per packed buffer = per optimiser step (CPU builds a dense T x T mask; raise it on GPU)."
    weight_decay: float = 0.0
    "AdamW weight decay."
    grad_clip: float = 1.0
    "Max gradient norm."
    warmup_ratio: float = 0.1
    "Fraction of steps with linear warm-up (then cosine decay to 10 %)."
    holdout: float = 0.2
    "Fraction of conversations held out (by a stable hash of conversation_id and seed) for evaluation."
    init_bias: bool = True
    "Start a fresh head's bias at the training-return mean (the baseline); warm starts keep theirs."
    max_length: int | None = None
    "Context per conversation (default: the model's)."
    overflow: str = "truncate"
    "Conversations over the context: 'truncate' (leading whole turns) or 'drop'."

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ItpoError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.loss not in ("mse", "bce"):
            raise ItpoError(f"loss must be 'mse' or 'bce', not {self.loss!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ItpoError(f"holdout must lie in [0, 1), got {self.holdout}")


# ----------------------------------------------------------------------------------- targets and split


def mc_returns(
    outcome: torch.Tensor, n_turns: torch.Tensor, gamma: float, horizon: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Monte-Carlo returns of every assistant turn, flat: ``(conv [N], turn [N], G [N] float64)``.

    ``outcome [B]``, ``n_turns [B]`` (turns to emit per conversation), ``horizon [B]`` (assistant turns of the
    logged conversation, default ``n_turns``). Rows are conversation-major, turns ascending;
    ``G = γ^(horizon-1-turn) · outcome``. Conversations with ``n_turns == 0`` emit nothing.
    """
    n = n_turns.long()
    hor = n if horizon is None else horizon.long().to(n.device)
    if bool((hor < n).any()):
        raise ValueError("horizon must be at least n_turns for every conversation")
    conv = torch.repeat_interleave(torch.arange(n.shape[0], device=n.device), n)
    first = torch.cumsum(n, 0) - n
    turn = torch.arange(conv.shape[0], device=n.device) - first[conv]
    power = (hor[conv] - 1 - turn).to(torch.float64)
    g = outcome.to(device=n.device, dtype=torch.float64)[conv] * torch.pow(
        torch.tensor(gamma, dtype=torch.float64), power
    )
    return conv, turn, g


def holdout_mask(conversation_ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """bool ``[n]``: True for held-out conversations (``blake2b(seed, id) / 2^64`` below ``fraction``)."""
    keys = (hashlib.blake2b(f"{seed}\x00{c}".encode(), digest_size=8).digest() for c in conversation_ids)
    return np.array([int.from_bytes(k, "big") / 2.0**64 < fraction for k in keys], dtype=bool)


@dataclass
class QData:
    """Rendered conversations and one row per rendered assistant turn with its Monte-Carlo target."""

    rendered: list[RenderedConversation]
    conversation_ids: list[str]  # [n], per rendered conversation
    holdout: torch.Tensor  # bool [n]
    first: torch.Tensor  # int64 [n], row of each conversation's turn 0 in the flat turn arrays
    conv: torch.Tensor  # int64 [N], position in `rendered` of each turn row
    turn: torch.Tensor  # int64 [N], 0-based assistant-turn index
    target: torch.Tensor  # float64 [N], G_t
    n_dropped: int = 0  # conversations over the context that rendering dropped


def build_data(
    chats: Sequence[Sequence[dict[str, str]]],
    outcomes: Sequence[float],
    conversation_ids: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: QConfig,
    seed: int = 0,
) -> QData:
    """Render ``chats``; attach returns and the split (``RenderedConversation.index`` = row in ``chats``)."""
    result = render(
        chats, tokenizer, RenderConfig(max_length=cfg.max_length, overflow=cfg.overflow), conversation_ids
    )
    rendered = result.conversations
    if not rendered:
        raise ItpoError("no conversation fits the context; raise --max-length or use overflow='truncate'")
    rows = [r.index for r in rendered]
    horizon = torch.tensor([sum(m["role"] == "assistant" for m in chats[i]) for i in rows])
    n_turns = torch.tensor([r.n_turns for r in rendered])
    outcome = torch.as_tensor(np.asarray(outcomes, dtype=np.float64)[rows])
    conv, turn, target = mc_returns(outcome, n_turns, cfg.gamma, horizon)
    if cfg.loss == "bce" and bool(((target < 0) | (target > 1)).any()):
        raise ItpoError("loss='bce' needs returns in [0, 1]; rescale the outcomes or use loss='mse'")
    ids = [str(conversation_ids[i]) for i in rows]
    held = torch.from_numpy(holdout_mask(ids, cfg.holdout, seed))
    first = torch.cumsum(n_turns, 0) - n_turns
    return QData(rendered, ids, held, first, conv, turn, target, result.n_dropped_overlength)


def data_from_logs(logs: Logs, tokenizer: PreTrainedTokenizerBase, cfg: QConfig, seed: int = 0) -> QData:
    """:func:`build_data` on validated logs (conversation index = row of ``logs.conversations``)."""
    conv = logs.conversations
    return build_data(
        logs.chats(), conv["outcome"].to_list(), conv["conversation_id"].to_list(), tokenizer, cfg, seed
    )


# ------------------------------------------------------------------------------------ reading Q values


def turn_end_positions(batch: PackedBatch) -> torch.Tensor:
    """int64 ``[N]``: buffer positions of the last token of every assistant turn, in buffer order.

    A token ends its turn when it is an assistant token and the next token belongs to another turn, to
    another sequence (``position_ids == 0``), or does not exist.
    """
    tid = batch.turn_id.long()
    nxt = torch.cat([tid[1:], tid.new_full((1,), -1)])
    next_starts = torch.cat([batch.position_ids[1:] == 0, torch.ones(1, dtype=torch.bool)])
    return ((tid >= 0) & ((nxt != tid) | next_starts)).nonzero().squeeze(1)


def _hidden_states(model: torch.nn.Module, batch: PackedBatch, device: torch.device) -> torch.Tensor:
    """Backbone output ``[T, H]`` of a packed buffer, captured by a hook while calling ``model`` itself."""
    captured: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, _args: object, output: object) -> None:
        captured.append(output.last_hidden_state)  # type: ignore[attr-defined]

    handle = unwrap(model).backbone.register_forward_hook(grab)
    inputs = model_inputs(batch, device)
    inputs.pop("use_cache")  # ValueModel.forward passes use_cache=False itself
    try:
        with (
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"),
            packed_attention(model, batch.cu_seqlens, device),
        ):
            model(**inputs)
    finally:
        handle.remove()
    return captured[-1][0]


def read_turn_heads(
    model: torch.nn.Module, batch: PackedBatch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw head outputs at turn ends ``[N]`` (float32), with each row's buffer slot and turn ``[N]``."""
    pos = turn_end_positions(batch)
    if pos.shape[0] != int(batch.n_turns.sum()):
        raise RuntimeError(
            f"found {pos.shape[0]} turn ends but the buffer has {int(batch.n_turns.sum())} turns"
        )
    hidden = _hidden_states(model, batch, device).index_select(0, pos.to(device))
    head = unwrap(model).value_head
    raw = head(hidden.to(head.weight.dtype)).squeeze(-1)  # outside autocast: float32
    return raw, batch.seq_id()[pos], batch.turn_id[pos].long()


def q_from_head(raw: torch.Tensor, loss: str) -> torch.Tensor:
    """Q from raw head outputs: identity for ``mse``, ``σ`` for ``bce``."""
    return torch.sigmoid(raw) if loss == "bce" else raw


def _flat_rows(
    data: QData, batch: PackedBatch, order: torch.Tensor, slot: torch.Tensor, turn: torch.Tensor
) -> torch.Tensor:
    """Flat turn rows of (slot, turn) in a buffer packed from ``[data.rendered[i] for i in order]``."""
    return data.first[order[batch.seq_index][slot]] + turn


# ------------------------------------------------------------------------------------------- fitting


def q_loss(
    raw: torch.Tensor, target: torch.Tensor, loss: str, denominator: int | None = None
) -> torch.Tensor:
    """Turn-mean MSE of ``raw`` against ``target``, or BCE-with-logits for ``loss='bce'``; summed and divided
    by ``denominator`` turns when given (a rank's share of a step split over ranks)."""
    target = target.to(raw.dtype)
    if denominator is not None:
        fn = F.binary_cross_entropy_with_logits if loss == "bce" else F.mse_loss
        return fn(raw, target, reduction="sum") / max(denominator, 1)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(raw, target)
    return F.mse_loss(raw, target)


def init_head_bias(model: ValueModel, data: QData, cfg: QConfig) -> None:
    """Head bias := training-return mean (its logit for ``bce``), so step 0 predicts the baseline."""
    train = ~data.holdout[data.conv]
    if not bool(train.any()):
        return
    mean = float(data.target[train].mean())
    if cfg.loss == "bce":
        p = min(max(mean, 1e-4), 1 - 1e-4)
        mean = math.log(p / (1 - p))
    with torch.no_grad():
        model.value_head.bias.fill_(mean)


def fit(
    model: ValueModel,
    data: QData,
    cfg: QConfig,
    on_step: Callable[[int, int, float], None] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Regress ``model`` on the training split of ``data`` (in place); per-epoch metrics.

    ``on_step(step, total_steps, loss)`` is called after every optimiser step.
    """
    train = (~data.holdout).nonzero().squeeze(1)  # positions in data.rendered
    if train.numel() == 0:
        raise ItpoError("every conversation is in the hold-out split; lower holdout")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    orders = [train[torch.from_numpy(rng.permutation(train.numel()))] for _ in range(cfg.epochs)]
    lengths = [[len(data.rendered[i]) for i in o.tolist()] for o in orders]
    total = sum(count_buffers(n, cfg.batch_tokens) for n in lengths)
    optim = OptimConfig(
        lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        schedule="warmup_cosine", warmup_ratio=cfg.warmup_ratio,
    )  # fmt: skip
    trained, opt = prepare(model, optim)
    model.train()
    history, step = [], 0
    for epoch, order in enumerate(orders):
        t0, loss_sum, turns = time.perf_counter(), 0.0, 0
        for full in pack([data.rendered[i] for i in order.tolist()], cfg.batch_tokens):
            batch, members, weight = shard_step(full, order[full.seq_index], data.rendered)
            raw, slot, turn = read_turn_heads(trained, batch, device)
            target = data.target[data.first[members[slot]] + turn].to(device)
            n_turns = int(full.n_turns.sum())  # the whole step's turns (every rank knows them)
            loss = q_loss(raw, target, cfg.loss, n_turns)  # = the turn mean in one process
            NonFiniteError.check(f"Q loss (step {step + 1} of {total})", loss)
            value = train_step(opt, optim, [loss if weight == 1.0 else loss * weight], step, total).loss
            step += 1
            loss_sum, turns = loss_sum + value * n_turns, turns + n_turns
            if on_step is not None:
                on_step(step, total, value)
        history.append(
            {"epoch": epoch + 1, "q/loss": loss_sum / max(turns, 1), "q/seconds": time.perf_counter() - t0}
        )
    release(trained, opt)
    model.zero_grad(set_to_none=True)  # the gradients (4 bytes per parameter) are not needed after the fit
    return history


@torch.no_grad()
def predict(model: ValueModel, data: QData, cfg: QConfig) -> pl.DataFrame:
    """Q of every rendered turn (both splits), one row per turn, sorted by (conversation_index, turn).

    Columns: ``conversation_index`` (row in the chats/logs given to :func:`build_data`), ``conversation_id``,
    ``turn``, ``q_value``, ``mc_return``, ``holdout``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    q = torch.empty(data.target.shape[0], dtype=torch.float64)
    order = torch.arange(len(data.rendered))
    batches = pack(data.rendered, cfg.batch_tokens)  # sharded over ranks, gathered on every rank
    raws = dist.shard_map(lambda b: read_turn_heads(model, b, device)[0], batches)
    for batch, raw in zip(batches, raws, strict=True):
        pos = turn_end_positions(batch)
        slot, turn = batch.seq_id()[pos], batch.turn_id[pos].long()
        q[_flat_rows(data, batch, order, slot, turn)] = q_from_head(raw, cfg.loss).double().cpu()
    model.train(was_training)
    finite = torch.isfinite(q)
    if not bool(finite.all()):
        raise NonFiniteError("Q-value predictions", int((~finite).sum()), q.numel(), hint="nothing of them was "
                             "written; a broken warm start, or a learning rate too high for the model?")  # fmt: skip
    index = torch.tensor([r.index for r in data.rendered])
    return pl.DataFrame(
        {
            "conversation_index": index[data.conv].numpy(),
            "conversation_id": [data.conversation_ids[i] for i in data.conv.tolist()],
            "turn": data.turn.numpy().astype(np.int32),
            "q_value": q.numpy(),
            "mc_return": data.target.numpy(),
            "holdout": data.holdout[data.conv].numpy(),
        }
    )


# ------------------------------------------------------------------------------------------- metrics


def q_metrics(pred: pl.DataFrame) -> dict[str, float | int | None]:
    """Train/hold-out MSE and hold-out Spearman of Q against the returns, and of the mean-return baseline."""
    q = torch.from_numpy(pred["q_value"].to_numpy().copy())
    g = torch.from_numpy(pred["mc_return"].to_numpy().copy())
    held = torch.from_numpy(pred["holdout"].to_numpy().copy())
    trained, enough = bool((~held).any()), int(held.sum()) >= 2
    baseline = float(g[~held].mean()) if trained else None
    qh, gh = q[held], g[held]
    return {
        "q/train_turns": int((~held).sum()),
        "q/holdout_turns": int(held.sum()),
        "q/holdout_conversations": pred.filter(pl.col("holdout"))["conversation_index"].n_unique(),
        "q/train_mse": float(((q - g)[~held] ** 2).mean()) if trained else None,
        "q/baseline_value": baseline,
        "q/holdout_mse": float(((qh - gh) ** 2).mean()) if enough else None,
        "q/holdout_spearman": spearman(qh, gh) if enough else None,
        "q/baseline_holdout_mse": float(((baseline - gh) ** 2).mean()) if enough and trained else None,
        "q/baseline_holdout_spearman": 0.0 if enough else None,
    }
