"""Packed-scoring throughput and MFU of a model built from a config (random weights, nothing downloaded).

``--config qwen0.5b`` is Qwen2-0.5B's shape (hidden 896, 24 layers, 14 query / 2 key-value heads, SwiGLU
4864, vocabulary 151,936, tied embeddings; 494M parameters); ``--config tiny`` a 4-layer Qwen2 of the same
layout (GQA, qkv biases) small enough for a CPU. Weights are random and the token ids are random integers
below the vocabulary size: a throughput test needs no tokenizer and no trained weights.

Conversations of log-uniform lengths (``--min-len``..``--max-len``) are packed greedily into buffers of at
most ``--buffer-tokens`` tokens (:func:`itpo_batch.model.packing.pack`, the pipeline's packing) and run
through the pipeline's own code paths, timed after one warm-up, median over ``--repeats``:

* ``score``: :func:`~itpo_batch.model.logprobs.token_logprobs` (``targets="all"``) under ``no_grad``: one
  padding-free forward per buffer, the vocabulary projection in chunks (what the reference, PRM and KL
  forwards of ``score``/``iterate`` do);
* ``train``: the same with gradients, ``backward`` of the summed log-probs and one AdamW step per buffer (a
  PRM-fit / policy-update step; float32 master weights);
* ``score_buckets`` (CUDA only): ``score`` with ``ITPO_VARLEN_BACKEND=buckets``, i.e. the length-bucketed
  SDPA path instead of the flash varlen kernel (:mod:`itpo_batch.model.attention`);
* ``padded_score`` (the naive baseline, skip with ``--skip-padded``): the same conversations right-padded
  in input order, ``--rows`` per batch, full ``[B, L, vocab]`` logits and ``log_softmax``
  (:func:`~itpo_batch.model.logprobs.padded_token_logprobs`). ``speedup_packed_vs_padded`` is the ratio
  of real-token throughputs (padding is not counted as work).

**FLOPs (model FLOPs, the MFU convention; recomputation is not counted).** Per buffer, forward:
``2 · N_mm · T  +  2 · H · V · R  +  2 · L · d_attn · Σ n_i²``, where ``N_mm`` is the weights of the decoder
layers' linear layers (q/k/v/o, gate/up/down), ``T`` the buffer's tokens, ``H·V`` the lm_head applied to
the ``R`` rows whose log-prob is computed (every token but each sequence's first), ``L`` layers,
``d_attn = heads · head_dim`` and ``n_i`` the sequence lengths (causal: QKᵀ and AV are
``2 · 2 · n² · d_attn`` each, halved). So about ``2N`` per token plus the attention term; a training step
counts 3× the forward (``6N`` per token plus 3× the attention term), the AdamW update not counted.
``MFU = model FLOPs / seconds / peak``, with the dense bf16 peak of the detected GPU (H100 SXM / H200:
989 TFLOPS; ``--peak-tflops`` overrides; ``null`` where no peak is known, e.g. on a CPU). On CUDA the
compute is bf16 (autocast, as in every stage) whatever ``--dtype`` (the weights' dtype) says.

Prints one JSON object. Examples::

    python bench/packed_throughput.py --config tiny --device cpu            # a few seconds
    python bench/packed_throughput.py --config qwen0.5b --device cuda       # the GPU check's figure
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from itpo_batch.model.attention import BACKEND_ENV, varlen_backend
from itpo_batch.model.logprobs import padded_token_logprobs, token_logprobs
from itpo_batch.model.packing import PackedBatch, pack, pad
from itpo_batch.model.render import RenderedConversation, turn_ids_from_mask

CONFIGS: dict[str, dict[str, int]] = {
    "qwen0.5b": {  # Qwen/Qwen2-0.5B config.json
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
    },
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 384,
        "vocab_size": 4096,
        "max_position_embeddings": 4096,
    },
}
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (  # dense, no sparsity; first match of the device name wins
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> Qwen2ForCausalLM:
    """A random-weight Qwen2 causal LM of the named shape, built directly on ``device``."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        **CONFIGS[name],
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def make_convs(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[RenderedConversation]:
    """``n`` random-id conversations of log-uniform lengths; every other token is an assistant token."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(min_len), np.log(max_len), size=n)).astype(int)
    convs = []
    for i, length in enumerate(lengths):
        mask = np.arange(length) % 2 == 1
        turns = turn_ids_from_mask(mask)
        ids = rng.integers(8, vocab, size=length, dtype=np.int64)
        convs.append(RenderedConversation(i, ids, mask, turns, int(turns.max()) + 1))
    return convs


def matmul_params(model: Qwen2ForCausalLM) -> int:
    """Weights of the decoder layers' linear layers (the ``N`` of ``2N`` per token; lm_head counted apart)."""
    return sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))


def forward_flops(model: Qwen2ForCausalLM, buffers: list[PackedBatch]) -> dict[str, float]:
    """Model FLOPs of one forward over ``buffers`` (module docstring), split into their three terms."""
    cfg = model.config
    d_attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    tokens = sum(b.n_tokens for b in buffers)
    rows = sum(b.n_tokens - b.n_seqs for b in buffers)
    sq = sum(float(((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double() ** 2).sum()) for b in buffers)
    terms = {
        "linear": 2.0 * matmul_params(model) * tokens,
        "lm_head": 2.0 * cfg.hidden_size * cfg.vocab_size * rows,
        "attention": 2.0 * cfg.num_hidden_layers * d_attn * sq,
    }
    return {**terms, "total": sum(terms.values())}


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(assumed dense bf16 peak in TFLOPS, where it comes from)."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak assumed off CUDA"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"dense bf16 peak of {key} (vendor datasheet), detected {name!r}"
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> dict[str, Any]:
    """Median and min seconds over ``repeats`` calls after one warm-up, and the peak GPU memory of them."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds_median": statistics.median(times), "seconds_min": min(times), "peak_gpu_mem_gib": peak}


def rates(t: dict[str, Any], tokens: int, flops: float, peak: float | None) -> dict[str, Any]:
    """Tokens/s, achieved TFLOPS and MFU (from the median time) added to a :func:`timed` result."""
    seconds = t["seconds_median"]
    tflops = flops / seconds / 1e12
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "model_tflops": round(tflops, 3),
        "mfu": round(tflops / peak, 4) if peak else None,
        "seconds_median": round(seconds, 4),
        "seconds_min": round(t["seconds_min"], 4),
        "peak_gpu_mem_gib": None if t["peak_gpu_mem_gib"] is None else round(t["peak_gpu_mem_gib"], 2),
    }


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Set ``ITPO_VARLEN_BACKEND`` for the block (read at each attention call)."""
    before = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = before


def attention_backend(device: torch.device) -> str:
    """The varlen backend a packed forward gets on ``device`` (under the autocast every stage uses)."""
    probe = torch.zeros(1, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return varlen_backend(probe)


def run(args: argparse.Namespace) -> dict[str, Any]:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    model = build_model(args.config, device, dtype, args.seed)
    vocab = int(model.config.vocab_size)
    convs = make_convs(args.convs, args.min_len, args.max_len, vocab, args.seed)
    buffers = [b.to(device) for b in pack(convs, args.buffer_tokens)]
    tokens = sum(b.n_tokens for b in buffers)
    flops = forward_flops(model, buffers)
    peak, peak_source = peak_tflops(device, args.peak_tflops)

    def score() -> None:
        with torch.no_grad():
            for b in buffers:
                token_logprobs(model, b, args.chunk, targets="all")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

    def train() -> None:
        model.train()
        for b in buffers:
            token_logprobs(model, b, args.chunk, targets="all").sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    model.eval()
    out: dict[str, Any] = {
        "bench": "packed_throughput",
        "config": args.config,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if gpu else platform.machine(),
        "torch": torch.__version__,
        "weights_dtype": str(dtype).removeprefix("torch."),
        "compute_dtype": "bfloat16 (autocast)" if gpu else str(dtype).removeprefix("torch."),
        "attention_backend": attention_backend(device),
        "model": {
            "params_total": sum(p.numel() for p in model.parameters()),
            "params_matmul_layers": matmul_params(model),
            **{k: int(v) for k, v in CONFIGS[args.config].items()},
        },
        "data": {
            "conversations": len(convs),
            "tokens": tokens,
            "buffers": len(buffers),
            "buffer_tokens": args.buffer_tokens,
            "mean_length": round(tokens / len(convs), 1),
            "length_range": [args.min_len, args.max_len],
        },
        "flops_formula": (
            "forward = 2*N_mm*T + 2*H*V*R + 2*L*d_attn*sum(n_i^2) (causal); train = 3*forward; "
            "N_mm = decoder linear weights, R = rows projected to the vocabulary; model FLOPs, no recompute"
        ),
        "forward_flops": {k: float(f"{v:.4g}") for k, v in flops.items()},
        "peak_tflops_assumed": peak,
        "peak_source": peak_source,
    }
    out["score"] = rates(timed(score, args.repeats, device), tokens, flops["total"], peak)
    if gpu and out["attention_backend"] == "flash":
        with backend("buckets"):
            out["score_buckets"] = rates(timed(score, args.repeats, device), tokens, flops["total"], peak)
        out["speedup_flash_vs_buckets"] = round(
            out["score"]["tokens_per_s"] / out["score_buckets"]["tokens_per_s"], 2
        )
    if not args.skip_train:
        out["train"] = rates(timed(train, args.repeats, device), tokens, 3 * flops["total"], peak)
    if not args.skip_padded:
        micro = [convs[i : i + args.rows] for i in range(0, len(convs), args.rows)]
        padded = [tuple(t.to(device) for t in pad(m, 0)[:2]) for m in micro]

        def score_padded() -> None:
            with torch.no_grad():
                for ids, attn in padded:
                    padded_token_logprobs(model, ids, attn)

        model.eval()
        out["padded_score"] = rates(timed(score_padded, args.repeats, device), tokens, flops["total"], peak)
        cells = sum(int(ids.numel()) for ids, _ in padded)
        out["padded_score"]["padding_fraction"] = round(1 - tokens / cells, 3)
        out["speedup_packed_vs_padded"] = round(
            out["score"]["tokens_per_s"] / out["padded_score"]["tokens_per_s"], 2
        )
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype")
    p.add_argument("--convs", type=int, default=None, help="conversations (default: 256 qwen0.5b, 48 tiny)")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=None, help="default: 2048 qwen0.5b, 512 tiny")
    p.add_argument("--buffer-tokens", type=int, default=None, help="default: 16384 qwen0.5b, 2048 tiny")
    p.add_argument("--chunk", type=int, default=1024, help="rows per vocabulary-projection chunk")
    p.add_argument("--rows", type=int, default=8, help="conversations per padded batch (baseline)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the assumed dense bf16 peak")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-padded", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    big = args.config == "qwen0.5b"
    args.convs = args.convs or (256 if big else 48)
    args.max_len = args.max_len or (2048 if big else 512)
    args.buffer_tokens = args.buffer_tokens or (16384 if big else 2048)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
