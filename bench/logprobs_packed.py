"""Packed + chunked log-probs (itpo_batch.model.logprobs.token_logprobs) vs the padded full-logits baseline.

Conversations of varied lengths (log-uniform between --min-len and --max-len tokens, random token ids,
1-8 assistant turns) are scored by the same model in the same process, under ``torch.no_grad()``:
  * padded:  micro-batches of --rows conversations in input order (no length sorting), right-padded,
             full ``[B, L, vocab]`` logits + log_softmax (``padded_token_logprobs``);
  * packed:  greedy buffers of at most --max-tokens tokens, backbone once per buffer, lm_head + log-softmax
             in chunks of --chunk rows (``token_logprobs``), targets "all" (same work as padded) and
             "assistant" (only the rows the PRM / policy loss need).
Throughput counts real (non-padding) tokens; ratios from median times, and from best times (robust to
other load on the machine). ``logits_mib`` is the largest logits tensor each path holds
at once (float32). Prints one JSON object. Example: python bench/logprobs_packed.py --convs 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from itpo_batch.model.loading import load_model
from itpo_batch.model.logprobs import padded_token_logprobs, token_logprobs
from itpo_batch.model.packing import pack, pad
from itpo_batch.model.render import RenderedConversation, turn_ids_from_mask


def make_convs(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[RenderedConversation]:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(min_len), np.log(max_len), size=n)).astype(int)
    convs = []
    for i, length in enumerate(lengths):
        mask = np.zeros(length, dtype=bool)
        k = int(rng.integers(1, 9))
        bounds = np.sort(
            rng.choice(np.arange(1, length + 1), size=min(2 * k, length - length % 2), replace=False)
        )
        for s, e in bounds.reshape(-1, 2):
            mask[s:e] = True
        ids = rng.integers(8, vocab, size=length, dtype=np.int64)
        turns = turn_ids_from_mask(mask)
        convs.append(RenderedConversation(i, ids, mask, turns, int(turns.max()) + 1))
    return convs


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) seconds over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--convs", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=1536)
    ap.add_argument("--rows", type=int, default=8, help="conversations per padded micro-batch")
    ap.add_argument("--max-tokens", type=int, default=1024, help="tokens per packed buffer")
    ap.add_argument("--chunk", type=int, default=1024, help="lm_head rows per chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is robust to other load)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, role="reference")
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    convs = make_convs(args.convs, args.min_len, args.max_len, vocab, args.seed)
    n_tokens = sum(len(c) for c in convs)
    micro = [convs[i : i + args.rows] for i in range(0, len(convs), args.rows)]
    padded_inputs = [pad(m, 0)[:2] for m in micro]
    buffers = [b.to(device) for b in pack(convs, args.max_tokens)]
    padded_cells = sum(int(ids.numel()) for ids, _ in padded_inputs)

    def run_padded() -> None:
        for ids, attn in padded_inputs:
            padded_token_logprobs(model, ids, attn)

    def run_packed(targets: str) -> Callable[[], None]:
        def run() -> None:
            for b in buffers:
                token_logprobs(model, b, args.chunk, targets=targets)  # type: ignore[arg-type]

        return run

    with torch.no_grad():
        padded_s = best_of(run_padded, args.repeats)
        packed_s = best_of(run_packed("all"), args.repeats)
        asst_s = best_of(run_packed("assistant"), args.repeats)
    biggest_padded = max(int(ids.numel()) for ids, _ in padded_inputs)
    report = {
        "bench": "logprobs_packed",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model_params": sum(p.numel() for p in model.parameters()),
        "vocab": vocab,
        "conversations": len(convs),
        "tokens": n_tokens,
        "padded_cells": padded_cells,
        "padding_fraction": round(1 - n_tokens / padded_cells, 3),
        "packed_buffers": len(buffers),
        "padded_tokens_per_s": round(n_tokens / padded_s[0]),
        "packed_tokens_per_s": round(n_tokens / packed_s[0]),
        "packed_assistant_only_tokens_per_s": round(n_tokens / asst_s[0]),
        "speedup_packed_vs_padded": round(padded_s[0] / packed_s[0], 2),
        "speedup_packed_assistant_vs_padded": round(padded_s[0] / asst_s[0], 2),
        "speedup_packed_vs_padded_best_times": round(padded_s[1] / packed_s[1], 2),
        "speedup_packed_assistant_vs_padded_best_times": round(padded_s[1] / asst_s[1], 2),
        "seconds_median_min": {"padded": padded_s, "packed": packed_s, "packed_assistant": asst_s},
        "logits_mib": {
            "padded": round(biggest_padded * vocab * 4 / 2**20, 1),
            "packed": round(min(args.chunk, max(b.n_tokens for b in buffers)) * vocab * 4 / 2**20, 1),
        },
        "args": vars(args),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
