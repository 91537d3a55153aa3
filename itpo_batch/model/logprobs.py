"""Per-token log-probabilities (and entropies) of any Hugging Face causal LM over packed batches.

**Alignment convention (used everywhere downstream).** For a sequence ``x_0 … x_{n-1}`` the output at
position ``t`` is ``log π(x_t | x_{<t})``: the log-probability *of the token that sits at t*, read from the
logits the model produced at ``t-1``. So values live on the same positions as ``input_ids``,
``assistant_mask`` and ``turn_id``, and "the log-prob of assistant turn k" is simply a masked sum over the
tokens with ``turn_id == k``. Position 0 of every sequence (``position_ids == 0``) has no prediction and
holds **0**; in a packed buffer the logits at a sequence's last token (which would predict the next
sequence's first token) are never used. Entropy follows the same alignment: position ``t`` holds
``H(π(· | x_{<t}))``, the entropy of the distribution that ``x_t`` was drawn from.

Design decisions:

- **Hidden states once, vocabulary projection in chunks.** :func:`token_logprobs` runs the model once on
  the packed ``[1, T]`` buffer via :func:`~itpo_batch.model.packing.model_inputs` (no mask, no cache: the only
  block-diagonal way) with ``logits_to_keep=1`` and captures the backbone's ``last_hidden_state``
  (``model.base_model``, e.g. ``LlamaForCausalLM.model``) with a forward hook. Calling the model itself,
  rather than ``model.model``, keeps DDP/accelerate wrappers in the loop. It then gathers the hidden states
  that predict the wanted targets and applies ``lm_head`` ``chunk_size`` rows at a time, so the
  ``[T, vocab]`` logits never exist at once (the memory hot spot, docs/method.md §1.6). Each chunk is
  cast to float32 before ``logsumexp`` (bf16 keeps ~3 significant digits, too few for the small
  log-ratios of two nearly equal models). The chunks run *after* the model's forward, so under FSDP the
  ``lm_head`` weight must still be usable then; this is untested here (DDP-style wrappers are tested).
- **Gradients.** Only a chunk's hidden rows are saved; its logits are recomputed in backward, so peak
  memory stays at one chunk's ``[chunk, vocab]`` in the backward pass too (one extra ``lm_head`` matmul per
  chunk). Off CUDA, with a bias-free linear head and an affine logit transform (temperature, Granite/Cohere
  scaling; not softcapping), a chunk is one :class:`_FusedHead` whose backward is written out
  (``∂ log p_y/∂x = 1_y − p``, ``∂H/∂x = −p (log p + H)``): 1.5-2x faster than autograd through
  ``logsumexp``/``gather`` on a 1024 × 4096 chunk, about 5 % of a whole update step on the tiny model
  (``fb_varlen`` vs ``fb_new`` in ``bench/logprobs_packed.py``). Otherwise (CUDA
  under bf16 autocast, softcapping, other heads) each chunk runs inside ``torch.utils.checkpoint``
  (non-reentrant). Under ``torch.no_grad()`` neither saves anything.
- **Only the needed rows.** ``targets="assistant"`` projects only the hidden states that predict assistant
  tokens (typically a third to a half of a conversation), which is all the PRM, the KL and the policy loss
  need. Other positions are 0 in the output.
- **bf16 on CUDA.** The whole computation runs under ``torch.autocast("cuda", dtype=torch.bfloat16)`` when
  the model is on CUDA (float32 master weights, as in the official PRM, compute in bf16); CPU runs as is.
- **Logit transforms.** ``logits / temperature`` (sampling temperature of the behaviour policy), plus the
  model-specific post-``lm_head`` transforms that transformers applies for some families:
  ``final_logit_softcapping`` (Gemma 2/3), ``logits_scaling`` (Granite) and ``logit_scale`` (Cohere). Any
  other custom head would need adding here; the padded baseline (which uses the model's own logits) is the
  check.
- **Attention without the dense mask.** The forward runs inside
  :func:`~itpo_batch.model.attention.packed_attention`: with ``sdpa``/``eager`` attention, sequences are
  attended in length buckets by fused causal kernels, so the attention work is about Σ n_i², not the T² of
  the dense block-diagonal mask transformers would build (:mod:`itpo_batch.model.attention`);
  flash-attention on GPU keeps its own varlen kernels.
- **Naive baseline.** :func:`padded_token_logprobs` runs a right-padded ``[B, L]`` forward, materialises
  the full ``[B, L, vocab]`` logits and takes ``log_softmax``: same alignment, used by the tests and
  ``bench/logprobs_packed.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from itpo_batch.model.attention import packed_attention
from itpo_batch.model.packing import PackedBatch, model_inputs

Targets = Literal["all", "assistant"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/accelerate-style wrappers (``.module`` chains)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    return model


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, lm_head) of a transformers causal LM, wrappers removed; ``TypeError`` for anything else."""
    model = unwrap(model)
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if base is None or base is model or head is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a separate backbone and lm_head")
    return base, head


def final_hidden_states(model: nn.Module, batch: PackedBatch, device: torch.device) -> torch.Tensor:
    """Backbone output ``[T, H]`` of a packed buffer, obtained by calling ``model`` itself.

    The call goes through the (possibly wrapped) causal LM with ``logits_to_keep=1``, so a DDP/accelerate
    wrapper sees a normal forward and only one row of logits is computed; a forward hook on the backbone
    captures its ``last_hidden_state`` (with its autograd graph).
    """
    base, _ = split_causal_lm(model)
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, _args: object, output: object) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])  # type: ignore[index]

    handle = base.register_forward_hook(grab)
    try:
        with packed_attention(model, batch.cu_seqlens, device):
            model(**model_inputs(batch, device), logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1][0]


def _logit_transform(model: nn.Module, temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Post-``lm_head`` transform of float32 logits: family-specific scaling, then ``/ temperature``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    divide = float(getattr(config, "logits_scaling", None) or 1.0)
    scale = getattr(model, "logit_scale", None)
    multiply = float(scale) if isinstance(scale, int | float) else 1.0

    def transform(logits: torch.Tensor) -> torch.Tensor:
        logits = logits * (multiply / divide) if (multiply != 1.0 or divide != 1.0) else logits
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits / temperature if temperature != 1.0 else logits

    return transform


def _affine_scale(
    model: nn.Module, head: nn.Module, temperature: float, device: torch.device
) -> float | None:
    """``s`` when the post-head transform is ``logits · s`` and :class:`_FusedHead` applies, else ``None``."""
    config = getattr(model, "config", None)
    if device.type == "cuda" or getattr(config, "final_logit_softcapping", None):
        return None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.dtype != torch.float32:
        return None
    scale = getattr(model, "logit_scale", None)
    multiply = float(scale) if isinstance(scale, int | float) else 1.0
    return multiply / float(getattr(config, "logits_scaling", None) or 1.0) / temperature


class _FusedHead(torch.autograd.Function):
    """(log-prob of ``target_ids``, entropy or empty) of ``s · hidden @ weight.T`` with a hand-written backward.

    Saves the hidden rows and the per-row ``log Z`` and ``H``; backward recomputes the ``[c, V]`` logits
    once and turns them into the gradient in place.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target_ids, scale: float, with_entropy: bool):  # type: ignore[override]
        z = torch.mm(hidden, weight.t())
        if scale != 1.0:
            z.mul_(scale)
        log_z = torch.logsumexp(z, dim=-1)
        logp = z.gather(1, target_ids[:, None]).squeeze(1) - log_z
        entropy = logp.new_empty(0)
        if with_entropy:
            z.sub_(log_z[:, None])  # log-probs
            entropy = -torch.exp(z).mul_(z).sum(-1)
        ctx.save_for_backward(hidden, weight, target_ids, log_z, entropy)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):  # type: ignore[override]
        hidden, weight, target_ids, log_z, entropy = ctx.saved_tensors
        if g_logp is None and (g_entropy is None or entropy.numel() == 0):
            return None, None, None, None, None
        z = torch.mm(hidden, weight.t())
        if ctx.scale != 1.0:
            z.mul_(ctx.scale)
        z.sub_(log_z[:, None])  # log p
        p = torch.exp(z)
        if g_entropy is not None and entropy.numel():  # −g_H p (log p + H) − g_y p
            grad = z.add_(entropy[:, None]).mul_(-g_entropy[:, None])
            grad = (grad.sub_(g_logp[:, None]) if g_logp is not None else grad).mul_(p)
        else:
            grad = p.mul_(-g_logp[:, None])
        if g_logp is not None:
            grad.scatter_add_(1, target_ids[:, None], g_logp[:, None])  # + g_y at the target
        if ctx.scale != 1.0:
            grad.mul_(ctx.scale)
        g_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        g_weight = grad.t() @ hidden if ctx.needs_input_grad[1] else None
        return g_hidden, g_weight, None, None, None


def _chunk_stats(
    hidden: torch.Tensor,
    target_ids: torch.Tensor,
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor],
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``target_ids`` ``[c]`` (and entropy ``[c]``, else empty) from hidden rows ``[c, H]``."""
    logits = transform(head(hidden).float())  # [c, V] float32
    log_z = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, target_ids[:, None]).squeeze(-1) - log_z
    if not with_entropy:
        return logp, logp.new_empty(0)
    probs = torch.exp(logits - log_z[:, None])
    return logp, log_z - (probs * logits).sum(-1)


def target_positions(batch: PackedBatch, targets: Targets = "all") -> torch.Tensor:
    """Positions ``t`` (int64 ``[N]``) that get a prediction: not a sequence start, and assistant if asked."""
    keep = batch.position_ids > 0
    if targets == "assistant":
        keep &= batch.assistant_mask
    elif targets != "all":
        raise ValueError(f"targets must be 'all' or 'assistant', not {targets!r}")
    return keep.nonzero().squeeze(-1)


def _packed_stats(
    model: nn.Module,
    batch: PackedBatch,
    chunk_size: int,
    temperature: float,
    targets: Targets,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    _, head = split_causal_lm(model)
    transform = _logit_transform(unwrap(model), temperature)
    device = head.weight.device
    pos = target_positions(batch, targets).to(device)
    ids = batch.input_ids.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = final_hidden_states(model, batch, device)  # [T, H]
        source = hidden.index_select(0, pos - 1)  # rows predicting the targets, [N, H]
        target_ids = ids.index_select(0, pos)
        use_ckpt = torch.is_grad_enabled() and source.requires_grad
        scale = _affine_scale(unwrap(model), head, temperature, device)
        parts = []
        for start in range(0, int(pos.shape[0]), chunk_size):
            rows, rows_ids = source[start : start + chunk_size], target_ids[start : start + chunk_size]
            args = (rows, rows_ids)
            if scale is not None:
                parts.append(_FusedHead.apply(rows, head.weight, rows_ids, scale, with_entropy))
            elif use_ckpt:
                parts.append(
                    checkpoint(_chunk_stats, *args, head, transform, with_entropy, use_reentrant=False)
                )
            else:
                parts.append(_chunk_stats(*args, head, transform, with_entropy))

    def scatter(k: int) -> torch.Tensor:  # fresh zeros [T], filled in place at the target positions
        out = torch.zeros(batch.n_tokens, dtype=torch.float32, device=device)
        return out.index_copy_(0, pos, torch.cat([p[k] for p in parts])) if parts else out

    return scatter(0), (scatter(1) if with_entropy else None)


def token_logprobs(
    model: nn.Module,
    batch: PackedBatch,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    targets: Targets = "all",
) -> torch.Tensor:
    """``log π(x_t | x_{<t})`` per token of a packed buffer, float32 ``[T]`` on the model's device.

    0 at each sequence's first token, and off the assistant mask when ``targets="assistant"``. Differentiable
    (chunks are checkpointed) when called with grad enabled on a model with trainable parameters.
    """
    return _packed_stats(model, batch, chunk_size, temperature, targets, with_entropy=False)[0]


def token_logprobs_and_entropy(
    model: nn.Module,
    batch: PackedBatch,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    targets: Targets = "all",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs ``[T]``, entropies ``[T]``), both float32 and aligned as in :func:`token_logprobs`."""
    logp, entropy = _packed_stats(model, batch, chunk_size, temperature, targets, with_entropy=True)
    assert entropy is not None
    return logp, entropy


def assistant_values(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``values[T]`` restricted to assistant tokens, in buffer order: ``[N_assistant]``."""
    return values[batch.assistant_mask.to(values.device)]


def assistant_token_logprobs(
    model: nn.Module, batch: PackedBatch, chunk_size: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs of the assistant tokens only, ``[N_assistant]`` (projects only those rows through lm_head)."""
    values = token_logprobs(model, batch, chunk_size, temperature, targets="assistant")
    return assistant_values(values, batch)


def packed_to_padded(
    values: torch.Tensor, batch: PackedBatch, fill: float = 0.0, length: int | None = None
) -> torch.Tensor:
    """Scatter per-token ``values [T]`` of a buffer into ``[n_seqs, length]`` (row = buffer slot).

    Row ``j`` is the sequence ``batch.seq_index[j]`` of the list given to ``pack``; positions past a
    sequence's end get ``fill``. ``length`` defaults to ``batch.max_seqlen``; pass a common width to
    ``torch.cat`` several buffers. Differentiable. This is the layout :mod:`itpo_batch.credit.turns` works on.
    """
    width = batch.max_seqlen if length is None else length
    if width < batch.max_seqlen:
        raise ValueError(f"length {width} is shorter than the buffer's longest sequence ({batch.max_seqlen})")
    seq = batch.seq_id().to(values.device)
    pos = batch.position_ids.to(values.device)
    out = values.new_full((batch.n_seqs, width), fill)
    return out.index_put_((seq, pos), values)  # in place on a fresh tensor: still differentiable


def _padded_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = next(model.parameters()).device
    ids, attn = input_ids.to(device), attention_mask.to(device)
    transform = _logit_transform(unwrap(model), temperature)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    logp_all = torch.log_softmax(transform(logits[:, :-1].float()), dim=-1)  # [B, L-1, V]: columns 1..L-1
    valid = attn[:, 1:].to(logp_all.dtype)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid if with_entropy else None
    pad_first = torch.nn.functional.pad
    return pad_first(logp, (1, 0)), (pad_first(entropy, (1, 0)) if entropy is not None else None)


def padded_token_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Naive baseline: full ``[B, L, vocab]`` logits of a right-padded batch (from ``packing.pad``).

    Returns float32 ``[B, L]`` with the alignment of :func:`token_logprobs`: 0 at column 0 and at padding.
    """
    return _padded_stats(model, input_ids, attention_mask, temperature, with_entropy=False)[0]


def padded_token_logprobs_and_entropy(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies), both float32 ``[B, L]``, from the padded full-logits path."""
    logp, entropy = _padded_stats(model, input_ids, attention_mask, temperature, with_entropy=True)
    assert entropy is not None
    return logp, entropy
