"""Rollout engine: play a task's episodes with a policy and a user simulator, return nested logs.

:func:`rollout` runs ``cfg.n`` conversations of a :class:`~itpo_batch.sim.envs.base.Task` and returns a
``pyarrow.Table`` in the nested logs shape (``schemas/logs.nested.schema.json``) that
:func:`itpo_batch.data.validate.read_logs` accepts. :func:`collect` gives the same conversations as
:class:`ConversationRecord` objects, which also keep the generated token ids.

Design decisions:

- **Groups.** Conversation ``i`` is member ``m = i % group_size`` of group ``g = i // group_size``. The
  group's hidden case is ``task.sample_case(episode_rng(seed, g))`` and the member's episode rng (user
  noise, scripted policy) is ``episode_rng(seed, g, m)``, so a conversation's case and user do not depend
  on the batch it runs in. Group ids are ``{task}-s{seed}-g{g:05d}``.
- **Batching.** Conversations run in chunks of ``batch_size``. Each step asks the policy for one assistant
  message for every *active* episode of the chunk at once (one :meth:`Policy.act` call), lets the
  environment answer, lets the user simulator reword the answers (one batched call), and drops finished
  episodes: the batch shrinks and nothing is generated for a finished conversation. Prompts are
  re-rendered from the messages every turn, as an OpenAI-style client would; earlier assistant turns are
  therefore re-tokenised from their text.
- **Decoding** (:class:`HFPolicy`): the rollout engine (:mod:`itpo_batch.model.engine`), ``batch_size``
  rows wide. Each episode is the key of its conversation's KV cache, so a turn prefills only what is new
  since the previous one (the environment's or user's reply and the generation prompt; more when the
  re-tokenised text differs from the generated ids, up to the first difference); a reply that stops
  leaves the batch at once. Models the engine cannot drive fall back to ``model.generate``
  (``metadata.decoder``: ``engine`` or ``hf_generate``).
- **Determinism.** The HF policy is seeded per (seed, chunk, turn) and the user simulator per
  (seed, chunk, turn) on a separate stream; the scripted policy uses each episode's own rng. The same
  config gives the same table, bit for bit on the same machine; a different ``batch_size`` gives a
  different (equally valid) sample. The engine draws its random numbers differently from
  ``model.generate``, so a sampled rollout differs from one made before the engine existed (greedy
  ones agree token for token with ``model.generate`` run one conversation at a time).
- **Several processes** (``accelerate launch``, :mod:`itpo_batch.model.dist`): :func:`rollout` deals whole
  *chunks* round-robin over the ranks (chunk ``c`` on rank ``c mod N``), each rank plays its chunks
  exactly as one process would (same conversations, same batch, same per-chunk seeds; the engine keeps
  nothing from one chunk to the next but its buffer sizes, and attention reads only the columns it
  needs), and the per-chunk tables are all-gathered in chunk order: every rank gets the table of one
  process, bit for bit, sampled or greedy. Chunks rather than groups (:func:`~itpo_batch.model.dist.
  shard_by_group`) because sampling draws one generator per (chunk, turn) and kernels round per batch
  shape: dealing groups would change both. Rollouts use at most ``ceil(n / batch_size)`` ranks; the
  others wait at the gather.
- **Behaviour log-probs** (HF policy): one list per assistant turn, one value per *generated* token
  including the eos when it was generated (``log_softmax(logits / T)`` before top-p, see
  :mod:`itpo_batch.model.generation`). A turn cut at ``max_new_tokens`` has no eos; the chat template will
  still close it when the conversation is rendered, so that closing token has no behaviour log-prob.
  Re-tokenising the decoded text does not always give the generated ids back (non-canonical BPE merges,
  skipped special tokens; frequent for an untrained model): ``metadata.n_retokenize_mismatch`` counts
  such turns, and consumers must compare lengths before pairing behaviour log-probs with rendered tokens.
  The scripted policy has no log-probs: the column is null for its rows.
- **Empty replies.** The logs contract forbids empty messages, so a reply that decodes to whitespace only
  (eos first, only special tokens, or only newlines) is logged and played as ``cfg.empty_reply``; its
  behaviour log-probs still describe the generated tokens. ``metadata.n_empty_replies`` counts them.
- **Outcome and oracle** come from the environment (:meth:`Episode.result`, per-turn utilities); the LLM
  user only changes the wording of the user messages. ``metadata`` (JSON) keeps score, cost, success,
  n_turns, the policy's settings, the user simulator and the seed.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.data.schemas import nested_logs_schema
from itpo_batch.model import dist
from itpo_batch.model.engine import RolloutEngine
from itpo_batch.model.generation import Generation, SamplingConfig, eos_token_ids, load_chat_model
from itpo_batch.sim.envs.base import Episode, EpisodeResult, Task, episode_rng
from itpo_batch.sim.users import RuleUser, User

_POLICY_STREAM, _USER_STREAM = 0, 1


@dataclass
class RolloutConfig:
    """What to roll out and how to sample it."""

    n: int = 512
    "Number of conversations (512: logs large enough for ``sft`` and ``score``)."
    group_size: int = 8
    "Conversations per hidden case (a group, for RLOO/GRPO baselines)."
    seed: int = 0
    "Seeds cases, users, the scripted policy and sampling."
    temperature: float = 1.0
    "Sampling temperature of the HF policy (0: greedy)."
    top_p: float = 1.0
    "Nucleus mass of the HF policy (does not change the recorded log-probs)."
    max_new_tokens: int = 96
    "Most tokens per assistant turn (eos included)."
    batch_size: int = 32
    "Conversations generated together."
    skill: float = 0.5
    "Probability that the scripted policy takes a useful action."
    empty_reply: str = "..."
    "Logged instead of an assistant reply that decodes to whitespace only."

    def __post_init__(self) -> None:
        if self.n < 1 or self.group_size < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("n, group_size, batch_size and max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if not self.empty_reply.strip():
            raise ValueError("empty_reply must not be blank")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)


class Policy(ABC):
    """Produces the next assistant message for a batch of active episodes."""

    name: str

    @abstractmethod
    def act(self, episodes: Sequence[Episode], seed: int) -> list[Generation]:
        """One reply per episode; ``token_ids``/``logprobs`` are empty lists when the policy has none."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded in every conversation's metadata."""
        return {"policy": self.name}

    @property
    def has_logprobs(self) -> bool:
        return False


class ScriptedPolicy(Policy):
    """The task's scripted behaviour policy (``task.scripted_reply``), driven by each episode's rng."""

    name = "scripted"

    def __init__(self, task: Task, skill: float = 0.5):
        self.task, self.skill = task, skill

    def act(self, episodes: Sequence[Episode], seed: int) -> list[Generation]:
        texts = [self.task.scripted_reply(e, e.rng, self.skill) for e in episodes]
        return [Generation(t, [], [], True) for t in texts]

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "skill": self.skill}


class HFPolicy(Policy):
    """Any HF causal LM with a chat template, sampled in batches by the rollout engine (module docstring)."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: RolloutConfig):
        self.model, self.tokenizer, self.sampling = model, tokenizer, cfg.sampling()
        self.engine = RolloutEngine(model, eos_token_ids(model, tokenizer), width=cfg.batch_size)

    @classmethod
    def from_pretrained(
        cls, spec: str, cfg: RolloutConfig, device: torch.device | str | None = None
    ) -> HFPolicy:
        """Load ``spec`` (``tiny``, ``smollm2`` or a local HF chat-model directory) frozen, for sampling."""
        model, tokenizer = load_chat_model(spec, device)
        return cls(model, tokenizer, cfg)

    def act(self, episodes: Sequence[Episode], seed: int) -> list[Generation]:
        messages, keys = [e.messages for e in episodes], [id(e) for e in episodes]
        return self.engine.chat(self.tokenizer, messages, self.sampling, seed, keys)

    def describe(self) -> dict[str, Any]:
        cfg = getattr(self.model, "config", None)
        return {
            "policy": self.name,
            "model": str(getattr(cfg, "_name_or_path", "") or type(self.model).__name__),
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_new_tokens": self.sampling.max_new_tokens,
            "decoder": "engine" if self.engine.supported else "hf_generate",
        }

    @property
    def has_logprobs(self) -> bool:
        return True


@dataclass
class ConversationRecord:
    """One finished conversation, with what the table keeps and the generated token ids."""

    conversation_id: str
    group_id: str
    episode: Episode
    token_ids: list[list[int]] = field(default_factory=list)
    "Generated ids per assistant turn (empty lists for the scripted policy)."
    logprobs: list[list[float]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)
    "Per assistant turn: whether generation ended with eos (False: cut at max_new_tokens)."
    n_empty: int = 0
    n_rewritten: int = 0
    n_fallbacks: int = 0


def stream_seed(seed: int, chunk: int, turn: int, stream: int) -> int:
    """A 63-bit torch seed for one generate call (policy or user stream) of one chunk and turn."""
    hi, lo = np.random.SeedSequence([seed, chunk, turn, stream]).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def _start(task: Task, cfg: RolloutConfig, indices: range, cases: dict[int, Any]) -> list[ConversationRecord]:
    records = []
    for i in indices:
        g, m = divmod(i, cfg.group_size)
        if g not in cases:
            cases[g] = task.sample_case(episode_rng(cfg.seed, g))
        episode = task.episode(cases[g], episode_rng(cfg.seed, g, m))
        episode.start()
        gid = f"{task.name}-s{cfg.seed}-g{g:05d}"
        records.append(ConversationRecord(f"{gid}-m{m:02d}", gid, episode))
    return records


def _apply(rec: ConversationRecord, gen: Generation, cfg: RolloutConfig) -> None:
    text = gen.text
    if not text.strip():
        text, rec.n_empty = cfg.empty_reply, rec.n_empty + 1
    rec.token_ids.append(gen.token_ids)
    rec.logprobs.append(gen.logprobs)
    rec.stopped.append(gen.stopped)
    rec.episode.step(text)


def _run_chunk(
    records: list[ConversationRecord], policy: Policy, user: User, cfg: RolloutConfig, chunk: int
) -> None:
    active = list(records)
    turn = 0
    while active:
        if turn > max(r.episode.task.config.max_assistant_turns for r in active):
            raise RuntimeError("episodes did not finish within max_assistant_turns (a task bug)")
        gens = policy.act([r.episode for r in active], stream_seed(cfg.seed, chunk, turn, _POLICY_STREAM))
        for rec, gen in zip(active, gens, strict=True):
            _apply(rec, gen, cfg)
        active = [r for r in active if not r.episode.done]
        if active:
            used = user.respond([r.episode for r in active], stream_seed(cfg.seed, chunk, turn, _USER_STREAM))
            for rec, reworded in zip(active, used, strict=True):
                rec.n_rewritten += int(reworded)
                rec.n_fallbacks += int(not reworded and user.rewrites)
        turn += 1


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("rollout"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False)


def collect(
    task: Task,
    policy: Policy,
    cfg: RolloutConfig,
    user: User | None = None,
    progress: bool = True,
    chunks: Sequence[int] | None = None,
) -> list[ConversationRecord]:
    """Play ``cfg.n`` conversations (only those of the ``chunks`` of ``batch_size`` given, if any); see the
    module docstring for grouping, batching and seeding."""
    user = user or RuleUser()
    cases: dict[int, Any] = {}
    out: list[ConversationRecord] = []
    starts = dict(enumerate(range(0, cfg.n, cfg.batch_size)))
    wanted = sorted(starts) if chunks is None else list(chunks)
    with _progress(progress) as bar:
        job = bar.add_task("rollout", total=sum(min(cfg.batch_size, cfg.n - starts[c]) for c in wanted))
        for chunk, start in ((c, starts[c]) for c in wanted):
            records = _start(task, cfg, range(start, min(start + cfg.batch_size, cfg.n)), cases)
            _run_chunk(records, policy, user, cfg, chunk)
            out.extend(records)
            bar.advance(job, len(records))
    return out


def retokenize_mismatches(rec: ConversationRecord, tokenizer: PreTrainedTokenizerBase) -> int:
    """Assistant turns whose logged text does not tokenise back to the generated ids (final eos excluded)."""
    texts = [m["content"] for m in rec.episode.messages if m["role"] == "assistant"]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    turns = zip(rec.token_ids, rec.stopped, encoded, strict=True)
    return sum(int((ids[:-1] if stopped else ids) != enc) for ids, stopped, enc in turns)


def _metadata(
    rec: ConversationRecord,
    res: EpisodeResult,
    base: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase | None,
) -> str:
    meta = {
        "score": res.score,
        "cost": res.cost,
        "success": bool(res.success),
        "n_turns": len(rec.episode.utilities),
        **base,
        "n_generated_tokens": sum(len(t) for t in rec.token_ids),
        "n_truncated_turns": rec.stopped.count(False),
        "n_empty_replies": rec.n_empty,
        "user_rewrites": rec.n_rewritten,
        "user_fallbacks": rec.n_fallbacks,
    }
    if tokenizer is not None:
        meta["n_retokenize_mismatch"] = retokenize_mismatches(rec, tokenizer)
    return json.dumps(meta, sort_keys=True)


def records_to_table(
    records: Sequence[ConversationRecord],
    task: Task,
    policy: Policy,
    cfg: RolloutConfig,
    user: User | None = None,
) -> pa.Table:
    """The nested logs table (:func:`itpo_batch.data.schemas.nested_logs_schema`) of finished conversations."""
    base = {**policy.describe(), "seed": cfg.seed, "user": (user or RuleUser()).name}
    tokenizer = getattr(policy, "tokenizer", None) if policy.has_logprobs else None
    results = [r.episode.result() for r in records]
    columns = {
        "conversation_id": [r.conversation_id for r in records],
        "group_id": [r.group_id for r in records],
        "task": [task.name] * len(records),
        "messages": [r.episode.messages for r in records],
        "outcome": [res.outcome for res in results],
        "behavior_logprobs": [r.logprobs if policy.has_logprobs else None for r in records],
        "oracle_turn_utility": [list(r.episode.utilities) for r in records],
        "metadata": [_metadata(r, res, base, tokenizer) for r, res in zip(records, results, strict=True)],
    }
    return pa.Table.from_pydict(columns, schema=nested_logs_schema())


def rollout(
    task: Task, policy: Policy, cfg: RolloutConfig, user: User | None = None, progress: bool = True
) -> pa.Table:
    """Play ``cfg.n`` conversations and return them as nested logs (one row per conversation); under a
    launcher every rank plays its share of the chunks and gets the whole table (module docstring)."""
    user = user or RuleUser()
    if not dist.is_distributed():
        return records_to_table(collect(task, policy, cfg, user, progress), task, policy, cfg, user)
    chunks = list(range(dist.rank(), -(-cfg.n // cfg.batch_size), dist.num_processes()))
    records = collect(task, policy, cfg, user, progress and dist.is_main_process(), chunks)
    sizes = [min(cfg.batch_size, cfg.n - c * cfg.batch_size) for c in chunks]
    ends = np.cumsum([0, *sizes])
    mine = [(c, records_to_table(records[ends[k] : ends[k + 1]], task, policy, cfg, user))
            for k, c in enumerate(chunks)]  # fmt: skip
    parts = sorted(dist.gather_objects(mine), key=lambda part: part[0])
    return pa.concat_tables([table for _, table in parts]).combine_chunks()
