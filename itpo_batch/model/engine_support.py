"""What the rollout engine needs from a model: which models it drives, its forwards, its live-row state.

Design decisions:

- **Which models** (:func:`static_reason`, :func:`probe`). Static checks first: a transformers causal LM (has a
  ``config``, not encoder-decoder) whose ``forward`` takes a cache (``cache`` or ``past_key_values``) and
  ``position_ids``, with ``sdpa`` or ``eager`` attention (the two that take a ready 4D mask; flash and
  flex attention do not) and only full-attention layers (sliding windows, chunked, linear or hybrid
  layers keep other cache shapes). Then a numerical probe: two rows of different lengths prefilled
  together, one decode step and one multi-token append, through :class:`Forward`, must give the logits
  of plain uncached forwards (max abs difference <= 1e-3 x (1 + max |logit|) in float32/64, 3e-2 in
  half precision). Anything that raises or differs is reported as a reason; the engine then tries the
  next forward, or falls back to ``model.generate``.
- **Forwards** (:class:`Forward`) call the model itself, so every architecture detail (norms, RoPE
  variants, biases, GQA, tied heads) stays transformers'. Only the last position's logits are computed
  (``logits_to_keep=1`` when the model takes it).
- **Live rows** (:class:`LiveRows`) keep the decoding state on the device (pending token, its column,
  tokens generated, cap, request) with host mirrors of what the scheduler reads (request and column), so a
  step syncs once: to learn whether a row finished.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from itpo_batch.model.generation import eval_mode
from itpo_batch.model.kvcache import SlotCache, attention_mask


class Forward:
    """The model's forward over a row range of a :class:`SlotCache`, returning last-position logits."""

    def __init__(self, model: torch.nn.Module, cache: SlotCache):
        params = inspect.signature(model.forward).parameters
        self.model, self.cache = model, cache
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" in params
        sdpa = model.config._attn_implementation == "sdpa"
        self.additive = None if sdpa else next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    def __call__(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        lo: int,
        write_pos: torch.Tensor,
        kv_len: int,
        blocks: list[tuple[int, int, int]] | None = None,
    ) -> torch.Tensor:
        """``ids``/``pos``: ``[b, q]`` (position -1: padding); rows ``[lo, lo + b)``; logits ``[b, V]``.

        ``blocks`` (``(start, end, kv_len)`` row blocks, :func:`attention_blocks`) may let attention read
        fewer columns; this forward reads ``kv_len`` columns of every row."""
        self.cache.plan(lo, lo + ids.shape[0], write_pos, kv_len)
        kwargs: dict[str, Any] = {self.cache_kw: self.cache, "use_cache": True}
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        mask = attention_mask(pos, kv_len, self.additive)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos.clamp_min(0), **kwargs)
        return out.logits[:, -1]

    def prefill(self, suffixes: Sequence[Sequence[int]], starts: Sequence[int], lo: int) -> torch.Tensor:
        """Write each row's ``suffix`` from column ``start`` (rows ``[lo, lo + len)``); last logits ``[b, V]``."""
        width = max(len(s) for s in suffixes)
        ids = torch.zeros(len(suffixes), width, dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            ids[row, width - len(suffix) :] = torch.as_tensor(suffix, dtype=torch.long)
        n = torch.tensor([len(s) for s in suffixes])
        start = torch.tensor(list(starts))
        col = torch.arange(width)[None, :]
        pad = (width - n)[:, None]
        pos = torch.where(col >= pad, start[:, None] + col - pad, -1).to(self.device)
        write = torch.where(pos >= 0, pos, self.cache.trash)
        return self(ids.to(self.device), pos, lo, write, int((start + n).max()))

    def decode(self, live: LiveRows) -> torch.Tensor:
        """One step of rows ``[0, live.size)``: write each pending token at its column; logits ``[size, V]``."""
        size = live.size
        pos = live.pos[:size, None]
        lengths = [p + 1 for p in live.pos_h]
        return self(live.tok[:size, None], pos, 0, pos, max(lengths), attention_blocks(lengths))


BLOCK_ROWS = 8
"Rows per attention block of a decode step (:func:`attention_blocks`)."


def attention_blocks(lengths: list[int]) -> list[tuple[int, int, int]] | None:
    """``(start, end, kv_len)`` for consecutive blocks of :data:`BLOCK_ROWS` rows, each reading only its
    longest row's columns, or None when that would save less than a fifth of the columns read.

    Attention of a decode step is bound by reading the cache; rows shorter than the longest read masked
    columns for nothing. The engine admits prompts longest first, so neighbouring rows are alike, and a
    finished row's place goes to the last (shortest) live row, which never raises a block's length."""
    n, top = len(lengths), max(lengths)
    blocks = [(s, min(n, s + BLOCK_ROWS), max(lengths[s : s + BLOCK_ROWS])) for s in range(0, n, BLOCK_ROWS)]
    if len(blocks) < 2 or sum((e - s) * k for s, e, k in blocks) > 0.8 * n * top:
        return None
    return blocks


class LiveRows:
    """Decoding state of the rows ``[0, size)``: device tensors and host mirrors, permuted together."""

    def __init__(self, width: int, device: torch.device, eos: torch.Tensor):
        self.size, self.eos = 0, eos
        self.tok = torch.zeros(width, dtype=torch.long, device=device)
        "Pending token: sampled, not yet written to the cache."
        self.pos = torch.zeros(width, dtype=torch.long, device=device)
        "Column where the pending token goes (= cached tokens of the row)."
        self.ngen = torch.zeros(width, dtype=torch.long, device=device)
        self.cap = torch.zeros(width, dtype=torch.long, device=device)
        self.req = torch.zeros(width, dtype=torch.long, device=device)
        self.req_h: list[int] = []
        self.pos_h: list[int] = []

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tok, self.pos, self.ngen, self.cap, self.req

    def admit(self, batch: Sequence[Any], token: torch.Tensor, lengths: list[int]) -> None:
        """Append rows for ``batch`` (objects with ``index`` and ``max_new``), first tokens sampled."""
        s, k = self.size, len(batch)
        values = (token, lengths, 1, [r.max_new for r in batch], [r.index for r in batch])
        for tensor, value in zip(self._tensors(), values, strict=True):
            tensor[s : s + k] = (
                torch.as_tensor(value, device=tensor.device) if isinstance(value, list) else value
            )
        self.req_h += [r.index for r in batch]
        self.pos_h += lengths
        self.size += k

    def advance(self, token: torch.Tensor) -> None:
        """After a decode step: ``token`` becomes pending, one column further."""
        size = self.size
        self.tok[:size] = token
        self.pos[:size] += 1
        self.ngen[:size] += 1
        self.pos_h = [p + 1 for p in self.pos_h]

    def record(
        self, token: torch.Tensor, logp: torch.Tensor, lo: int, out_tok: torch.Tensor, out_lp: torch.Tensor
    ) -> list[tuple[int, int, bool]]:
        """Store rows ``[lo, size)``'s new tokens; return ``(row, tokens generated, ended on eos)`` of finished rows."""
        rows = slice(lo, self.size)
        count = self.ngen[rows]
        out_tok[self.req[rows], count - 1] = token
        out_lp[self.req[rows], count - 1] = logp
        is_eos = torch.isin(token, self.eos)
        finished = is_eos | (count >= self.cap[rows])
        if not bool(finished.any()):
            return []
        idx = finished.nonzero().flatten()
        rows_done, counts, eos = (idx + lo).tolist(), count[idx].tolist(), is_eos[idx].tolist()
        return list(zip(rows_done, counts, eos, strict=True))

    def compact(self, holes: list[int], movers: list[int], new_size: int) -> None:
        """Swap rows ``holes[i]`` and ``movers[i]``, then keep the first ``new_size`` rows live."""
        if holes:
            perm = list(range(self.size))
            for h, m in zip(holes, movers, strict=True):
                perm[h], perm[m] = m, h
            index = torch.tensor(perm, device=self.tok.device)
            for tensor in self._tensors():
                tensor[: self.size] = tensor[index]
            self.req_h = [self.req_h[p] for p in perm]
            self.pos_h = [self.pos_h[p] for p in perm]
        self.size = new_size
        del self.req_h[new_size:], self.pos_h[new_size:]


def static_reason(model: torch.nn.Module) -> str | None:
    """Why no cached forward can drive ``model``, from its config and signature alone (None: try the probe)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(getattr(model, "forward", None)):
        return "not a transformers model (no config)"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    params = inspect.signature(model.forward).parameters
    if not ({"cache", "past_key_values"} & set(params)) or "position_ids" not in params:
        return "forward takes no cache or no position_ids"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (needs sdpa or eager)"
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return f"layer types {sorted(set(types))} (only full attention)"
    if types is None and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if not isinstance(getattr(cfg, "num_hidden_layers", None), int):
        return "config has no num_hidden_layers"
    return None


def probe(model: torch.nn.Module, forward: type[Forward]) -> str | None:
    """Cached forwards (two rows, unequal lengths; a decode step; an append) against plain forwards.

    Returns why they differ or fail (None: they agree within the tolerance of the module docstring)."""
    try:
        return _probe(model, forward)
    except Exception as exc:  # any failure means: do not use this forward
        return f"probe failed: {type(exc).__name__}: {exc}"


def _probe(model: torch.nn.Module, forward: type[Forward]) -> str | None:
    vocab = int(model.config.vocab_size)
    seqs = [[(7 * i + 3) % vocab for i in range(7)], [(5 * i + 1) % vocab for i in range(6)]]
    device = next(model.parameters()).device
    with torch.inference_mode(), eval_mode(model):
        ref = [model(input_ids=torch.tensor([s], device=device)).logits[0].float() for s in seqs]
        cache = SlotCache(model.config.num_hidden_layers)
        cache.reserve(2, 16, 0)
        fwd = forward(model, cache)
        got = [fwd.prefill([seqs[0][:4], seqs[1][:2]], [0, 0], 0).float()]
        want = [torch.stack([ref[0][3], ref[1][1]])]
        pos = torch.tensor([[4], [2]], device=device)
        ids = torch.tensor([[seqs[0][4]], [seqs[1][2]]], device=device)
        got.append(fwd(ids, pos, 0, pos, 5).float())
        want.append(torch.stack([ref[0][4], ref[1][2]]))
        got.append(fwd.prefill([seqs[1][3:6]], [3], 1).float())
        want.append(ref[1][5][None])
    dtype = next(model.parameters()).dtype
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    for g, w in zip(got, want, strict=True):
        diff = float((g - w).abs().max())
        if not diff <= tol * (1.0 + float(w.abs().max())):
            return f"cached forward differs from a plain forward by {diff:.3g}"
    return None
