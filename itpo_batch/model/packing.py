"""Pack rendered conversations into flat token buffers for padding-free forward passes.

Design decisions:

- **Greedy, order-preserving packing.** Sequences are appended to the current buffer until the next one
  would exceed ``max_tokens``; a sequence longer than ``max_tokens`` gets a buffer of its own (it is never
  split: attention across a split would be wrong). Keeping input order makes results trivially
  attributable and :func:`unpack` an exact inverse; the small loss in fill rate versus first-fit
  decreasing does not matter at conversation lengths far below ``max_tokens``.
- **Layout.** One buffer is ``[T]`` (batch dim added at forward time): ``position_ids`` restart at 0 per
  sequence, ``cu_seqlens`` (int32, ``[n+1]``) are the flash-attention style boundaries, ``seq_index``
  points into the list given to :func:`pack`, and ``conv_index``/``n_turns`` carry the rest of each
  :class:`~itpo_batch.model.render.RenderedConversation` so that ``unpack(pack(x)) == x`` exactly.
- **How transformers 5 sees a packed buffer** (measured on the tiny Llama, CPU, ``sdpa`` and ``eager``,
  transformers 5.23): with ``input_ids``/``position_ids`` of shape ``[1, T]``, **no attention mask and
  ``use_cache=False``**, the mask builder detects sequence starts from ``position_ids`` (a diff ≠ 1) and
  builds a block-diagonal causal mask; logits match per-sequence forwards to ~1e-6. With the default
  ``use_cache`` (``True`` from the config, even in train mode) a ``DynamicCache`` is created first, packed
  detection is skipped, and sequences silently attend to each other (logit errors ~1.5). Passing any 2D
  ``attention_mask`` disables the detection too. :func:`model_inputs` returns the safe kwargs. With
  ``sdpa``/``eager`` transformers would materialise the block-diagonal mask densely (``[1, 1, T, T]``
  bool, attention work T²), so packed forwards run inside
  :func:`itpo_batch.model.attention.packed_attention` (per-sequence causal kernels, no mask; it needs
  ``cu_seqlens``); flash-attention kernels on GPU use the same ``position_ids`` without a dense mask.
- **Padding baseline.** :func:`pad` builds right-padded ``[B, L]`` tensors (the naive path other stages
  compare against), vectorised with a boolean scatter rather than a per-row copy loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.nn import functional as F

from itpo_batch.model.render import RenderedConversation


@dataclass
class PackedBatch:
    """One flat buffer of ``n`` sequences and ``T`` tokens."""

    input_ids: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T], restarting at 0 per sequence
    cu_seqlens: torch.Tensor  # int32 [n+1], sequence boundaries
    assistant_mask: torch.Tensor  # bool [T]
    turn_id: torch.Tensor  # int32 [T], -1 off assistant tokens
    seq_index: torch.Tensor  # int64 [n], position of each sequence in the list given to pack()
    conv_index: torch.Tensor  # int64 [n], RenderedConversation.index (position in the original logs)
    n_turns: torch.Tensor  # int64 [n], assistant turns per sequence
    max_seqlen: int  # longest sequence in the buffer

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_seqs(self) -> int:
        return int(self.seq_index.shape[0])

    def seq_id(self) -> torch.Tensor:
        """Per-token sequence slot ``[T]`` (0..n-1), for segment reductions over sequences."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.n_seqs, device=lengths.device), lengths)

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return PackedBatch(**moved)


def _greedy_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive index groups whose total length stays within ``max_tokens`` (oversize ones alone)."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def count_buffers(lengths: Sequence[int], max_tokens: int) -> int:
    """How many buffers :func:`pack` makes for sequences of these lengths, in this order."""
    return len(_greedy_groups(lengths, max_tokens))


def _build(rendered: Sequence[RenderedConversation], group: list[int]) -> PackedBatch:
    seqs = [rendered[i] for i in group]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lengths)
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in seqs]).astype(np.int64)),
        position_ids=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        assistant_mask=torch.from_numpy(np.concatenate([s.assistant_mask for s in seqs]).astype(bool)),
        turn_id=torch.from_numpy(np.concatenate([s.turn_id for s in seqs]).astype(np.int32)),
        seq_index=torch.tensor(group, dtype=torch.int64),
        conv_index=torch.tensor([s.index for s in seqs], dtype=torch.int64),
        n_turns=torch.tensor([s.n_turns for s in seqs], dtype=torch.int64),
        max_seqlen=int(lengths.max()),
    )


def pack(rendered: Sequence[RenderedConversation], max_tokens: int) -> list[PackedBatch]:
    """Greedily pack ``rendered`` (in order) into buffers of at most ``max_tokens`` tokens each."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if any(len(r) == 0 for r in rendered):
        raise ValueError("cannot pack an empty sequence")
    return [_build(rendered, g) for g in _greedy_groups([len(r) for r in rendered], max_tokens)]


def unpack(batch: PackedBatch) -> list[RenderedConversation]:
    """Split a buffer back into the conversations it was built from (exact inverse of packing)."""
    bounds = batch.cu_seqlens.cpu().numpy().astype(np.int64)
    ids = batch.input_ids.cpu().numpy()
    mask = batch.assistant_mask.cpu().numpy()
    turn = batch.turn_id.cpu().numpy()
    conv = batch.conv_index.tolist()
    n_turns = batch.n_turns.tolist()
    return [
        RenderedConversation(conv[k], ids[a:b].copy(), mask[a:b].copy(), turn[a:b].copy(), n_turns[k])
        for k, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def model_inputs(
    batch: PackedBatch, device: torch.device | str | None = None
) -> dict[str, torch.Tensor | bool]:
    """Keyword arguments for a padding-free HF forward: ``[1, T]`` ids and positions, no mask, no cache."""
    ids, pos = batch.input_ids[None], batch.position_ids[None]
    if device is not None:
        ids, pos = ids.to(device), pos.to(device)
    return {"input_ids": ids, "position_ids": pos, "use_cache": False}


def pad(
    rendered: Sequence[RenderedConversation], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to ``[B, L]``: (input_ids int64, attention_mask int64, assistant_mask bool, turn_id int32).

    Padding positions get ``pad_id``, attention 0, assistant mask False and turn id -1.
    """
    if not rendered:
        raise ValueError("cannot pad an empty list of sequences")
    lengths = np.array([len(r) for r in rendered], dtype=np.int64)
    valid = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
    ids = np.full(valid.shape, pad_id, dtype=np.int64)
    mask = np.zeros(valid.shape, dtype=bool)
    turn = np.full(valid.shape, -1, dtype=np.int32)
    ids[valid] = np.concatenate([r.input_ids for r in rendered])
    mask[valid] = np.concatenate([r.assistant_mask for r in rendered])
    turn[valid] = np.concatenate([r.turn_id for r in rendered])
    return (
        torch.from_numpy(ids),
        torch.from_numpy(valid.astype(np.int64)),
        torch.from_numpy(mask),
        torch.from_numpy(turn),
    )


def gather_segments(offsets: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Flat indices of segments ``which`` (in that order) of a tensor cut by ``offsets [N+1]``."""
    starts, lengths = offsets[which], offsets[which + 1] - offsets[which]
    total = int(lengths.sum())
    shift = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths, output_size=total)
    return shift + torch.arange(total, device=offsets.device)


def flat_offsets(rendered: Sequence[RenderedConversation]) -> torch.Tensor:
    """int64 ``[N+1]``: where each conversation's assistant tokens start in the flat ``[A]`` layout."""
    lengths = torch.tensor([int(r.assistant_mask.sum()) for r in rendered], dtype=torch.int64)
    return F.pad(lengths.cumsum(0), (1, 0))
