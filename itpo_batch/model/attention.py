"""Variable-length attention for packed buffers on CPU / ``sdpa``, without the dense ``[T, T]`` mask.

With ``sdpa`` or ``eager`` attention, transformers turns a packed ``[1, T]`` buffer (restarting
``position_ids``, no mask) into a dense block-diagonal ``[1, 1, T, T]`` mask, so every layer pays for
attention over the whole buffer (``T²``) and the fused causal kernels cannot be used: on the tiny model the
update ran at 2.1k tok/s with 2,048-token buffers (issue 14). This module gives those models a
variable-length path whose attention work is ``Σ n_i²`` (about half of it, causal) instead of ``T²``.

Design decisions:

- **Length buckets, one fused causal kernel per bucket.** The sequences of a buffer are grouped by length
  into buckets of ``ceil(log2 n)`` (lengths within a factor of 2). A bucket's sequences are gathered
  (``index_select``) into a right-padded ``[n_b, H, L_b, D]`` batch and run through one
  ``scaled_dot_product_attention(..., is_causal=True)``: the fused flash kernel on CPU, no mask tensor at all.
  Right padding is harmless under causal attention (a real query only sees earlier, real keys of its own
  row; padded query rows are dropped), and padded cells read their sequence's first token, so nothing is
  NaN. The outputs of all buckets are concatenated and put back in buffer order by one ``index_select``.
  The number of kernel calls per layer is the number of distinct buckets (at most ``log2(max length) + 1``),
  never one per sequence; padding within a bucket costs at most 4× a sequence's own ``n²``, against the
  dense mask's ``T²``. Measured alternatives (``bench/logprobs_packed.py``, one thread): one kernel call
  per sequence is about as fast but is a Python loop over rows; a single bucket (pad to the longest) loses
  on mixed lengths; ``flex_attention`` has no backward on CPU in torch 2.13, so it cannot train here.
- **Autograd only.** Gathers, SDPA and the final gather are ordinary differentiable ops; no custom backward.
- **Flash varlen on CUDA** (:func:`varlen_backend`). When the query is on a CUDA device of compute capability
  ≥ 8.0, the compute dtype is bf16/fp16 (the autocast dtype inside ``torch.autocast``, as every stage runs on
  CUDA) and dropout is 0, the plan's ``cu_seqlens`` go straight to PyTorch's own FlashAttention-2 varlen
  kernel (``torch.nn.attention.varlen.varlen_attn``, shipped in the CUDA wheels since torch 2.9, forward and
  backward): truly padding-free, no buckets, no gathers, no ``flash-attn`` package to build. Grouped-query
  key/value heads are expanded first (the same ``repeat_interleave`` as the bucket path) rather than relying
  on the kernel's GQA flag: a little memory for one code path fewer. ``ITPO_VARLEN_BACKEND`` overrides the
  choice: ``buckets`` (the default: never flash), ``auto`` (flash wherever it can run) or ``flash`` (raise
  where it cannot run, for tests and the GPU check). *Opt-in until a GPU run confirms it:* no GPU has run
  this code yet, so the default stays the bucket path that the CPU tests cover; ``bench/gpu_check.sh``
  compares both and runs the stages with ``auto``. float32 on CUDA and everything on CPU use the buckets.
- **How transformers is told.** The function is registered in transformers' ``AttentionInterface`` as
  ``itpo_varlen``; :func:`packed_attention` switches ``config._attn_implementation`` to it for the duration of
  one packed forward and back afterwards. No mask function is registered for that name, so transformers'
  ``create_causal_mask`` returns ``None`` and builds nothing. The plan (gather indices, computed once per
  forward from ``cu_seqlens``, not per layer) travels in a :class:`contextvars.ContextVar`, so models whose
  ``forward`` does not pass extra keyword arguments through (e.g. :class:`~itpo_batch.model.loading.ValueModel`)
  work unchanged.
- **Which models switch.** Only ``sdpa`` and ``eager`` (``eager`` then gets SDPA kernels: the same result up to
  float rounding). ``flash_attention_*`` keep their own varlen kernels, which read the restarting
  ``position_ids`` (the GPU path, unchanged); ``flex_attention`` and custom implementations keep theirs.
  Models with a sliding window or attention-logit softcapping, and models with gradient checkpointing on
  (their layers are recomputed in backward, outside the switch), keep the dense-mask path: slower, correct.
- **Fail loudly.** The attention function raises if it is called without a plan or on a buffer of another
  size; after the forward, :func:`packed_attention` raises if no layer used the plan (a model whose
  attention bypasses the interface would otherwise attend across sequences silently, with no mask at all).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface

VARLEN = "itpo_varlen"
SWITCHABLE = ("sdpa", "eager")
BACKEND_ENV = "ITPO_VARLEN_BACKEND"
BACKENDS = ("auto", "buckets", "flash")


@dataclass
class Bucket:
    """Sequences of one length bucket: where to read them and the padded shape they get."""

    index: torch.Tensor  # int64 [n * width], buffer row of each padded cell (row-major over [n, width])
    n: int  # sequences in the bucket
    width: int  # longest of them


@dataclass
class VarlenPlan:
    """How one packed buffer's attention is run: buckets and the way back to buffer order."""

    n_tokens: int  # T
    buckets: list[Bucket]  # empty when the buffer holds one sequence (plain causal attention)
    restore: torch.Tensor  # int64 [T], row of the concatenated padded bucket outputs holding each token
    cu_seqlens: torch.Tensor  # int32 [n+1] on the plan's device (the flash varlen kernel's boundaries)
    max_seqlen: int  # longest sequence
    calls: int = 0  # attention layers that used this plan (checked after the forward)
    flash_calls: int = 0  # of which on the flash varlen kernel


_ACTIVE: contextvars.ContextVar[VarlenPlan | None] = contextvars.ContextVar("itpo_varlen_plan", default=None)
_DENSE: contextvars.ContextVar[bool] = contextvars.ContextVar("itpo_dense_mask", default=False)


def build_plan(cu_seqlens: torch.Tensor, device: torch.device | str | None = None) -> VarlenPlan:
    """The :class:`VarlenPlan` of a buffer cut by ``cu_seqlens [n+1]`` (int, starting at 0), on ``device``."""
    cu = cu_seqlens.to("cpu", torch.int64)
    lengths, starts = cu[1:] - cu[:-1], cu[:-1]
    if lengths.numel() == 0 or bool((lengths <= 0).any()):
        raise ValueError("cu_seqlens must describe at least one sequence, none of them empty")
    n_tokens = int(cu[-1])
    cu32, longest = cu.to(device=device, dtype=torch.int32), int(lengths.max())
    if lengths.numel() == 1:
        return VarlenPlan(n_tokens, [], torch.empty(0, dtype=torch.int64, device=device), cu32, longest)
    bucket = torch.ceil(torch.log2(lengths.double())).long()
    order = torch.argsort(bucket, stable=True)
    counts = torch.unique_consecutive(bucket[order], return_counts=True)[1]
    restore = torch.empty(n_tokens, dtype=torch.int64)
    buckets, offset = [], 0
    for seqs in order.split(counts.tolist()):  # one step per length bucket, not per sequence
        lens, first = lengths[seqs], starts[seqs]
        width = int(lens.max())
        col = torch.arange(width)
        valid = col[None, :] < lens[:, None]
        index = (first[:, None] + torch.where(valid, col[None, :], 0)).reshape(-1)
        cells = valid.reshape(-1).nonzero().squeeze(1)
        restore[index[cells]] = offset + cells
        offset += index.numel()
        buckets.append(Bucket(index.to(device), int(seqs.numel()), width))
    return VarlenPlan(n_tokens, buckets, restore.to(device), cu32, longest)


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[n, H_kv, L, D]`` → ``[n, H_kv · n_rep, L, D]`` (grouped-query attention), a no-op for ``n_rep == 1``."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention within each sequence of the active plan.

    ``query [1, H, T, D]``, ``key``/``value [1, H_kv, T, D]``; returns ``([1, T, H, D], None)`` like ``sdpa``.
    """
    plan = _ACTIVE.get()
    if plan is None:
        raise RuntimeError(f"attention {VARLEN!r} was called outside packed_attention()")
    if query.shape[0] != 1 or query.shape[2] != plan.n_tokens or attention_mask is not None:
        raise RuntimeError(
            f"attention {VARLEN!r} expects one unmasked packed buffer of {plan.n_tokens} tokens, "
            f"got query {tuple(query.shape)} and a mask: {attention_mask is not None}"
        )
    if kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"attention {VARLEN!r} supports plain causal attention only")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise NotImplementedError(f"attention {VARLEN!r} supports causal attention only")
    plan.calls += 1
    n_rep = query.shape[1] // key.shape[1]
    if varlen_backend(query, dropout, scaling) == "flash":
        plan.flash_calls += 1
        return _flash_varlen(query, key, value, plan, n_rep, scaling), None
    if not plan.buckets:  # one sequence: the whole buffer is one causal block
        out = F.scaled_dot_product_attention(
            query,
            _expand_kv(key, n_rep),
            _expand_kv(value, n_rep),
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
        )
        return out.transpose(1, 2), None
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D] views
    parts = []
    for b in plan.buckets:

        def gather(x: torch.Tensor, b: Bucket = b) -> torch.Tensor:
            return x.index_select(0, b.index).view(b.n, b.width, x.shape[1], x.shape[2]).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            gather(q),
            _expand_kv(gather(k), n_rep),
            _expand_kv(gather(v), n_rep),
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
        )  # [n_b, H, width, D]
        parts.append(out.transpose(1, 2).reshape(b.n * b.width, q.shape[1], q.shape[2]))
    return torch.cat(parts).index_select(0, plan.restore)[None], None


@functools.cache
def _varlen_params() -> frozenset[str]:
    """Keyword parameters of ``torch.nn.attention.varlen.varlen_attn`` (empty before torch 2.9: no kernel).

    torch 2.9-2.10 take ``is_causal`` and no ``scale``; later releases take ``scale`` and ``window_size``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _flash_device(index: int) -> bool:
    """Whether CUDA device ``index`` runs PyTorch's flash varlen kernel (built in, compute capability ≥ 8.0)."""
    return (
        bool(_varlen_params())
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(index)[0] >= 8
    )


def _causal_kwargs(scaling: float | None, head_dim: int) -> dict[str, object] | None:
    """``varlen_attn`` keywords for causal attention at ``scaling``; None where this torch cannot express it."""
    params = _varlen_params()
    kwargs: dict[str, object] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal, no window
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        return None
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim**-0.5) > 1e-9 * head_dim**-0.5:
        return None  # the kernel's fixed 1/sqrt(head_dim) would be wrong
    return kwargs


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: the autocast dtype inside ``torch.autocast`` on ``x``'s device."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def varlen_backend(query: torch.Tensor, dropout: float = 0.0, scaling: float | None = None) -> str:
    """``"flash"`` or ``"buckets"`` for a packed attention call on ``query`` (see the module docstring)."""
    choice = os.environ.get(BACKEND_ENV, "buckets").strip().lower() or "buckets"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r}; expected one of {BACKENDS}")
    if choice == "buckets":
        return "buckets"
    why = None
    if query.device.type != "cuda" or not _flash_device(query.device.index or 0):
        why = f"device {query.device} has no flash varlen kernel (needs CUDA, compute capability >= 8.0)"
    elif compute_dtype(query) not in (torch.float16, torch.bfloat16):
        why = f"compute dtype {compute_dtype(query)} (flash needs bf16/fp16: run under torch.autocast)"
    elif dropout:
        why = f"attention dropout {dropout} (the flash varlen kernel has none)"
    elif _causal_kwargs(scaling, query.shape[-1]) is None:
        why = f"this torch's varlen_attn cannot take the attention scale {scaling}"
    if why is not None and choice == "flash":
        raise RuntimeError(f"{BACKEND_ENV}=flash but {why}")
    return "buckets" if why else "flash"


def _flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: VarlenPlan,
    n_rep: int,
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention of every sequence of the buffer in one flash varlen call: ``[1, T, H, D]``."""
    from torch.nn.attention.varlen import varlen_attn

    dtype = compute_dtype(query)
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (query, key, value))  # [T, heads, D]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)  # heads are dim 1 of [T, heads, D] too
    cu = plan.cu_seqlens.to(q.device)
    kwargs = _causal_kwargs(scaling, q.shape[-1]) or {}
    out = varlen_attn(q, k, v, cu, cu, plan.max_seqlen, plan.max_seqlen, **kwargs)
    return out[None]


AttentionInterface.register(VARLEN, varlen_attention_forward)


def _config(model: nn.Module) -> object:
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP/accelerate wrappers
        model = model.module  # type: ignore[assignment]
    return getattr(model, "config", None)


@contextlib.contextmanager
def dense_mask_path() -> Iterator[None]:
    """Inside this block :func:`packed_attention` never switches: transformers' dense-mask path (baselines)."""
    token = _DENSE.set(True)
    try:
        yield
    finally:
        _DENSE.reset(token)


def supports_varlen(model: nn.Module) -> bool:
    """Whether :func:`packed_attention` switches ``model`` to the varlen path (see the module docstring)."""
    config = _config(model)
    if _DENSE.get() or config is None or getattr(config, "_attn_implementation", None) not in SWITCHABLE:
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None):
        return False
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def packed_attention(
    model: nn.Module, cu_seqlens: torch.Tensor, device: torch.device | str
) -> Iterator[bool]:
    """Run the forwards inside on the varlen path if ``model`` supports it; yields whether it does.

    ``cu_seqlens`` are the buffer's boundaries (:class:`~itpo_batch.model.packing.PackedBatch`); the inputs
    stay those of :func:`~itpo_batch.model.packing.model_inputs` (restarting positions, no mask, no cache).
    Not thread-safe for one model object shared by threads (the switch is on its config).
    """
    if not supports_varlen(model):
        yield False
        return
    config = _config(model)
    before = config._attn_implementation  # type: ignore[union-attr]
    plan = build_plan(cu_seqlens, device)
    token = _ACTIVE.set(plan)
    config._attn_implementation = VARLEN  # type: ignore[union-attr]
    try:
        yield True
    finally:
        config._attn_implementation = before  # type: ignore[union-attr]
        _ACTIVE.reset(token)
    if plan.calls == 0:
        raise RuntimeError(
            f"{type(model).__name__} ran no attention layer through transformers' AttentionInterface, so its "
            "packed forward ran without sequence boundaries; this model cannot use the varlen path"
        )
