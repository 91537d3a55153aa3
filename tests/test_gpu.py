"""GPU path: a short iterate on CUDA (bf16 autocast over float32 master weights). Skipped without CUDA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_short_iterate_on_cuda_bf16(tmp_path: Path, tiny_dir: Path) -> None:
    from itpo_batch.core.config import from_mapping
    from itpo_batch.model.loading import default_device, default_dtype
    from itpo_batch.run.config import IterateConfig
    from itpo_batch.run.rounds import iterate

    assert default_device().type == "cuda"
    assert default_dtype(default_device()) == torch.bfloat16
    cfg = from_mapping(IterateConfig, {
        "rounds": 1, "methods": ["itpo_norm", "iterative_ppo"], "model": str(tiny_dir), "n": 16,
        "group_size": 4, "max_new_tokens": 16, "eval": {"n": 8, "max_new_tokens": 16},
        "ippo": {"max_states": 8, "samples_per_state": 2, "max_new_tokens": 16}, "q": {"epochs": 1},
    })  # fmt: skip
    run = iterate(cfg, tmp_path / "gpu")
    metrics = {(r["method"], r["round"]): r for r in run.read_metrics()}
    for method in ("itpo_norm", "iterative_ppo"):
        last = metrics[(method, 1)]
        assert last["update/steps"] >= 1
        assert math.isfinite(last["update/loss"]) and math.isfinite(last["policy/kl_pi0"])
        assert (run.checkpoint_dir(method, 1, "policy") / "model.safetensors").is_file()
