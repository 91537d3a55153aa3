"""Next-token choice for the rollout engine: one log-softmax per step, sampling and the behaviour log-prob from it.

:func:`choose` takes a step's ``[B, V]`` logits and returns the chosen tokens and their behaviour log-probs.

Design decisions:

- **Same definitions as** :mod:`itpo_batch.model.generation`. The behaviour log-prob is
  ``log_softmax(logits.float() / T)[token]`` of the raw logits, before top-p; greedy decoding
  (``T == 0``) takes ``argmax`` of the raw float32 logits (what ``model.generate`` does) and records the
  temperature-1 log-prob. Sampling draws from ``softmax(logits / T)`` restricted to the top-p nucleus and
  renormalised, the distribution of transformers' temperature and top-p warpers (``min_tokens_to_keep=1``).
- **Inverse-CDF sampling** from the probabilities ``exp(log_softmax)`` the step already computed: one
  uniform per row, a cumulative sum and one ``searchsorted``, instead of ``torch.multinomial`` (which
  renormalises and is 10-20x slower on CPU over a 4k vocabulary). The uniform is drawn in ``(0, 1]`` and
  scaled by the row's total mass, so a token of probability 0 (underflow) is never chosen and no
  renormalisation is needed. float32 throughout: a token's effective probability is the difference of
  two float32 partial sums, off by at most about one ulp of the running sum (~6e-8 absolute).
- **Top-p** keeps, in descending-probability order, every token whose *exclusive* cumulative mass is
  below ``top_p`` (the first token always), which is transformers' rule "drop a token when the ascending
  cumulative mass up to it is ``<= 1 - top_p``" written the other way round. Sampling then searches the
  descending cumulative sum up to the kept mass, so the nucleus needs no masking or renormalisation either.
- **Randomness** comes only from the ``generator`` passed in (one per engine call, seeded by its
  caller): the global RNG is never touched, and the same seed and schedule give the same tokens.
"""

from __future__ import annotations

import torch


def _uniform(rows: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[rows, 1]`` float32 uniforms in ``(0, 1]``."""
    return 1.0 - torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float32)


def sample_from_logprobs(logp: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """``[B]`` tokens drawn from ``exp(logp)`` restricted to the top-p nucleus (``logp``: ``[B, V]``)."""
    u = _uniform(logp.shape[0], generator, logp.device)
    probs = logp.exp()
    if top_p >= 1.0:
        cdf = probs.cumsum(-1)
        token = torch.searchsorted(cdf, u * cdf[:, -1:])
        return token.clamp_max_(logp.shape[-1] - 1).squeeze(1)
    sorted_p, order = probs.sort(-1, descending=True)
    cdf = sorted_p.cumsum(-1)
    kept = ((cdf - sorted_p) < top_p).sum(-1, keepdim=True)  # >= 1: the first exclusive mass is 0
    mass = cdf.gather(1, kept - 1)
    rank = torch.searchsorted(cdf, u * mass).clamp_max_(kept - 1)
    return order.gather(1, rank).squeeze(1)


def choose(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B], behaviour log-probs [B] float32)`` for one step's ``[B, V]`` logits."""
    scores = logits.float()
    tempered = scores / temperature if temperature not in (0.0, 1.0) else scores  # x / 1.0 == x exactly
    logp = torch.log_softmax(tempered, dim=-1)
    if temperature > 0:
        token = sample_from_logprobs(logp, top_p, generator)
    else:
        token = scores.argmax(-1)
    return token, logp.gather(1, token[:, None]).squeeze(1)
