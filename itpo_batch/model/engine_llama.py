"""A lean forward for Llama-family models (Llama, SmolLM2, Qwen2, Mistral without a window) over a SlotCache.

:class:`LlamaForward` computes what ``LlamaForCausalLM.forward`` computes, in the same operation order and
dtypes, from the model's own weights and modules, but without the per-forward machinery of transformers
(module hooks, output records, mask construction, cache bookkeeping) and with the query/key/value and the
gate/up projections each fused into one matmul. On the tiny model it makes a decode step about a fifth
cheaper than :class:`~itpo_batch.model.engine_support.Forward` (which calls the model itself).

Design decisions:

- **Which models**: :func:`llama_layout` checks the module layout (``model.embed_tokens``, ``layers[i]``
  with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` and ``act_fn``, RMS norms with
  ``variance_epsilon``, ``model.norm``, ``model.rotary_emb``, ``lm_head``) and rejects what it does not
  compute (query/key norms, sliding windows, logit soft-capping or scaling, embedding multipliers, forward
  hooks on the modules whose work it does itself: norms, fused projections, layers). The
  engine then runs the same numerical probe as for the generic forward
  (:func:`~itpo_batch.model.engine_support.probe`) and falls back to the generic forward when it fails,
  so an unforeseen architectural detail costs speed, never correctness (:func:`forward_for` chooses).
- **Same numerics as transformers**: RMS norm in float32 cast back before the weight, RoPE cos/sin from
  the model's own rotary module (so every RoPE scaling variant is the model's), GQA as transformers'
  sdpa path does it (query packing for one token, repeated keys/values otherwise), residual adds in the
  model dtype. Fusing matmuls does not change any output element's dot product.
- **Fused weights are copies**, rebuilt when the weights change (the engine drops its forward whenever
  the parameters' version counters move).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from itpo_batch.model.engine_support import Forward, probe, static_reason
from itpo_batch.model.kvcache import SlotCache, attention_mask

_UNSUPPORTED_CONFIG = (
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "logit_scale",
    "embedding_multiplier",
)


def llama_layout(model: torch.nn.Module) -> str | None:
    """Why :class:`LlamaForward` cannot compute ``model`` (None: the layout is one it computes)."""
    body = getattr(model, "model", None)
    if body is None or not hasattr(model, "lm_head"):
        return "no model.model / lm_head"
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(body, n) for n in needed):
        return "not a Llama-style body"
    cfg = model.config
    if any(getattr(cfg, n, None) not in (None, 1.0, 0.0) for n in _UNSUPPORTED_CONFIG):
        return "logit or embedding scaling"
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None):
            return "attention other than Llama's"
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(p) is torch.nn.Linear for p in projections) or not hasattr(mlp, "act_fn"):
            return "projections other than Llama's"
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if any(n is None or not hasattr(n, "variance_epsilon") for n in norms):
            return "norms other than RMSNorm"
        if len(list(layer.children())) != 4:
            return "extra sub-modules in a decoder layer"
        bypassed = [layer, attn, mlp, *projections, *norms]
        if any(m._forward_hooks or m._forward_pre_hooks for m in bypassed):  # type: ignore[union-attr]
            return "forward hooks on modules this forward does not call"
    if (
        body._forward_hooks
        or body._forward_pre_hooks
        or body.norm._forward_hooks
        or body.norm._forward_pre_hooks
    ):
        return "forward hooks on modules this forward does not call"
    return None


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([lin.weight for lin in linears]).detach()
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat(
        [
            b if b is not None else weight.new_zeros(lin.out_features)
            for b, lin in zip(biases, linears, strict=True)
        ]
    ).detach()


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' RMSNorm: float32 statistics, cast back, then the weight (one fused kernel in float32,
    which gives the same bits as transformers' four operations)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaForward(Forward):
    """:class:`Forward` computed layer by layer from the weights (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache: SlotCache):
        super().__init__(model, cache)
        body = model.model
        self.body, self.lm_head = body, model.lm_head
        first = body.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = first.q_proj.out_features // self.head_dim
        self.kv_heads = first.k_proj.out_features // self.head_dim
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append((layer, qkv, gate_up))

    def __call__(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        lo: int,
        write_pos: torch.Tensor,
        kv_len: int,
        blocks: list[tuple[int, int, int]] | None = None,
    ) -> torch.Tensor:
        b, q = ids.shape
        self.cache.plan(lo, lo + b, write_pos, kv_len)
        mask = attention_mask(pos, kv_len, None)
        x = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(x, position_ids=pos.clamp_min(0))
        cos, sin = cos[:, None], sin[:, None]
        h_q, h_kv, d = self.heads, self.kv_heads, self.head_dim
        rep = h_q // h_kv
        for i, (layer, qkv_w, gate_up_w) in enumerate(self.layers):
            attn = layer.self_attn
            qkv = (
                F.linear(_rms(x, layer.input_layernorm), *qkv_w).view(b, q, h_q + 2 * h_kv, d).transpose(1, 2)
            )
            qk = qkv[:, : h_q + h_kv]
            qk = qk * cos + _rotate_half(qk) * sin
            keys, values = self.cache.layers[i].update(qk[:, h_q:], qkv[:, h_q + h_kv :])
            query, layer_mask = qk[:, :h_q], mask
            if rep > 1 and q == 1:  # transformers' sdpa path: pack the query heads of each key head
                query = query.reshape(b, h_kv, rep, d)
            elif rep > 1:
                keys = keys[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, h_q, kv_len, d)
                values = values[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, h_q, kv_len, d)
            if blocks is None:
                out = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=layer_mask, scale=attn.scaling
                )
            else:  # each block of rows reads only the columns its longest row needs
                parts = [
                    F.scaled_dot_product_attention(
                        query[s:e],
                        keys[s:e, :, :k],
                        values[s:e, :, :k],
                        attn_mask=layer_mask[s:e, ..., :k],
                        scale=attn.scaling,
                    )
                    for s, e, k in blocks
                ]
                out = torch.cat(parts)
            out = out.reshape(b, h_q, q, d).transpose(1, 2).reshape(b, q, h_q * d)
            x = x + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
            gate, up = F.linear(_rms(x, layer.post_attention_layernorm), *gate_up_w).chunk(2, dim=-1)
            down = layer.mlp.down_proj
            x = x + F.linear(layer.mlp.act_fn(gate) * up, down.weight, down.bias)
        return self.lm_head(_rms(x[:, -1], self.body.norm))


_FORWARDS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[type[Forward] | None, str | None]] = (
    weakref.WeakKeyDictionary()
)


def forward_for(model: torch.nn.Module) -> tuple[type[Forward] | None, str | None]:
    """``(forward class, None)`` the engine drives ``model`` with, or ``(None, why not)``; cached per model.

    :class:`~itpo_batch.model.engine_llama.LlamaForward` when the layout fits and the probe agrees, else
    the generic :class:`~itpo_batch.model.engine_support.Forward` when the probe agrees, else none (the
    caller falls back to ``model.generate``)."""
    if model in _FORWARDS:
        return _FORWARDS[model]
    reason = static_reason(model)
    verdict: tuple[type[Forward] | None, str | None] = (None, reason)
    if reason is None:
        candidates = ([LlamaForward] if llama_layout(model) is None else []) + [Forward]
        for cls in candidates:
            reason = probe(model, cls)
            if reason is None:
                verdict = (cls, None)
                break
            verdict = (None, reason)
    _FORWARDS[model] = verdict
    return verdict
