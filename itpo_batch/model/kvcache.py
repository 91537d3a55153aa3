"""Preallocated KV cache of the rollout engine: one row per conversation, written in place, read by HF models.

:class:`SlotCache` is a transformers :class:`~transformers.cache_utils.Cache` whose layers own one
preallocated ``[rows, kv_heads, capacity, head_dim]`` key and value tensor each. A forward runs on a
contiguous range of rows ``[lo, hi)`` (:meth:`SlotCache.plan`): every new key/value is written in place at
its token's position (``index_put``, no ``torch.cat``), and attention reads the row range up to the
longest row's length, with a boolean (sdpa) or additive (eager) 4D mask built by :func:`attention_mask`
that hides each row's positions beyond its own length. Positions are absolute per row (row ``r``'s token
``j`` always sits at column ``j``), so rows of different lengths need no left padding and RoPE sees the
same position ids as an unpadded forward.

Design decisions:

- **Lazy shapes, eager capacity.** Heads, head size, dtype and device come from the first key written
  (so GQA, bf16 and any head layout work); the row count and column capacity are set by the engine
  (:meth:`SlotCache.reserve`) and grow by reallocation (copying only the cached columns), never per step.
- **A trash column.** The last column is never attended; the junk tokens that pad a prefill of rows
  with different numbers of new tokens write there, so one forward can prefill rows of unequal lengths.
- **Row moves** (:meth:`SlotCache.move_rows`) copy whole rows up to a given length with one indexed copy
  per tensor; the engine uses them to keep the decoding rows contiguous (finished rows leave the range,
  waiting ones enter it) without ever gathering the cache per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class Plan:
    """Where one forward writes and what it reads."""

    lo: int = 0
    "First cache row of the forward's batch."
    hi: int = 0
    "One past the last row."
    write_pos: torch.Tensor | None = None
    "``[hi - lo, q]`` column of each input token (the trash column for padding tokens)."
    kv_len: int = 0
    "Columns attended: the longest row's length after this forward's writes."
    _index: torch.Tensor | None = None

    def flat_index(self, heads: int, cols: int) -> torch.Tensor:
        """Row index into a ``[rows * heads * cols, head_dim]`` view of every written (row, head, token)."""
        if self._index is None:
            assert self.write_pos is not None
            b, q = self.write_pos.shape
            device = self.write_pos.device
            row = torch.arange(self.lo, self.hi, device=device)[:, None, None]
            head = torch.arange(heads, device=device)[None, :, None]
            self._index = ((row * heads + head) * cols + self.write_pos[:, None, :]).reshape(b * heads * q)
        return self._index


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, ``[rows, kv_heads, capacity + 1, head_dim]`` (the +1: trash column)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, cols = self.owner.rows, self.owner.capacity + 1
        k_shape = (rows, key_states.shape[1], cols, key_states.shape[-1])
        v_shape = (rows, value_states.shape[1], cols, value_states.shape[-1])
        self.keys = torch.zeros(k_shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(v_shape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.current
        rows, heads, cols, _ = self.keys.shape
        index = plan.flat_index(heads, cols)
        for cache, new in ((self.keys, key_states), (self.values, value_states)):
            flat = cache.view(rows * heads * cols, cache.shape[-1])
            flat.index_copy_(0, index, new.reshape(-1, cache.shape[-1]).to(cache.dtype))
        keys, values = self.keys[plan.lo : plan.hi], self.values[plan.lo : plan.hi]
        return keys[:, :, : plan.kv_len], values[:, :, : plan.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.current.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.current.kv_len

    def get_max_length(self) -> int:
        return self.owner.capacity

    def resize(self, rows: int, capacity: int, keep_cols: int) -> None:
        """Reallocate to ``rows`` x ``capacity`` columns, keeping the first ``keep_cols`` columns of old rows."""
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((rows, old.shape[1], capacity + 1, old.shape[3]))
            n = min(rows, old.shape[0])
            new[:n, :, :keep_cols] = old[:n, :, :keep_cols]
            setattr(self, name, new)


class SlotCache(Cache):
    """A :class:`Cache` over preallocated rows; the engine sets :attr:`current` before every forward."""

    def __init__(self, num_layers: int):
        self.rows, self.capacity = 0, 0
        self.current = Plan()
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def trash(self) -> int:
        """The column padding tokens write to (never attended)."""
        return self.capacity

    def reserve(self, rows: int, capacity: int, keep_cols: int) -> None:
        """Make room for ``rows`` rows of ``capacity`` columns (grows only; copies ``keep_cols`` columns)."""
        rows, capacity = max(rows, self.rows), max(capacity, self.capacity)
        if (rows, capacity) == (self.rows, self.capacity):
            return
        for layer in self.layers:
            layer.resize(rows, capacity, keep_cols)  # type: ignore[attr-defined]
        self.rows, self.capacity = rows, capacity

    def plan(self, lo: int, hi: int, write_pos: torch.Tensor, kv_len: int) -> None:
        """Set where the next forward writes (``write_pos``: ``[hi - lo, q]``) and how far it reads."""
        self.current = Plan(lo, hi, write_pos, kv_len)

    def move_rows(self, dst: list[int], src: list[int], length: int) -> None:
        """Row ``dst[i]`` gets the first ``length`` columns of row ``src[i]`` (as they were before the move)."""
        if not dst or length <= 0:
            return
        for layer in self.layers:
            if not layer.is_initialized:
                return
            d = torch.tensor(dst, device=layer.keys.device)
            s = torch.tensor(src, device=layer.keys.device)
            layer.keys[d, :, :length] = layer.keys[s, :, :length]
            layer.values[d, :, :length] = layer.values[s, :, :length]


def attention_mask(query_pos: torch.Tensor, kv_len: int, additive_dtype: torch.dtype | None) -> torch.Tensor:
    """4D mask ``[B, 1, q, kv_len]``: the query at column ``p`` of a row sees that row's columns ``<= p``.

    A row's queries are its newest tokens, so columns past its length (stale data of other rows, or
    nothing) lie past every query and stay hidden. Padding queries (``query_pos == -1``) see column 0 only,
    so their softmax stays finite. ``additive_dtype`` gives the float mask (0 / finfo.min) that eager
    attention adds; ``None`` gives the boolean mask sdpa takes.
    """
    cols = torch.arange(kv_len, device=query_pos.device)
    allowed = (cols[None, None, :] <= query_pos.clamp_min(0)[:, :, None])[:, None]
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=query_pos.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)
