"""The training-loop helper (itpo_batch.model.train): a plain loop reference, micro-batch accumulation equals one
big batch, the schedule's shape, clipping, and the stated AdamW default."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from itpo_batch.model.train import OptimConfig, lr_at, make_optimizer, scheduled_lr, train_step


def _model_and_data(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.randn(12, 4, generator=g), 3 * torch.randn(12, generator=g)


def _mse_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x).squeeze(-1) - y) ** 2).sum()


def _flat(model: torch.nn.Module, grads: bool = False) -> torch.Tensor:
    return torch.cat([(p.grad if grads else p.detach()).flatten() for p in model.parameters()])


def test_train_step_matches_a_plain_loop() -> None:
    """Bit-identical to the hand-written loop: set lr, zero, backward, clip, step (warm-up + cosine)."""
    model, x, y = _model_and_data()
    plain = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, grad_clip=0.5, schedule="warmup_cosine",
                      warmup_ratio=0.3)  # fmt: skip
    opt = make_optimizer(model, cfg)
    ref = torch.optim.AdamW(plain.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    total, warm = 7, 2  # int(7 * 0.3)
    for step in range(total):
        stats = train_step(opt, cfg, [_mse_sum(model, x, y) / len(y)], step, total)
        progress = (step - warm) / (total - warm)
        lr = 1e-2 * ((step + 1) / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        assert stats.lr == pytest.approx(lr, rel=1e-12)
        for group in ref.param_groups:
            group["lr"] = stats.lr
        ref.zero_grad()
        loss = _mse_sum(plain, x, y) / len(y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        ref.step()
        assert opt.param_groups[0]["lr"] == stats.lr
        assert stats.loss == float(loss.detach()) and stats.grad_norm == float(norm)
        assert torch.equal(_flat(model), _flat(plain))


@pytest.mark.parametrize("grad_clip", [math.inf, 0.1])
def test_micro_batches_accumulate_to_one_big_batch(grad_clip: float) -> None:
    """Four micro-batches whose losses are divided by the step's count = one batch of all rows."""
    model, x, y = _model_and_data(seed=1)
    split = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, grad_clip=grad_clip)
    opt, opt_split = make_optimizer(model, cfg), make_optimizer(split, cfg)
    for _ in range(3):
        big = train_step(opt, cfg, [_mse_sum(model, x, y) / len(y)])
        micro = (_mse_sum(split, xs, ys) / len(y) for xs, ys in zip(x.split(3), y.split(3), strict=True))
        small = train_step(opt_split, cfg, micro)
        assert small.loss == pytest.approx(big.loss, rel=1e-6)
        assert small.grad_norm == pytest.approx(big.grad_norm, rel=1e-5)
        assert torch.allclose(_flat(split, grads=True), _flat(model, grads=True), rtol=1e-5, atol=1e-7)
        assert torch.allclose(_flat(split), _flat(model), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_flat(model), _flat(_model_and_data(seed=1)[0]))


def test_warmup_cosine_schedule_shape() -> None:
    peak, total = 2.0, 100
    lrs = [lr_at(s, total, peak, 0.1) for s in range(total)]
    assert lrs[:10] == pytest.approx([peak * (s + 1) / 10 for s in range(10)])  # linear warm-up
    assert lrs[10] == pytest.approx(peak)  # the peak, then cosine decay
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert 0.1 * peak < lrs[-1] < 0.101 * peak  # 10 % is reached one step past the last
    assert lr_at(0, total, peak, 0.0) == peak  # no warm-up: starts at the peak
    constant = OptimConfig(lr=3e-4, warmup_ratio=0.5)
    assert {scheduled_lr(constant, s, total) for s in range(total)} == {3e-4}
    cosine = OptimConfig(lr=peak, schedule="warmup_cosine", warmup_ratio=0.1)
    assert [scheduled_lr(cosine, s, total) for s in range(total)] == lrs


def test_warmup_constant_schedule() -> None:
    """Linear warm-up over ``warmup_steps``, then the constant LR (the policy update's per-round warm-up)."""
    cfg = OptimConfig(lr=4e-4, schedule="warmup_constant", warmup_steps=4)
    expected = [4e-4 * min(1.0, (s + 1) / 4) for s in range(7)]  # loop reference
    assert [scheduled_lr(cfg, s, 7) for s in range(7)] == pytest.approx(expected, rel=1e-12)
    assert expected[:4] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    one = OptimConfig(lr=4e-4, schedule="warmup_constant", warmup_steps=1)
    assert {scheduled_lr(one, s, 7) for s in range(7)} == {4e-4}  # one warm-up step: constant
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(lr=1e-3, schedule="warmup_constant", warmup_steps=-1)


def test_clipping_caps_the_norm_and_reports_it_before() -> None:
    model, x, y = _model_and_data(seed=2)
    probe = copy.deepcopy(model)
    _mse_sum(probe, x, y).backward()
    norm = float(torch.linalg.vector_norm(_flat(probe, grads=True)))
    assert norm > 1.0
    cfg = OptimConfig(lr=0.0, grad_clip=1.0)
    stats = train_step(make_optimizer(model, cfg), cfg, [_mse_sum(model, x, y)])
    assert stats.grad_norm == pytest.approx(norm, rel=1e-6)
    assert float(torch.linalg.vector_norm(_flat(model, grads=True))) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(_flat(model), _flat(probe))  # lr 0, no decay: weights unchanged
    loose = OptimConfig(lr=0.0, grad_clip=10 * norm)  # under the cap: gradients untouched
    train_step(make_optimizer(model, loose), loose, [_mse_sum(model, x, y)])
    assert torch.allclose(_flat(model, grads=True), _flat(probe, grads=True), rtol=1e-6)


def test_stated_default_and_trainable_parameters_only() -> None:
    model, _, _ = _model_and_data()
    model[0].weight.requires_grad_(False)
    opt = make_optimizer(model, OptimConfig(lr=1e-3))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["weight_decay"] == 0.0
    params = opt.param_groups[0]["params"]
    assert len(params) == 3 and all(p is not model[0].weight for p in params)
    assert OptimConfig(lr=1.0, betas=[0.5, 0.6]).betas == (0.5, 0.6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(lr=1.0, schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_ratio"):
        OptimConfig(lr=1.0, warmup_ratio=1.0)
