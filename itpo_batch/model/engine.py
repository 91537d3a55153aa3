"""Rollout engine: batched decoding built for multi-turn rollouts, with the behaviour log-probs of every token.

:class:`RolloutEngine` answers a batch of prompts (token ids, or chat conversations via :meth:`chat`) with
any HF causal LM it can drive (:func:`~itpo_batch.model.engine_llama.forward_for`), and falls back to ``model.generate``
(:func:`itpo_batch.model.generation.generate`) for the others. :func:`generate` is the one-call form, a
drop-in for the ``model.generate`` path.

Design decisions:

- **Same outputs as the ``model.generate`` path**: the same prompts (chat template with the generation
  prompt), stop tokens (:func:`~itpo_batch.model.generation.eos_token_ids`), greedy rule, sampling
  distribution and behaviour log-probs (:mod:`itpo_batch.model.sampling`), ``stopped`` flags and
  :class:`~itpo_batch.model.generation.Generation` objects; tests check token-for-token equality under
  greedy decoding and a goodness-of-fit test for sampling. Sampled tokens differ from that path's for a
  given seed (other random draws), but the same seed and prompts give the same tokens.
- **KV cache written in place** (:class:`~itpo_batch.model.kvcache.SlotCache`): one preallocated row per
  conversation, absolute positions, no padding on the left; a decode step writes one column per row.
- **Conversations keep their cache across turns.** A prompt may carry a ``key`` (the rollout passes
  its episode); the row that held the same key in the previous call is reused up to the longest common
  prefix of its cached tokens and the new prompt, and only the rest is prefilled (normally the user's
  reply and the generation prompt). The prefix check makes keys mere hints: a reused key, a reply
  re-tokenised differently from the generated ids, or an ``empty_reply`` substitute only shortens the
  reused prefix, so the tokens conditioned on are always those of the rendered conversation, as in the
  ``model.generate`` path. Rows not claimed by a call, and all rows after the weights change (parameter
  version counters), are dropped.
- **Continuous batching.** At most ``width`` rows decode together, always the contiguous rows
  ``[0, live)``. A row that stops (eos or its ``max_new_tokens``) leaves the range at once (swapped with
  the last live row: a copy of two cache rows, no per-step gather), and waiting prompts take the freed
  rows, admitted in groups of at least ``width // 4`` (or all that wait) to bound the number of prefill
  forwards. Prompts are admitted longest first, so neighbouring rows have alike lengths and a decode
  step's attention can read, per block of rows, only the columns that block needs
  (:func:`~itpo_batch.model.engine_support.attention_blocks`). Prefills pad short rows on the left of
  the *query* only; padding tokens write to a column that is never read.
- **Context limit** per prompt: ``max_new_tokens`` is clamped to what fits in ``max_position_embeddings``
  after *that* prompt (the ``model.generate`` path clamps the whole batch to its longest prompt; both agree
  for a prompt alone); :class:`~itpo_batch.core.errors.ItpoError` if a prompt leaves no room.
- **Determinism.** One :class:`torch.Generator` seeded per call; scheduling depends only on the
  prompts and the tokens, so the same seed and prompts give the same outputs. Results are not
  batch-invariant (kernels round differently for other shapes), as in the ``model.generate`` path.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.core.errors import ItpoError
from itpo_batch.model import generation as hf
from itpo_batch.model.engine_llama import forward_for
from itpo_batch.model.engine_support import Forward, LiveRows
from itpo_batch.model.generation import Generation, Message, SamplingConfig, eval_mode
from itpo_batch.model.kvcache import SlotCache
from itpo_batch.model.sampling import choose

log = logging.getLogger(__name__)
COLUMN_QUANTUM = 64  # cache columns grow in steps of this many


@dataclass
class Reply:
    """One reply as token ids (:meth:`RolloutEngine.generate_ids`)."""

    token_ids: list[int]
    "Generated ids, up to and including the first stop token."
    logprobs: list[float]
    "Behaviour log-prob of each id."
    stopped: bool
    "True if the reply ended with a stop token, False if it hit its ``max_new_tokens``."


@dataclass
class _Request:
    index: int
    prompt: list[int]
    key: Hashable | None
    max_new: int
    row: int | None = None
    reuse: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class RolloutEngine:
    """Decodes batches of prompts for one model, keeping each keyed conversation's cache across calls."""

    def __init__(
        self, model: torch.nn.Module, eos_ids: Sequence[int], width: int = 32, prefill_tokens: int = 16384
    ):
        if width < 1 or prefill_tokens < 1:
            raise ValueError("width and prefill_tokens must be >= 1")
        self.model, self.width, self.prefill_tokens = model, width, prefill_tokens
        self.eos = sorted({int(i) for i in eos_ids})
        self._forward_cls, self.reason = forward_for(model)
        self._cache: SlotCache | None = None
        self._fwd: Forward | None = None
        self._row_key: list[Hashable | None] = []
        self._row_tokens: list[list[int]] = []
        self._owner: list[int | None] = []
        self._row_len: list[int] = []
        self._weights: tuple = ()
        # work done so far (tests and benches): tokens prefilled and reused from the cache, forwards
        self.stats = dict.fromkeys(("prefill_tokens", "reused_tokens", "prefill_forwards", "decode_steps"), 0)

    @property
    def supported(self) -> bool:
        return self.reason is None

    def release(self) -> None:
        """Free the cache (and forget every conversation)."""
        self._cache, self._fwd, self._weights = None, None, ()
        self._row_key, self._row_tokens, self._owner, self._row_len = [], [], [], []

    def chat(
        self,
        tokenizer: PreTrainedTokenizerBase,
        conversations: Sequence[Sequence[Message]],
        cfg: SamplingConfig,
        seed: int,
        keys: Sequence[Hashable | None] | None = None,
    ) -> list[Generation]:
        """One reply per conversation; ``model.generate`` (no keys) when the engine cannot drive the model."""
        if not conversations:
            return []
        if not self.supported:
            return hf.generate(self.model, tokenizer, conversations, cfg, seed)
        replies = self.generate_ids(hf.render_prompts(tokenizer, conversations), cfg, seed, keys)
        texts = tokenizer.batch_decode([r.token_ids for r in replies], skip_special_tokens=True)
        return [
            Generation(t, r.token_ids, r.logprobs, r.stopped) for t, r in zip(texts, replies, strict=True)
        ]

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        seed: int,
        keys: Sequence[Hashable | None] | None = None,
    ) -> list[Reply]:
        """One reply per prompt of token ids (see the module docstring)."""
        if self.reason is not None:
            raise ItpoError(f"the rollout engine cannot drive this model: {self.reason}")
        requests = self._requests(prompts, cfg, keys)
        if not requests:
            return []
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.inference_mode(), eval_mode(self.model):
            self._attach(requests)
            return self._run(requests, cfg, generator, device)

    # -- requests and cache rows -------------------------------------------------------------------------

    def _requests(
        self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, keys: Sequence[Hashable | None] | None
    ) -> list[_Request]:
        limit = hf.context_limit(self.model)
        seen: set[Hashable] = set()
        out = []
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ItpoError("cannot generate from an empty prompt")
            room = cfg.max_new_tokens if limit is None else min(cfg.max_new_tokens, limit - len(prompt))
            if room <= 0:
                raise ItpoError(
                    f"a prompt of {len(prompt)} tokens leaves no room to generate in a {limit}-token context"
                )
            key = keys[i] if keys is not None else None
            key = None if key in seen else key  # a key names one conversation: later duplicates go without
            if key is not None:
                seen.add(key)
            out.append(_Request(i, [int(t) for t in prompt], key, room))
        return out

    def _attach(self, requests: list[_Request]) -> None:
        """Match keyed requests to their rows, drop unclaimed rows, make room (rows and columns)."""
        weights = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if weights != self._weights:  # new or updated weights: no cached key/value (or fused weight) is valid
            self._row_key = [None] * len(self._row_key)
            self._weights, self._fwd = weights, None
        by_key = {k: r for r, k in enumerate(self._row_key) if k is not None}
        self._owner = [None] * len(self._row_key)
        self._row_len = [0] * len(self._row_key)
        for req in requests:
            row = by_key.pop(req.key, None) if req.key is not None else None
            if row is not None:
                req.row, req.reuse = (
                    row,
                    min(common_prefix(self._row_tokens[row], req.prompt), len(req.prompt) - 1),
                )
                self._owner[row], self._row_len[row] = req.index, req.reuse
        n_rows = len(self._row_key)  # rows move during the call: _keep records where each one ends up
        self._row_key, self._row_tokens = [None] * n_rows, [[] for _ in range(n_rows)]
        keyed = sum(r.key is not None for r in requests)
        rows = keyed + min(self.width, len(requests) - keyed)
        cols = max(len(r.prompt) + r.max_new for r in requests)
        if self._cache is not None and cols > self._cache.capacity:  # grow geometrically: few reallocations
            cols = max(cols, self._cache.capacity * 3 // 2)
        cols = -(-cols // COLUMN_QUANTUM) * COLUMN_QUANTUM
        if self._cache is None:
            self._cache = SlotCache(self.model.config.num_hidden_layers)
        if self._fwd is None:
            assert self._forward_cls is not None
            self._fwd = self._forward_cls(self.model, self._cache)
        old = self._cache.capacity
        self._cache.reserve(rows, cols, keep_cols=old)
        grow = self._cache.rows - len(self._row_key)
        self._row_key += [None] * grow
        self._row_tokens += [[] for _ in range(grow)]
        self._owner += [None] * grow
        self._row_len += [0] * grow

    def _swap(self, a: int, b: int, requests: list[_Request]) -> None:
        """Exchange the contents and owners of cache rows ``a`` and ``b``."""
        assert self._cache is not None
        self._cache.move_rows([a, b], [b, a], max(self._row_len[a], self._row_len[b]))
        self._owner[a], self._owner[b] = self._owner[b], self._owner[a]
        self._row_len[a], self._row_len[b] = self._row_len[b], self._row_len[a]
        for row in (a, b):
            if self._owner[row] is not None:
                requests[self._owner[row]].row = row

    def _place(self, batch: list[_Request], base: int, requests: list[_Request]) -> None:
        """Give the admitted requests the rows ``[base, base + len(batch))`` and sort ``batch`` by row.

        A request whose row already lies in that range keeps it; the others swap theirs in (or take a
        free row, moving a parked conversation out of the way), so a turn where every conversation is
        admitted at once moves no row."""
        end = base + len(batch)
        stay = {id(r) for r in batch if r.row is not None and base <= r.row < end}
        taken = {r.row for r in batch if id(r) in stay}
        targets = [t for t in range(base, end) if t not in taken]
        movers = sorted((r for r in batch if id(r) not in stay), key=lambda r: -len(r.prompt))
        for req, target in zip(movers, targets, strict=True):
            if req.row is None:
                if self._owner[target] is not None:  # a parked conversation: move it to a free row
                    free = next(r for r in range(len(self._owner) - 1, target, -1) if self._owner[r] is None)
                    self._swap(free, target, requests)
                self._owner[target], self._row_len[target], req.row = req.index, 0, target
            else:
                self._swap(req.row, target, requests)
        batch.sort(key=lambda r: r.row)  # type: ignore[arg-type, return-value]

    # -- the loop ----------------------------------------------------------------------------------------

    def _run(
        self, requests: list[_Request], cfg: SamplingConfig, gen: torch.Generator, device: torch.device
    ) -> list[Reply]:
        n, steps = len(requests), max(r.max_new for r in requests)
        out_tok = torch.zeros(n, steps, dtype=torch.long, device=device)
        out_lp = torch.zeros(n, steps, dtype=torch.float32, device=device)
        n_out, stopped = [0] * n, [False] * n
        live = LiveRows(self.width, device, torch.tensor(self.eos, device=device))
        waiting = deque(sorted(requests, key=lambda r: -len(r.prompt)))  # longest first: see attention_blocks
        while waiting or live.size:
            free = self.width - live.size
            if waiting and free and (live.size == 0 or free >= min(len(waiting), max(1, self.width // 4))):
                batch = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                base = live.size
                self._place(batch, base, requests)
                logits = self._prefill(batch, base)
                token, logp = choose(logits, cfg.temperature, cfg.top_p, gen)
                live.admit(batch, token, [len(r.prompt) for r in batch])
                lo = base
            else:
                assert self._fwd is not None
                logits = self._fwd.decode(live)
                self.stats["decode_steps"] += 1
                token, logp = choose(logits, cfg.temperature, cfg.top_p, gen)
                live.advance(token)
                lo = 0
            finished = live.record(token, logp, lo, out_tok, out_lp)
            if finished:
                self._retire(finished, live, requests, n_out, stopped)
        ids, lps = out_tok.tolist(), out_lp.double().tolist()
        replies = [Reply(ids[i][: n_out[i]], lps[i][: n_out[i]], stopped[i]) for i in range(n)]
        self._keep(requests, replies)
        return replies

    def _prefill(self, batch: list[_Request], base: int) -> torch.Tensor:
        """Last-position logits ``[len(batch), V]`` after writing each prompt's uncached suffix."""
        assert self._fwd is not None
        groups, start = [], 0
        lengths = [len(r.prompt) - r.reuse for r in batch]
        for end in range(1, len(batch) + 1):  # contiguous groups whose padded size stays bounded
            width = max(lengths[start:end])
            padded, real = width * (end - start), sum(lengths[start:end])
            if end - start > 1 and (padded > 2 * real + 64 * (end - start) or padded > self.prefill_tokens):
                groups.append((start, end - 1))
                start = end - 1
        groups.append((start, len(batch)))
        parts = []
        for a, b in groups:
            rows = batch[a:b]
            self.stats["prefill_forwards"] += 1
            parts.append(
                self._fwd.prefill([r.prompt[r.reuse :] for r in rows], [r.reuse for r in rows], base + a)
            )
        for r in batch:
            self._row_len[r.row] = len(r.prompt)  # type: ignore[index]
        self.stats["prefill_tokens"] += sum(lengths)
        self.stats["reused_tokens"] += sum(r.reuse for r in batch)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _retire(
        self,
        finished: list[tuple[int, int, bool]],
        live: LiveRows,
        requests: list[_Request],
        n_out: list[int],
        stopped: list[bool],
    ) -> None:
        """Record finished rows and swap them out of the live range ``[0, live.size)``."""
        assert self._cache is not None
        done = set()
        for pos, count, eos in finished:
            n_out[live.req_h[pos]], stopped[live.req_h[pos]] = count, eos
            done.add(pos)
        new_size = live.size - len(done)
        holes = sorted(p for p in done if p < new_size)
        movers = [p for p in range(new_size, live.size) if p not in done]
        for p in done.union(movers):
            self._row_len[p] = live.pos_h[p]  # cached columns of a live row
        if holes:
            self._cache.move_rows(
                holes + movers, movers + holes, max(self._row_len[p] for p in holes + movers)
            )
            for h, m in zip(holes, movers, strict=True):
                self._owner[h], self._owner[m] = self._owner[m], self._owner[h]
                self._row_len[h], self._row_len[m] = self._row_len[m], self._row_len[h]
                for row in (h, m):
                    requests[self._owner[row]].row = row  # type: ignore[index]
        live.compact(holes, movers, new_size)
        for pos in range(new_size, new_size + len(done)):
            req = requests[self._owner[pos]]  # type: ignore[index]
            if req.key is None:
                self._owner[pos], req.row = None, None

    def _keep(self, requests: list[_Request], replies: list[Reply]) -> None:
        """Remember the cached tokens of keyed conversations for the next call."""
        for req, reply in zip(requests, replies, strict=True):
            if req.key is not None and req.row is not None:
                self._row_key[req.row] = req.key
                self._row_tokens[req.row] = req.prompt + reply.token_ids[:-1]


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    cfg: SamplingConfig,
    seed: int,
    width: int = 32,
) -> list[Generation]:
    """One reply per conversation through a fresh :class:`RolloutEngine` (``model.generate`` as fallback)."""
    engine = RolloutEngine(model, hf.eos_token_ids(model, tokenizer), width=width)
    if not engine.supported:
        log.info("rollout engine falls back to model.generate: %s", engine.reason)
    return engine.chat(tokenizer, conversations, cfg, seed)
