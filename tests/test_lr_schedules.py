"""The learning-rate multipliers: warm-up, constant, cosine decay, and a late decay start on resume."""

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.training.lr_schedules import warmup_cosine


def test_warmup_then_cosine_over_the_run():
    f = warmup_cosine(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_constant_without_decay_steps():
    f = warmup_cosine(warmup_steps=5)
    assert [f(s) for s in (5, 100, 10_000)] == [1.0, 1.0, 1.0]


def test_late_decay_start_keeps_the_rate_until_it_then_follows_a_cosine():
    f = warmup_cosine(warmup_steps=100, decay_steps=14_000, decay_start=11_000)
    assert f(10_999) == 1.0
    assert f(11_000) == pytest.approx(1.0)
    for step in (11_500, 12_500, 13_250):
        expected = 0.5 * (1.0 + math.cos(math.pi * (step - 11_000) / 3_000))
        assert f(step) == pytest.approx(expected)
    assert f(14_000) == pytest.approx(0.0)


def test_a_constant_rate_run_resumed_with_a_late_decay_anneals_from_where_it_stopped():
    """The scheduler's state comes back from the checkpoint, the multiplier from the new config."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = LambdaLR(optimizer, warmup_cosine(warmup_steps=2))
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    assert optimizer.param_groups[0]["lr"] == 1.0

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = LambdaLR(optimizer, warmup_cosine(warmup_steps=2, decay_steps=40, decay_start=20))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rates = []
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(0.5 * (1.0 + math.cos(math.pi / 20)))
    assert rates[9] == pytest.approx(0.5)
    assert rates[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(rates, rates[1:]))
