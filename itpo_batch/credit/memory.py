"""The memory budget of ``score``: what must be resident at its peak, in bytes, from the model config.

``score`` runs its stages in turn, never together (:func:`itpo_batch.credit.score.run_score`):

1. **PRM phase**: π_φ trains (float32 weights, gradients and the two AdamW moments: 16 bytes per
   parameter) beside the frozen π_ref (weights only, inference mode: 4 bytes per parameter), one packed
   buffer of activations at a time, and the vocabulary projection in chunks of ``chunk_size`` rows.
2. **Q phase**: the turn Q-model trains (16 bytes per parameter, activations of one buffer, a scalar head
   instead of logits); π_φ stays resident for the final write (4 bytes per parameter), its optimiser
   state, gradients and π_ref are released first, and so are the PRM's datasets.

The peak is the larger phase plus what lives throughout: the Python runtime with torch, transformers and
polars imported, the validated logs, the dataset's per-token tensors and the scored tables.

Stated factors (each a constant here, so the bench prints the budget next to the measurement):

* **Activations** of a training forward: ``ACT_BYTES`` = 68 bytes per token per hidden unit per layer in
  float32: Korthikanti et al. 2022 (arXiv 2205.05198, eq. 1) count ``34·s·h`` bytes per layer in 16-bit
  for a transformer block with a 4h MLP, without the attention scores (the per-sequence fused kernels of
  :mod:`itpo_batch.model.attention` never form a ``T × T`` matrix), i.e. 17 values per token and unit.
  SwiGLU's 8/3·h MLP keeps three matrices instead of two, about the same count.
* **Logits**: a ``[chunk, vocab]`` float32 chunk lives three times in the fused backward (logits, the
  softmax, its gradient: :mod:`itpo_batch.model.logprobs`).
* **Per token** of the dataset: a rendered conversation keeps ``input_ids`` int64, ``assistant_mask``
  bool and ``turn_id`` int32 (13 B); a packed buffer adds ``position_ids`` (21 B for its copy); the PRM
  keeps the reference log-probs and its cached log-ratios, float32 (8 B per assistant token). The PRM
  dataset (rendered + buffers) lives in the PRM phase, the Q dataset (rendered + one epoch's buffers)
  in the Q phase.
* **Per conversation** and **per turn**: Python object overheads of the rendered conversations and the
  scored tables' rows (``PER_CONVERSATION`` and ``PER_TURN``, sized from ``sys.getsizeof`` of the objects
  and the tables' column widths; the turn text is counted once, with the logs).
* **Runtime**: ``RUNTIME`` = resident size after importing :mod:`itpo_batch.credit.score` (torch 2.13
  CPU, transformers 5, polars, pyarrow): 404 MiB measured on the CI machine. A CUDA context adds its own.

For ``iterate`` (not computed here) the same accounting per round, stages in turn: the PRM phase as above
(π_ref's log-probs come from the logs' cache, so π_ref may not even load), then the policy update:
π_θ training (16 B per parameter) with π_0's log-probs read from the PRM dataset, plus the critic
(another 16 B per parameter) with ``--estimator ppo``, then rollouts (π_θ in inference mode plus its KV
cache). Iterative PPO replaces the PRM phase by the Q phase.
"""

from __future__ import annotations

import ctypes
import gc
import os
from dataclasses import asdict, dataclass

from itpo_batch.credit.prm import PRMConfig
from itpo_batch.credit.qvalue import QConfig
from itpo_batch.data.validate import Logs

ACT_BYTES = 68  # float32 activations per token per hidden unit per layer (see the module docstring)
LOGIT_COPIES = 3  # logits, softmax, gradient of one [chunk, vocab] chunk
TRAIN_BYTES_PER_PARAM = 16  # float32 weights + gradients + AdamW exp_avg + exp_avg_sq
INFER_BYTES_PER_PARAM = 4  # float32 weights
RENDERED_BYTES_PER_TOKEN = 13  # input_ids int64 + assistant_mask bool + turn_id int32
PACKED_BYTES_PER_TOKEN = 21  # the packed copy: the above plus position_ids int64
PRM_BYTES_PER_ASSISTANT_TOKEN = 8  # reference log-probs + cached log-ratios, float32
PER_CONVERSATION = 1024  # a RenderedConversation and its three arrays' headers, ids, labels, per dataset
PER_TURN = 256  # one scored-turns row (about 20 numeric columns) and its Q-model rows
RUNTIME = 404 * 2**20  # interpreter + torch + transformers + polars imported (CPU)


@dataclass(frozen=True)
class ModelShape:
    """What the budget needs of a causal LM: parameter count and the activation-relevant sizes."""

    n_params: int
    hidden: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config: object) -> ModelShape:
        """Sizes of a transformers config; parameters counted on the meta device (no memory, exact)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls(
            n_params=sum(p.numel() for p in model.parameters()),
            hidden=int(config.hidden_size),  # type: ignore[attr-defined]
            layers=int(config.num_hidden_layers),  # type: ignore[attr-defined]
            vocab=int(config.vocab_size),  # type: ignore[attr-defined]
        )


def model_shape(spec: str | os.PathLike[str]) -> ModelShape:
    """:class:`ModelShape` of a model spec (``tiny``, ``smollm2`` or an HF directory); loads only its config."""
    from transformers import AutoConfig

    from itpo_batch.model.loading import resolve_model_path

    return ModelShape.from_config(AutoConfig.from_pretrained(resolve_model_path(spec)))


@dataclass(frozen=True)
class DatasetSize:
    """The logs as ``score`` sees them once rendered (token counts with the model's chat template)."""

    conversations: int
    tokens: int
    assistant_tokens: int
    turns: int
    logs_bytes: int = 0
    "The validated logs in memory (e.g. polars ``estimated_size`` of both frames), held throughout."


def dataset_size(logs: Logs, spec: str | os.PathLike[str], prm: PRMConfig | None = None) -> DatasetSize:
    """Render ``logs`` with the model's tokenizer as the PRM does and count what the budget needs."""
    from itpo_batch.model.loading import load_tokenizer
    from itpo_batch.model.render import RenderConfig, render

    prm = prm or PRMConfig()
    result = render(
        logs.chats(), load_tokenizer(spec), RenderConfig(max_length=prm.max_length, overflow=prm.overflow)
    )
    kept = result.conversations
    return DatasetSize(
        conversations=len(kept),
        tokens=sum(len(r) for r in kept),
        assistant_tokens=sum(int(r.assistant_mask.sum()) for r in kept),
        turns=sum(r.n_turns for r in kept),
        logs_bytes=int(logs.conversations.estimated_size() + logs.messages.estimated_size()),
    )


@dataclass(frozen=True)
class Budget:
    """Named components in bytes; ``total`` = runtime + resident data + the larger phase."""

    runtime: int
    logs: int
    output_tables: int
    prm_models: int
    prm_activations: int
    prm_logits: int
    prm_dataset: int
    q_models: int
    q_activations: int
    q_dataset: int

    @property
    def prm_phase(self) -> int:
        return self.prm_models + self.prm_activations + self.prm_logits + self.prm_dataset

    @property
    def q_phase(self) -> int:
        return self.q_models + self.q_activations + self.q_dataset

    @property
    def total(self) -> int:
        return self.runtime + self.logs + self.output_tables + max(self.prm_phase, self.q_phase)

    def as_dict(self) -> dict[str, int]:
        """Every component plus ``prm_phase``, ``q_phase`` and ``total`` (bytes), for JSON."""
        return {**asdict(self), "prm_phase": self.prm_phase, "q_phase": self.q_phase, "total": self.total}


def activation_bytes(shape: ModelShape, tokens: int) -> int:
    """Training activations of one packed buffer of ``tokens`` tokens: tokens × hidden × layers × ACT_BYTES."""
    return tokens * shape.hidden * shape.layers * ACT_BYTES


def score_budget(
    shape: ModelShape, data: DatasetSize, prm: PRMConfig | None = None, q: QConfig | None = None,
    runtime: int = RUNTIME,
) -> Budget:  # fmt: skip
    """The peak resident bytes ``score`` should need (see the module docstring for every factor).

    A buffer holds at most ``batch_tokens`` tokens, and no more than the whole dataset's."""
    prm, q = prm or PRMConfig(), q or QConfig()
    p = shape.n_params
    per_dataset = RENDERED_BYTES_PER_TOKEN + PACKED_BYTES_PER_TOKEN
    return Budget(
        runtime=runtime,
        logs=data.logs_bytes,
        output_tables=PER_TURN * data.turns,
        prm_models=(TRAIN_BYTES_PER_PARAM + INFER_BYTES_PER_PARAM) * p,
        prm_activations=activation_bytes(shape, min(prm.batch_tokens, data.tokens)),
        prm_logits=LOGIT_COPIES
        * 4
        * min(prm.chunk_size, prm.batch_tokens, data.assistant_tokens)
        * shape.vocab,
        prm_dataset=per_dataset * data.tokens
        + PRM_BYTES_PER_ASSISTANT_TOKEN * data.assistant_tokens
        + PER_CONVERSATION * data.conversations,
        q_models=(TRAIN_BYTES_PER_PARAM + INFER_BYTES_PER_PARAM) * p,
        q_activations=activation_bytes(shape, min(q.batch_tokens, data.tokens)),
        q_dataset=per_dataset * data.tokens + PER_CONVERSATION * data.conversations,
    )


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Between stages: glibc keeps the freed transient buffers of a stage (activations, logit chunks of
    varying size, interleaved with the small live arrays of rendered conversations) in its heap, which
    is resident memory the next stage would stack its own peak on (measured: 150 of the 200 MiB that
    preparing 10k conversations added). One call costs milliseconds.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
