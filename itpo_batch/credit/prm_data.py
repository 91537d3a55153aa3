"""The implicit PRM's dataset: rendered, packed conversations, labels and reference log-probs computed once.

:func:`prepare_dataset` renders the conversations (:mod:`itpo_batch.model.render`), packs them into buffers of
``batch_tokens`` (:mod:`itpo_batch.model.packing`) and runs the frozen reference **once**, under ``no_grad``,
keeping only the assistant-token log-probs as one flat tensor in conversation order with per-conversation
offsets (docs/method.md §1.6: the official step recomputes the same frozen log-probs three times).
Fitting gathers any mini-batch's slice from it (:func:`~itpo_batch.model.packing.gather_segments`, no Python loop over tokens), and
scoring reuses the same buffers, so with π_φ = π_ref every log-ratio is exactly 0.

Under a launcher every rank holds the whole dataset and the reference forward is sharded by buffer and
all-gathered (:func:`itpo_batch.model.dist.shard_map`): the same ``ref_logp`` on every rank, bitwise equal
to one process's, so batch statistics computed from the dataset (n̄) are global by construction.

Labels (docs/method.md §1.3): ``y = clip((o − lo)/(hi − lo), 0, 1)``; soft labels are kept as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from itpo_batch.core.errors import ItpoError
from itpo_batch.credit.turns import turn_credit, turn_sum
from itpo_batch.model import dist
from itpo_batch.model.logprobs import assistant_token_logprobs
from itpo_batch.model.packing import PackedBatch, flat_offsets, pack
from itpo_batch.model.render import RenderConfig, RenderedConversation, render


def outcome_labels(outcomes: Sequence[float] | np.ndarray, label_range: tuple[float, float]) -> np.ndarray:
    """BCE labels ``clip((o − lo)/(hi − lo), 0, 1)`` (float64 ``[N]``); outcomes must be finite."""
    o = np.asarray(outcomes, dtype=np.float64)
    if not np.isfinite(o).all():
        raise ItpoError("outcomes must be finite to become PRM labels")
    lo, hi = label_range
    if not lo < hi:
        raise ValueError(f"label_range needs lo < hi, got {label_range}")
    return np.clip((o - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class PRMDataset:
    """Rendered, packed conversations with labels and cached reference log-probs (:func:`prepare_dataset`).

    ``N`` conversations (those that survived rendering, in input order) and ``A`` assistant tokens.
    Conversation ``j``'s assistant tokens are ``ref_logp[offsets[j]:offsets[j+1]]``; every flat ``[A]``
    tensor of the PRM (log-ratios, token rewards) uses this layout.
    """

    rendered: list[RenderedConversation]
    batches: list[PackedBatch]  # scoring buffers: the packing the reference forward used
    ref_logp: torch.Tensor  # float32 [A], no grad
    offsets: torch.Tensor  # int64 [N+1]
    outcomes: torch.Tensor  # float64 [N], as logged
    labels: torch.Tensor  # float32 [N], BCE targets in [0, 1]
    conversation_ids: list[str]  # [N]
    groups: np.ndarray | None  # [N] group labels (None: all in one group)
    dropped: list[int]  # input positions dropped as over-long
    cache: tuple[tuple[int, int], torch.Tensor] | None = field(default=None, repr=False)
    "Last π_φ log-ratios ``[A]`` with the (PRM instance, optimiser step) that produced them."

    def __len__(self) -> int:
        return len(self.rendered)

    @property
    def index(self) -> np.ndarray:
        """Input position (e.g. row of ``Logs.conversations``) of each conversation, int64 ``[N]``."""
        return np.array([r.index for r in self.rendered], dtype=np.int64)

    def frame(self) -> pl.DataFrame:
        """One row per conversation: conv_index, conversation_id, n_turns, n_tokens, outcome, label."""
        return pl.DataFrame(
            {
                "conv_index": self.index,
                "conversation_id": self.conversation_ids,
                "n_turns": np.array([r.n_turns for r in self.rendered], dtype=np.int32),
                "n_tokens": self.offsets.diff().cpu().numpy().astype(np.int32),
                "outcome": self.outcomes.numpy(),
                "label": self.labels.double().numpy(),
            }
        )

    def token_conversation(self) -> torch.Tensor:
        """Dataset position ``[A]`` of every assistant token (for per-conversation sums)."""
        return torch.repeat_interleave(
            torch.arange(len(self), device=self.offsets.device), self.offsets.diff()
        )

    def span(self, batch: PackedBatch) -> slice:
        """Slice of the flat ``[A]`` arrays covered by a scoring buffer (it holds consecutive conversations)."""
        first, last = int(batch.seq_index[0]), int(batch.seq_index[-1])
        return slice(int(self.offsets[first]), int(self.offsets[last + 1]))

    def mean_turn_length(self) -> float:
        """n̄ over all turns: assistant tokens / assistant turns (every rank holds every conversation)."""
        turns = float(sum(r.n_turns for r in self.rendered))
        tot = torch.tensor([float(self.offsets[-1]), turns], dtype=torch.float64)
        return float(tot[0] / tot[1].clamp_min(1))


def prepare_dataset(
    reference: nn.Module,
    tokenizer: Any,
    chats: Sequence[Sequence[dict[str, str]]],
    outcomes: Sequence[float] | np.ndarray,
    render_config: RenderConfig,
    batch_tokens: int,
    label_range: tuple[float, float] = (0.0, 1.0),
    groups: Sequence[Any] | np.ndarray | None = None,
    conversation_ids: Sequence[str] | None = None,
    labels: Sequence[float] | np.ndarray | None = None,
    chunk_size: int = 1024,
    ref_logp: torch.Tensor | None = None,
) -> PRMDataset:
    """Render, pack and run ``reference`` once (no_grad). ``labels`` default to :func:`outcome_labels`.

    ``ref_logp``: the reference's log-probs ``[A]`` of these conversations rendered and packed the same way,
    computed before (``iterate`` keeps π_0's beside each logs file); then ``reference`` is not run.
    """
    names = list(conversation_ids) if conversation_ids is not None else None
    if len(outcomes) != len(chats) or (names is not None and len(names) != len(chats)):
        raise ValueError("chats, outcomes and conversation_ids must have the same length")
    result = render(chats, tokenizer, render_config, names=names)
    if not result.conversations:
        raise ItpoError("no conversation fits the context; raise max_length or use overflow='truncate'")
    keep = np.array([r.index for r in result.conversations], dtype=np.int64)
    y = outcome_labels(outcomes, label_range) if labels is None else np.asarray(labels, dtype=np.float64)
    if y.shape != (len(chats),) or not (np.isfinite(y).all() and (y >= 0).all() and (y <= 1).all()):
        raise ItpoError("PRM labels must be one finite value in [0, 1] per conversation")
    batches = pack(result.conversations, batch_tokens)
    n_tokens = sum(int(r.assistant_mask.sum()) for r in result.conversations)
    if ref_logp is not None and tuple(ref_logp.shape) != (n_tokens,):
        raise ValueError(f"ref_logp must be [A] = ({n_tokens},), got {tuple(ref_logp.shape)}")
    if ref_logp is not None:
        ref = ref_logp.float().to(next(reference.parameters()).device)
    else:
        with torch.no_grad():
            parts = dist.shard_map(
                lambda b: assistant_token_logprobs(reference, b, chunk_size).float(), batches
            )
            ref = torch.cat(parts).to(next(reference.parameters()).device)
    return PRMDataset(
        rendered=result.conversations,
        batches=batches,
        ref_logp=ref,
        offsets=flat_offsets(result.conversations).to(ref.device),
        outcomes=torch.as_tensor(np.asarray(outcomes, dtype=np.float64)[keep]),
        labels=torch.as_tensor(y[keep], dtype=torch.float32),
        conversation_ids=[names[i] for i in keep] if names else [str(i) for i in keep],
        groups=None if groups is None else np.asarray(groups, dtype=object)[keep],
        dropped=result.dropped,
    )


@dataclass
class PRMScores:
    """What :meth:`ImplicitPRM.score` returns."""

    turns: pl.DataFrame
    "One row per assistant turn, keyed by (conv_index, turn); the scored-turns columns of the PRM."
    conversations: pl.DataFrame
    "One row per conversation, keyed by conv_index: totals, label, implicit_reward_total = β·Σq, prm_prob."
    token_rewards: torch.Tensor
    "float32 [A]: normalised β·q per assistant token, PRMDataset layout (the PRIME token-level rewards)."
    normalizer: float
    "The divisor applied to β·q (1.0 with normalize='none')."
    metrics: dict[str, float]
    "Diagnostics on this dataset: prm/loss, prm/pair_acc, prm/sign_acc, ..."


def turn_frame(
    data: PRMDataset,
    batch: PackedBatch,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    z: float,
    n_bar: float,
    tau: float,
) -> pl.DataFrame:
    """Turn credit of one scoring buffer's ``[n, L]`` token rewards ``β·q`` (divided by ``z``), one frame row
    per valid turn: the PRM's scored-turns columns (:meth:`itpo_batch.credit.prm.ImplicitPRM.score`)."""
    pos = batch.seq_index.to(rewards.device)
    tc = turn_credit(rewards / z, mask, data.outcomes.to(rewards.device)[pos], tau, n_bar)
    raw = turn_sum(rewards, tc.seg)
    rows, cols = tc.seg.valid.nonzero(as_tuple=True)

    def pick(grid: torch.Tensor) -> np.ndarray:
        return grid[rows, cols].cpu().numpy().astype(np.float64)

    n_tok = tc.n_tokens[rows, cols].cpu().numpy().astype(np.int32)
    conv = pos[rows].cpu().numpy()
    return pl.DataFrame(
        {
            "conv_index": data.index[conv],
            "conversation_id": np.asarray(data.conversation_ids, dtype=object)[conv].astype(str),
            "turn": cols.cpu().numpy().astype(np.int32),
            "n_tokens": n_tok,
            "implicit_reward": pick(raw),
            "implicit_reward_mean": pick(raw) / np.maximum(n_tok, 1),
            "implicit_reward_normalized": pick(tc.implicit_reward),
            "itpo_norm_weight": pick(tc.itpo_norm_weight),
            "itpo_norm_reward": pick(tc.itpo_norm_reward),
            "length_share": pick(tc.length_share),
        }
    )
