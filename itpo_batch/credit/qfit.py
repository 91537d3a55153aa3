"""The turn Q-model's driver: load a fresh head or warm-start from a saved Q directory, fit, predict, save.

The model, its data and its loss are in :mod:`itpo_batch.credit.qvalue`; this module strings them together
(:func:`fit_q`) and owns the on-disk format of a Q directory (HF ``save_pretrained`` of the backbone, the
value head, the tokenizer and ``qvalue_config.json`` with the config it was fitted with and its metrics).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.core.errors import ItpoError
from itpo_batch.credit.qvalue import (
    CONFIG_FILE,
    QConfig,
    QData,
    data_from_logs,
    fit,
    init_head_bias,
    predict,
    q_metrics,
)
from itpo_batch.data.io import atomic_dir
from itpo_batch.data.validate import Logs
from itpo_batch.model.loading import VALUE_HEAD_FILE, ValueModel, default_device, load_model, load_tokenizer
from itpo_batch.model.logprobs import unwrap


def load_q(
    cfg: QConfig, device: torch.device | str | None = None
) -> tuple[ValueModel, PreTrainedTokenizerBase]:
    """The model to fit: ``cfg.warm_start`` (a saved Q directory) or a fresh head on ``cfg.model``."""
    spec = cfg.warm_start or cfg.model
    if spec is None:
        raise ItpoError("QConfig.model is not set: name the Q-model's backbone (a model spec or directory)")
    if cfg.warm_start is not None:
        if not (Path(cfg.warm_start) / VALUE_HEAD_FILE).is_file():
            raise ItpoError(f"warm start {cfg.warm_start!r} is not a Q directory (no {VALUE_HEAD_FILE})")
        saved = saved_config(cfg.warm_start)
        if saved is not None and saved.loss != cfg.loss:
            raise ItpoError(
                f"warm start {cfg.warm_start!r} was fitted with loss={saved.loss!r}, not {cfg.loss!r}"
            )
    dev = torch.device(device) if device is not None else default_device()
    model = load_model(spec, role="value", device=dev, dtype=torch.float32)
    return model, load_tokenizer(spec)  # type: ignore[return-value]


def saved_config(q_dir: str | Path) -> QConfig | None:
    """The :class:`QConfig` stored in a Q directory, or None if it has none."""
    path = Path(q_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    fields = {f.name for f in dataclasses.fields(QConfig)}
    stored = json.loads(path.read_text())["config"]
    return QConfig(**{k: v for k, v in stored.items() if k in fields})


def save(
    model: ValueModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: QConfig,
    out_dir: str | Path,
    metrics: dict | None = None,
) -> Path:
    """Write a Q directory atomically: backbone + value head + tokenizer + ``qvalue_config.json``."""
    with atomic_dir(Path(out_dir)) as tmp:
        unwrap(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"config": dataclasses.asdict(cfg), "metrics": metrics or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


@dataclass
class QResult:
    """What :func:`fit_q` produced."""

    model: ValueModel
    tokenizer: PreTrainedTokenizerBase
    data: QData
    predictions: pl.DataFrame  # see predict()
    metrics: dict  # q_metrics() plus the last epoch's loss and the fit time
    history: list[dict]  # per-epoch metrics


def fit_q(
    logs: Logs,
    cfg: QConfig,
    out_dir: str | Path | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> QResult:
    """Load (or warm-start), fit on the training split, predict every turn, evaluate, optionally save.

    ``seed`` draws the hold-out split (a hash of it and each conversation id), the shuffles and the
    head's initialisation.
    """
    model, tokenizer = load_q(cfg, device)
    data = data_from_logs(logs, tokenizer, cfg, seed)
    if cfg.init_bias and cfg.warm_start is None:
        init_head_bias(model, data, cfg)
    t0 = time.perf_counter()
    history = fit(model, data, cfg, on_step, seed)
    pred = predict(model, data, cfg)
    metrics = {
        **q_metrics(pred),
        "q/loss": history[-1]["q/loss"] if history else None,
        "q/fit_seconds": time.perf_counter() - t0,
        "q/dropped_overlength": data.n_dropped,
    }
    if out_dir is not None:
        save(model, tokenizer, cfg, out_dir, metrics)
    return QResult(model, tokenizer, data, pred, metrics, history)
