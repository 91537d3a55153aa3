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
at once (float32).

Then the code paths of a packed forward (``varlen_vs_dense``), per buffer size (--buffer-sizes, default
512/1024/2048), on --varlen-convs conversations of --varlen-min-len..--varlen-max-len tokens (the lengths of
the experiment's conversations), all through ``token_logprobs`` with targets "assistant": ``old`` =
transformers' dense block-diagonal ``[T, T]`` mask and autograd through the lm_head chunks (the code before
issue 14), ``varlen`` = the length-bucketed causal kernels of ``itpo_batch.model.attention`` only, ``new`` =
varlen + the fused lm_head backward (what runs now). Timed as a forward under ``no_grad`` (``fwd_*``) and as
forward + backward of the summed log-probs (``fb_*``: a policy-update step without the optimiser), all
paths interleaved within each repeat; ratios are old/new seconds (median, and best times).
``max_abs_diff_logp`` compares old and new log-probs. ``--sft-buffer 4096`` adds the SFT step, old
``sft_loss`` (dense mask, full logits) vs the current one (``sft_old_vs_new``). Prints one JSON object.
Example: python bench/logprobs_packed.py --skip-padded
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from itpo_batch.model import logprobs
from itpo_batch.model.attention import dense_mask_path
from itpo_batch.model.loading import load_model
from itpo_batch.model.logprobs import padded_token_logprobs, token_logprobs
from itpo_batch.model.packing import PackedBatch, model_inputs, pack, pad
from itpo_batch.model.render import RenderedConversation, turn_ids_from_mask
from itpo_batch.model.sft import sft_loss


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


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds of each function, one warm-up each, then ``repeats`` rounds taking turns."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def packed_vs_padded(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, object]:
    """Padded full-logits baseline vs packed + chunked log-probs (no_grad, reference model)."""
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
    return {
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
    }


PATHS = {  # name: (dense block-diagonal mask, fused lm_head backward)
    "old": (True, False),  # the code before issue 14
    "varlen": (False, False),  # varlen attention only
    "new": (False, True),  # what token_logprobs does now
}


@contextlib.contextmanager
def code_path(name: str) -> Iterator[None]:
    """Run token_logprobs as path ``name`` of :data:`PATHS`."""
    dense, fused = PATHS[name]
    with contextlib.ExitStack() as stack:
        if dense:
            stack.enter_context(dense_mask_path())
        if not fused:
            stack.enter_context(mock.patch.object(logprobs, "_affine_scale", lambda *a: None))
        yield


def varlen_vs_dense(args: argparse.Namespace, vocab: int) -> dict[str, object]:
    """Old (dense mask) vs varlen attention (and the fused head) per buffer size: tokens/s, ratios."""
    policy = load_model(args.model, role="policy")
    device = next(policy.parameters()).device
    convs = make_convs(args.varlen_convs, args.varlen_min_len, args.varlen_max_len, vocab, args.seed + 1)
    n_tokens = sum(len(c) for c in convs)
    out: dict[str, object] = {"conversations": len(convs), "tokens": n_tokens}
    for size in args.buffer_sizes:
        buffers = [b.to(device) for b in pack(convs, size)]

        def forward(name: str, bufs: list = buffers) -> list[torch.Tensor]:
            with torch.no_grad(), code_path(name):
                return [token_logprobs(policy, b, args.chunk, targets="assistant") for b in bufs]

        def train(name: str, bufs: list = buffers) -> None:
            with code_path(name):
                for b in bufs:
                    token_logprobs(policy, b, args.chunk, targets="assistant").sum().backward()
            policy.zero_grad(set_to_none=True)

        fns = {f"fwd_{n}": functools.partial(forward, n) for n in ("old", "new")}
        fns |= {f"fb_{n}": functools.partial(train, n) for n in PATHS}
        t = interleaved(fns, args.varlen_repeats)
        diff = max(float((a - b).abs().max()) for a, b in zip(forward("old"), forward("new"), strict=True))

        def ratio(old: str, new: str, k: int, t: dict = t) -> float:
            return round(t[old][k] / t[new][k], 2)

        out[str(size)] = {
            "buffers": len(buffers),
            "seqs_per_buffer": round(len(convs) / len(buffers), 1),
            "tokens_per_s": {name: round(n_tokens / v[0]) for name, v in t.items()},
            "speedup_fwd": ratio("fwd_old", "fwd_new", 0),
            "speedup_fwd_bwd": ratio("fb_old", "fb_new", 0),
            "speedup_fwd_bwd_attention_only": ratio("fb_old", "fb_varlen", 0),
            "speedup_fwd_best_times": ratio("fwd_old", "fwd_new", 1),
            "speedup_fwd_bwd_best_times": ratio("fb_old", "fb_new", 1),
            "max_abs_diff_logp": diff,
        }
    return out


def sft_old_vs_new(args: argparse.Namespace, vocab: int) -> dict[str, object]:
    """One SFT pass (loss + backward) over --sft-buffer-token buffers: the previous ``sft_loss`` (dense mask,
    the model's full ``[T, vocab]`` logits, cross-entropy) against the current one (``token_logprobs``)."""
    policy = load_model(args.model, role="policy")
    device = next(policy.parameters()).device
    convs = make_convs(args.varlen_convs, args.varlen_min_len, args.varlen_max_len, vocab, args.seed + 2)
    buffers = [b.to(device) for b in pack(convs, args.sft_buffer)]

    def old_loss(b: PackedBatch) -> torch.Tensor:
        logits = policy(**model_inputs(b, device)).logits[0, :-1].float()
        target = b.assistant_mask[1:] & (b.position_ids[1:] > 0)
        return F.cross_entropy(logits[target], b.input_ids[1:][target])

    def run(new: bool) -> None:
        with contextlib.nullcontext() if new else dense_mask_path():
            for b in buffers:
                (sft_loss(policy, b, device)[0] if new else old_loss(b)).backward()
        policy.zero_grad(set_to_none=True)

    t = interleaved(
        {"old": functools.partial(run, False), "new": functools.partial(run, True)}, args.varlen_repeats
    )
    n_tokens = sum(len(c) for c in convs)
    with torch.no_grad(), dense_mask_path():
        old = [float(old_loss(b)) for b in buffers]
    with torch.no_grad():
        diff = max(abs(a - float(sft_loss(policy, b, device)[0])) for a, b in zip(old, buffers, strict=True))
    return {
        "buffer_tokens": args.sft_buffer,
        "buffers": len(buffers),
        "tokens": n_tokens,
        "tokens_per_s": {name: round(n_tokens / v[0]) for name, v in t.items()},
        "speedup": round(t["old"][0] / t["new"][0], 2),
        "speedup_best_times": round(t["old"][1] / t["new"][1], 2),
        "max_abs_loss_diff": diff,
    }


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
    ap.add_argument("--buffer-sizes", type=int, nargs="+", default=[512, 1024, 2048], help="varlen vs dense")
    ap.add_argument("--varlen-convs", type=int, default=24, help="conversations for varlen vs dense")
    ap.add_argument("--varlen-min-len", type=int, default=64)
    ap.add_argument("--varlen-max-len", type=int, default=512)
    ap.add_argument("--varlen-repeats", type=int, default=3)
    ap.add_argument("--skip-padded", action="store_true", help="only the varlen vs dense comparison")
    ap.add_argument(
        "--sft-buffer", type=int, default=0, help="also time SFT steps on buffers this size (4096)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, role="reference")
    vocab = int(model.config.vocab_size)
    report: dict[str, object] = {
        "bench": "logprobs_packed",
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "model_params": sum(p.numel() for p in model.parameters()),
        "vocab": vocab,
    }
    if not args.skip_padded:
        report["packed_vs_padded"] = packed_vs_padded(args, model)
    report["varlen_vs_dense"] = varlen_vs_dense(args, vocab)
    if args.sft_buffer:
        report["sft_old_vs_new"] = sft_old_vs_new(args, vocab)
    report["args"] = vars(args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
