"""Implicit process reward model (PRIME / ITPO): fit π_φ on conversation outcomes, score assistant turns.

π_φ (trained) and a frozen π_ref both start from the policy's checkpoint (docs/method.md §1.1). The token
reward is ``r_t = β·q_t``, ``q_t = log π_φ(y_t|y_<t) − log π_ref(y_t|y_<t)`` on assistant tokens (user and
template tokens are context only); the loss is the BCE of ``σ(β·Σ_t q_t)`` against the conversation's label
(docs/method.md §1.3). No turn label is ever needed. :class:`ImplicitPRM`: :meth:`~ImplicitPRM.prepare` (render, pack, run
π_ref once), :meth:`~ImplicitPRM.fit`, :meth:`~ImplicitPRM.score` (per-turn credit through
:func:`itpo_batch.credit.turns.turn_credit`), :meth:`~ImplicitPRM.save` / :meth:`ImplicitPRM.from_dir` (warm start).

Design decisions and deviations from the official code (``recipe/itpo/prime_dp_rm.py``,
``prime_core_algos.py``, ``prime_fsdp_workers.py``):

- **Reference log-probs once per dataset** (docs/method.md §1.6): ``prepare`` runs π_ref once under ``no_grad`` and keeps
  the assistant-token log-probs flat (:mod:`itpo_batch.credit.prm_data`); every epoch, mini-batch order and
  re-score gathers from it (the official step runs the same frozen checkpoint three times).
  ``PRMDataset.ref_logp`` can be shared with the policy's KL term.
- **Row-wise masking by construction** (docs/method.md §1.6): every forward is a packed buffer whose assistant mask and
  sequence ids are its own, so any mini-batch size is correct (the official forward multiplies each row by
  the whole micro-batch's mask and is right only at micro-batch 1).
- **Update schedule** (docs/method.md §1.5): AdamW (0.9, 0.999), weight decay 0, grad-norm clip 10, constant LR
  (overrides of :mod:`itpo_batch.model.train`'s default, in :class:`PRMConfig`); one optimiser step per
  mini-batch of ``mini_batch = 4`` conversations with the mean BCE over them (the official mean over
  micro-batches of one); one epoch in logged order. ``epochs``/``shuffle``/``mini_batch`` are explicit
  knobs (they set how hard the PRM fits the logs before re-scoring; offline, on logs scored once, several
  shuffled epochs are usually wanted). The optimiser lives on the object, so successive ``fit`` calls
  continue it as the official long-lived one; a warm start from disk restarts Adam's moments (not saved).
- **β** = 0.05: PRIME's value and the ITPO math script's (the others 0.0035–0.01, docs/method.md §10). β only
  shapes the PRM loss: with a normaliser it cancels out of the turn rewards (docs/method.md §1.4).
- **Learning rate per scale.** The official 1e-6 is tuned for a 3B model and moves the ~2.5M-parameter
  embedded model not at all in a few steps. ``lr=None`` resolves by parameter count (:func:`default_lr`):
  3e-4 below 50M parameters (tiny, CPU), the official 1e-6 above.
- **Labels** (docs/method.md §1.3): soft labels are allowed, ``y = clip((o − lo)/(hi − lo), 0, 1)`` with
  ``label_range = (lo, hi)``. The default ``(0, 1)`` keeps [0, 1] outcomes (accuracy, BLEU) as they are and
  clips the small negative word-cost outcomes of the simulated tasks to 0; use ``(-1, 1)`` for outcomes on
  [-1, 1]. The official label excludes the word cost: pass ``labels=`` (e.g. the metadata's score) for that.
  Norm-ITPO always splits the *outcome*, not the label.
- **Normaliser** ``r / (max |suffix sum| + 1e-6)`` (docs/method.md §1.4): ``"global"`` (default) takes the max over
  all conversations scored together: each rank's max over the buffers it scored, all-reduced (MAX) over
  ranks (the official per-shard max is a known bug); ``"local"`` keeps each rank's own, the official
  per-shard scale (in one process it equals ``"global"``); ``"none"`` keeps raw ``β·q``. Norm-ITPO's n̄ is
  always batch-global, as officially.
- **Reported rewards.** ``implicit_reward`` / ``implicit_reward_mean`` are raw ``β·Σq`` (and ÷ n), as the
  scored-turns schema defines them; ``implicit_reward_normalized`` is that ÷ the normaliser, the official
  ITPO turn reward ``S``. ``itpo_norm_weight`` / ``itpo_norm_reward`` use the normalised rewards, as the
  official Norm-ITPO does.
- **Precision.** float32 weights (the official master weights), bf16 autocast on CUDA inside
  :func:`itpo_batch.model.logprobs.token_logprobs`; dropout off (eval mode) as in the official PRM. At
  initialisation (π_φ = π_ref, same buffers) every implicit reward is exactly 0.
- **NaN cannot spread.** Each fit step's loss and grad norm, and every log-ratio forward, must be finite
  (:class:`~itpo_batch.core.errors.NonFiniteError`); a fit is always followed by that forward, so a broken π_φ stops there.
- Not reproduced: the ``lambda > 0`` GAE branch, ``prime_granularity: whole`` (broken), non-``ce`` losses,
  the dead ``threshold`` knob (docs/method.md §1.6).
- **Several processes** (:mod:`itpo_batch.model.dist`): every rank holds the whole dataset; forwards without
  gradients are sharded by buffer and all-gathered, each mini-batch is split over ranks (π_φ prepared by
  accelerate, lock-step micro-batches, global denominator), so fit and scores equal one process's.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn import functional as F

from itpo_batch.core.errors import ModelLoadError, NonFiniteError
from itpo_batch.credit.prm_data import PRMDataset, PRMScores, prepare_dataset, turn_frame
from itpo_batch.credit.prm_metrics import prm_diagnostics
from itpo_batch.credit.turns import DEFAULT_BETA, DEFAULT_TAU, suffix_max_normalizer
from itpo_batch.data.io import atomic_dir
from itpo_batch.data.validate import Logs
from itpo_batch.model import dist
from itpo_batch.model.loading import ALIASES, default_device, load_model, load_tokenizer
from itpo_batch.model.logprobs import assistant_token_logprobs, packed_to_padded
from itpo_batch.model.packing import PackedBatch, gather_segments, pack
from itpo_batch.model.render import RenderConfig
from itpo_batch.model.train import OptimConfig, prepare, train_step

Normalize = Literal["none", "global", "local"]
CONFIG_FILE = "prm_config.json"
SMALL_MODEL_PARAMS = 50_000_000
_INSTANCES = itertools.count()


@dataclass
class PRMConfig:
    """Implicit PRM: loss, optimiser, schedule, normaliser and labels (docs/method.md §1, §10)."""

    beta: float = DEFAULT_BETA
    "β of r_t = β·(log π_φ − log π_ref); 0.05 as PRIME (ITPO scripts: 0.0035–0.05)."
    lr: float | None = None
    "AdamW learning rate; None: 3e-4 below 50M parameters (tiny), else 1e-6 (official, for 3B)."
    epochs: int = 1
    "Passes over the logs per fit (official: 1 per training step)."
    mini_batch: int = 4
    "Conversations per optimiser step (official reward_model.mini_batch_size = 4)."
    shuffle: bool = False
    "Shuffle conversations each epoch (official: logged order)."
    grad_clip: float = 10.0
    "Max gradient norm (official 10)."
    weight_decay: float = 0.0
    "AdamW weight decay (official 0)."
    betas: tuple[float, float] = (0.9, 0.999)
    "AdamW (β1, β2) (official; the package default is (0.9, 0.95))."
    normalize: Normalize = "global"
    "Token-reward normaliser: 'global' (batch max |suffix sum|), 'local' (per process), 'none'."
    tau: float = DEFAULT_TAU
    "Norm-ITPO softmax temperature (scripts: 0.4)."
    center: bool = False
    "Subtract the scored batch's mean token reward before turn sums (ours, off = official; docs/method.md §2.2)."
    label_range: tuple[float, float] = (0.0, 1.0)
    "(lo, hi): label = clip((outcome - lo) / (hi - lo), 0, 1); (0, 1) keeps [0, 1] outcomes as they are."
    batch_tokens: int = 2048
    "Most tokens per packed forward (CPU: 1-2k, the dense block mask grows with its square); a mini-batch over it is split, gradients accumulated."
    chunk_size: int = 1024
    "Rows per lm_head chunk in the log-prob computation."
    max_length: int | None = None
    "Context per conversation (default: the model's)."
    overflow: Literal["drop", "truncate"] = "truncate"
    "Conversations over the context: 'truncate' (whole turns) or 'drop'."

    def __post_init__(self) -> None:
        self.label_range = (float(self.label_range[0]), float(self.label_range[1]))
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.normalize not in ("none", "global", "local"):
            raise ValueError(f"normalize must be 'none', 'global' or 'local', not {self.normalize!r}")
        if not self.label_range[0] < self.label_range[1]:
            raise ValueError(f"label_range needs lo < hi, got {self.label_range}")
        if self.beta <= 0 or self.epochs < 0 or self.mini_batch < 1 or self.batch_tokens < 1:
            raise ValueError("beta must be > 0, epochs >= 0, mini_batch >= 1 and batch_tokens >= 1")


def default_lr(n_params: int) -> float:
    """Learning rate when ``PRMConfig.lr`` is None: 3e-4 for small (tiny, CPU) models, 1e-6 otherwise."""
    return 3e-4 if n_params < SMALL_MODEL_PARAMS else 1e-6


class ImplicitPRM:
    """π_φ (trained) and π_ref (frozen) sharing one tokenizer; see the module docstring."""

    def __init__(self, model: nn.Module, reference: nn.Module, tokenizer: Any, cfg: PRMConfig, ref_spec: str):
        if model.config.vocab_size != reference.config.vocab_size:
            raise ModelLoadError("the PRM and its reference have different vocabularies")
        self.model, self.reference, self.tokenizer, self.cfg = model.eval(), reference.eval(), tokenizer, cfg
        self.ref_spec, self.version, self.uid = ref_spec, 0, next(_INSTANCES)
        self.optimizer: torch.optim.Optimizer | None = None
        self.trained: nn.Module = self.model  # what fit's forwards go through (accelerate's wrapper if any)

    @classmethod
    def load(
        cls,
        reference: str | os.PathLike[str],
        cfg: PRMConfig | None = None,
        init: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
    ) -> ImplicitPRM:
        """π_ref from ``reference`` (the policy's initial checkpoint); π_φ from ``init`` or that checkpoint."""
        dev = torch.device(device) if device is not None else default_device()
        ref = load_model(reference, role="reference", device=dev, dtype=torch.float32)
        prm = load_model(init if init is not None else reference, role="prm", device=dev, dtype=torch.float32)
        spec = str(reference) if str(reference) in ALIASES else str(Path(reference).resolve())
        return cls(prm, ref, load_tokenizer(reference), cfg or PRMConfig(), spec)

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike[str],
        reference: str | os.PathLike[str] | None = None,
        cfg: PRMConfig | None = None,
        device: torch.device | str | None = None,
    ) -> ImplicitPRM:
        """Warm start from a directory written by :meth:`save` (its reference and config unless given)."""
        meta_file = Path(path) / CONFIG_FILE
        if not meta_file.is_file():
            raise ModelLoadError(f"{str(path)!r} is not a PRM directory (no {CONFIG_FILE})")
        meta = json.loads(meta_file.read_text())
        cfg = cfg or PRMConfig(**meta["config"])
        return cls.load(reference or meta["reference"], cfg, init=path, device=device)

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """HF ``save_pretrained`` (safetensors) + tokenizer + ``prm_config.json``, written atomically."""
        with atomic_dir(out_dir) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            meta = {"config": dataclasses.asdict(self.cfg), "reference": self.ref_spec, "steps": self.version}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return Path(out_dir)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(
        self,
        chats: Sequence[Sequence[dict[str, str]]],
        outcomes: Sequence[float] | np.ndarray,
        groups: Sequence[Any] | np.ndarray | None = None,
        conversation_ids: Sequence[str] | None = None,
        labels: Sequence[float] | np.ndarray | None = None,
        ref_logp: torch.Tensor | None = None,
    ) -> PRMDataset:
        """Render, pack, label and run π_ref once (:func:`itpo_batch.credit.prm_data.prepare_dataset`);
        ``ref_logp`` (π_ref's log-probs of these conversations, computed before) spares that forward."""
        cfg = self.cfg
        return prepare_dataset(
            self.reference,
            self.tokenizer,
            chats,
            outcomes,
            RenderConfig(max_length=cfg.max_length, overflow=cfg.overflow),
            batch_tokens=cfg.batch_tokens,
            label_range=cfg.label_range,
            groups=groups,
            conversation_ids=conversation_ids,
            labels=labels,
            chunk_size=cfg.chunk_size,
            ref_logp=ref_logp,
        )

    def prepare_logs(
        self,
        logs: Logs,
        labels: Sequence[float] | np.ndarray | None = None,
        ref_logp: torch.Tensor | None = None,
    ) -> PRMDataset:
        """:meth:`prepare` on validated logs (their outcome, group_id and conversation_id columns)."""
        conv = logs.conversations
        ids, groups = conv["conversation_id"].to_list(), conv["group_id"].to_numpy()
        return self.prepare(logs.chats(), conv["outcome"].to_numpy(), groups, ids, labels, ref_logp)

    # ------------------------------------------------------------------------------------ forward + loss

    def buffer_logratio(
        self, batch: PackedBatch, ref_logp: torch.Tensor, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q ``[A_b]`` per assistant token, Σq ``[n_seqs]`` per buffer slot); differentiable under grad."""
        q = assistant_token_logprobs(model or self.model, batch, self.cfg.chunk_size) - ref_logp
        seq = batch.seq_id().to(q.device)[batch.assistant_mask.to(q.device)]
        return q, q.new_zeros(batch.n_seqs).index_add(0, seq, q)

    def _buffer_losses(self, data: PRMDataset, which: Sequence[int]) -> Iterator[torch.Tensor]:
        """Per packed buffer of conversations ``which``: its BCE sum / len(which) (they add up to the mean).

        Under a launcher, of this rank's part of ``which`` only, in lock-step (:func:`~itpo_batch.model.dist.lockstep`)."""
        which_t = torch.as_tensor(np.asarray(which), dtype=torch.int64, device=data.offsets.device)
        mine = dist.split(which_t)
        batches = pack([data.rendered[i] for i in mine.tolist()], self.cfg.batch_tokens)
        filler = (pack([data.rendered[int(which_t[0])]], self.cfg.batch_tokens)[0], which_t[:1])
        for (batch, convs), weight, sync in dist.lockstep([(b, mine) for b in batches], filler, self.trained):
            conv = convs[batch.seq_index.to(convs.device)]
            ref = data.ref_logp[gather_segments(data.offsets, conv)]
            with sync:
                _, sums = self.buffer_logratio(batch, ref.to(self.device), self.trained)
            y = data.labels.to(self.device)[conv.to(self.device)]
            loss = F.binary_cross_entropy_with_logits(self.cfg.beta * sums, y, reduction="sum") / len(which)
            yield loss if weight == 1.0 else loss * weight

    def loss(self, data: PRMDataset, which: Sequence[int] | None = None) -> torch.Tensor:
        """Mean over conversations ``which`` (default all) of BCE(σ(β·Σq), y); differentiable."""
        return torch.stack(
            list(self._buffer_losses(data, range(len(data)) if which is None else which))
        ).sum()

    def optim_config(self) -> OptimConfig:
        """The optimiser settings of :class:`PRMConfig`, ``lr=None`` resolved by size (:func:`default_lr`)."""
        cfg, n_params = self.cfg, sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        lr = cfg.lr if cfg.lr is not None else default_lr(n_params)
        return OptimConfig(lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)

    def fit(
        self,
        data: PRMDataset,
        holdout: PRMDataset | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        evaluate: bool = True,
        *,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Train π_φ on ``data``; returns ``{"history": [one dict per epoch], "metrics": {...}}``.

        ``on_step(step, total_steps, loss)`` is called after every optimiser step; ``prm/train_loss`` is the
        epoch's mean of the mini-batch losses taken before each step. With ``evaluate`` the
        fitted PRM's diagnostics on ``data`` (``prm/…``) and ``holdout`` (``prm/holdout/…``) are added; the
        forward is cached, so a following :meth:`score` of the same dataset does not repeat it.
        """
        cfg, optim = self.cfg, self.optim_config()
        if self.optimizer is None:
            self.trained, self.optimizer = prepare(self.model, optim)
        rng = np.random.default_rng(seed)  # the epoch shuffles (cfg.shuffle)
        n, history, step = len(data), [], 0
        total = math.ceil(n / cfg.mini_batch) * cfg.epochs
        for epoch in range(cfg.epochs):
            order = rng.permutation(n) if cfg.shuffle else np.arange(n)
            losses = []
            for start in range(0, n, cfg.mini_batch):
                which = order[start : start + cfg.mini_batch]  # gradients accumulate buffer by buffer
                stats = train_step(self.optimizer, optim, self._buffer_losses(data, which))
                NonFiniteError.check(f"PRM loss (step {step + 1} of {total})", stats.loss)
                NonFiniteError.check(f"PRM gradient norm (step {step + 1} of {total})", stats.grad_norm)
                losses.append(stats.loss)
                self.version += 1
                step += 1
                if on_step is not None:
                    on_step(step, total, losses[-1])
            history.append({"epoch": epoch + 1, "prm/train_loss": float(np.mean(losses)), "prm/steps": step})
        metrics: dict[str, float] = {"prm/lr": float(self.optimizer.param_groups[0]["lr"])}
        if evaluate:
            metrics |= self.diagnostics(data)
            if holdout is not None:
                metrics |= self.diagnostics(holdout, prefix="prm/holdout/")
        return {"history": history, "metrics": metrics}

    # ------------------------------------------------------------------------------------------- scoring

    def logratios(self, data: PRMDataset) -> torch.Tensor:
        """q ``[A]`` of the current π_φ on every assistant token, no_grad.

        Cached on ``data`` per (instance, optimiser step): after changing the weights by other means, set
        ``data.cache = None``.
        """
        key = (self.uid, self.version)
        if data.cache is not None and data.cache[0] == key:
            return data.cache[1]
        with torch.no_grad():  # buffers sharded over ranks, gathered on every rank
            ref = data.ref_logp.to(self.device)
            parts = dist.shard_map(lambda b: self.buffer_logratio(b, ref[data.span(b)])[0], data.batches)
            q = torch.cat(parts).to(self.device)
        NonFiniteError.check("PRM token log-ratios (the implicit token rewards / β)", q)
        data.cache = (key, q)
        return q

    def conversation_rewards(self, data: PRMDataset) -> torch.Tensor:
        """``z = β·Σq`` per conversation, float32 ``[N]`` on CPU (the PRM's logit)."""
        q = self.logratios(data)
        conv = data.token_conversation().to(q.device)
        return (self.cfg.beta * q.new_zeros(len(data)).index_add(0, conv, q)).cpu()

    def diagnostics(self, data: PRMDataset, prefix: str = "prm/") -> dict[str, float]:
        """Mean BCE, within-group pairwise accuracy, sign accuracy, ... (:mod:`itpo_batch.credit.prm_metrics`)."""
        return prm_diagnostics(self.conversation_rewards(data), data.labels, data.groups, prefix)

    def _normalizers(self, rewards: list[torch.Tensor]) -> list[float]:
        """Divisor of each scoring buffer: ``max |suffix sum| + 1e-6`` over the buffers each rank scored
        (``i mod N``, as :func:`~itpo_batch.model.dist.shard_map` deals them); ``"global"`` all-reduces it (MAX),
        ``"local"`` keeps the scoring rank's own (the official per-shard scale)."""
        if self.cfg.normalize == "none":
            return [1.0] * len(rewards)
        n, me = dist.num_processes(), dist.rank()
        mine = [suffix_max_normalizer(r, "local") for i, r in enumerate(rewards) if i % n == me]
        peak = float(torch.stack(mine).max()) if mine else 0.0
        if self.cfg.normalize == "global":
            return [dist.all_reduce(peak, "max")] * len(rewards)
        peaks = dist.gather_varlen(torch.tensor([peak], dtype=torch.float64))
        return [float(peaks[i % n][0]) for i in range(len(rewards))]

    def score(self, data: PRMDataset) -> PRMScores:
        """Token rewards β·q (minus their batch mean with ``center``) → normaliser → turn credit, per turn
        and per conversation (no_grad). The conversation totals (``implicit_reward_total``, ``prm_prob``)
        stay uncentred: they are the PRM's prediction of the outcome."""
        r_flat = self.cfg.beta * self.logratios(data)
        if self.cfg.center and r_flat.numel():  # every rank holds every token reward: the mean is global
            r_flat = r_flat - r_flat.mean()
        padded = []
        for batch in data.batches:
            mask = batch.assistant_mask.to(r_flat.device)
            values = r_flat.new_zeros(batch.n_tokens).masked_scatter_(mask, r_flat[data.span(batch)])
            padded.append((packed_to_padded(values, batch), packed_to_padded(mask, batch, fill=False)))
        zs, n_bar, tau = self._normalizers([r for r, _ in padded]), data.mean_turn_length(), self.cfg.tau
        turns = pl.concat(
            [
                turn_frame(data, b, r, m, z, n_bar, tau)
                for b, (r, m), z in zip(data.batches, padded, zs, strict=True)
            ]
        )
        if len(set(zs)) > 1:  # "local" over several ranks: each buffer its scoring rank's divisor
            sizes = [int(b.assistant_mask.sum()) for b in data.batches]
            token_rewards = r_flat / r_flat.new_tensor(np.repeat(zs, sizes))
        else:
            token_rewards = r_flat / zs[0]
        totals = self.conversation_rewards(data)
        conversations = data.frame().with_columns(
            implicit_reward_total=totals.double().numpy(), prm_prob=torch.sigmoid(totals).double().numpy()
        )
        return PRMScores(turns, conversations, token_rewards, max(zs), self.diagnostics(data))
