"""The memory budget of ``score`` (itpo_batch.credit.memory) and what ``score`` frees between its stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from itpo_batch.credit.memory import (
    ACT_BYTES,
    DatasetSize,
    ModelShape,
    dataset_size,
    model_shape,
    score_budget,
    trim_heap,
)
from itpo_batch.credit.prm import ImplicitPRM, PRMConfig
from itpo_batch.credit.qvalue import QConfig
from itpo_batch.credit.score import _keep_weights_only
from itpo_batch.data.validate import read_logs

ROOT = Path(__file__).resolve().parents[1]
TINY_PARAMS = 2_557_632  # itpo_batch/model/tiny.py's docstring


def test_model_shape_counts_the_tiny_model_exactly(tiny_dir: Path) -> None:
    shape = model_shape(str(tiny_dir))
    assert shape == ModelShape(n_params=TINY_PARAMS, hidden=192, layers=4, vocab=4096)


def test_budget_components() -> None:
    shape = ModelShape(n_params=1_000_000, hidden=100, layers=2, vocab=1000)
    data = DatasetSize(conversations=10, tokens=10_000, assistant_tokens=4000, turns=20, logs_bytes=5000)
    b = score_budget(shape, data, PRMConfig(batch_tokens=2048, chunk_size=512), QConfig(batch_tokens=1024), 0)
    assert b.prm_models == 20 * 1_000_000  # π_φ: weights + grads + AdamW (16 B), π_ref: weights (4 B)
    assert b.q_models == 20 * 1_000_000  # Q-model trains (16 B) beside π_φ's weights (4 B)
    assert b.prm_activations == 2048 * 100 * 2 * ACT_BYTES
    assert b.q_activations == 1024 * 100 * 2 * ACT_BYTES
    assert b.prm_logits == 3 * 4 * 512 * 1000
    assert b.prm_dataset == 34 * 10_000 + 8 * 4000 + 1024 * 10
    assert b.total == b.logs + b.output_tables + max(b.prm_phase, b.q_phase)
    assert b.as_dict()["total"] == b.total
    few = score_budget(shape, DatasetSize(conversations=2, tokens=300, assistant_tokens=100, turns=2))
    assert few.prm_activations == 300 * 100 * 2 * ACT_BYTES and few.prm_logits == 3 * 4 * 100 * 1000


def test_budget_grows_by_bytes_per_token_only() -> None:
    shape = ModelShape(n_params=10**6, hidden=64, layers=2, vocab=500)
    one = DatasetSize(conversations=100, tokens=4000, assistant_tokens=1500, turns=150)
    ten = DatasetSize(conversations=1000, tokens=40000, assistant_tokens=15000, turns=1500)
    small, large = score_budget(shape, one), score_budget(shape, ten)
    per_conv = (large.total - small.total) / 900
    assert per_conv == pytest.approx(34 * 40 + 8 * 15 + 1024 + 256 * 1.5)  # tokens, rows, objects
    assert large.prm_models == small.prm_models and large.prm_activations == small.prm_activations


def test_dataset_size_renders_the_logs(tiny_dir: Path) -> None:
    logs = read_logs([ROOT / "examples/chat_logs.jsonl"])
    size = dataset_size(logs, str(tiny_dir))
    assert size.conversations == logs.conversations.height and size.turns == 17
    assert 0 < size.assistant_tokens < size.tokens and size.logs_bytes > 0


def test_score_keeps_only_the_prm_weights_for_the_q_phase(tiny_dir: Path) -> None:
    """Before the Q-model loads, π_φ's gradients, AdamW moments and π_ref are gone (12 of 20 B/param)."""
    prm = ImplicitPRM.load(str(tiny_dir), PRMConfig(), device="cpu")
    data = prm.prepare_logs(read_logs([ROOT / "examples/chat_logs.jsonl"]))
    prm.fit(data, evaluate=False)
    assert prm.optimizer is not None and any(p.grad is not None for p in prm.model.parameters())
    before = {k: v.clone() for k, v in prm.model.state_dict().items()}
    _keep_weights_only(prm)
    assert prm.optimizer is None and prm.reference is None and prm.trained is prm.model
    assert all(p.grad is None for p in prm.model.parameters())
    after = prm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights to write are untouched
    trim_heap()  # harmless to call again
